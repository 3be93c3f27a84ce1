// HostGemv: y[m, n] = x[m, k] W^T on the host CPU for a few rows (decode), streaming the weight at
// the host's memory bandwidth. For computing experts on the host instead of copying them to the
// GPU (cache.cpu_compute): a missed expert's weights are read once from host memory, which at
// batch 1 takes less time than copying them over PCIe.
//
// W is F32, BF16, Q8G or Q4G (runtime/core/quant_format.h). With AVX-512 (checked at run time;
// the build targets baseline x86-64) bf16 rows are widened in registers, Q8G rows are reduced per
// group (sum q*x, then one scale multiply per group) and Q4G nibbles index a per-group table of
// their 16 dequantized values (vpermps), so no row is ever expanded to fp32 in memory. Without
// AVX-512, or for shapes the vector path does not cover (k not a multiple of 64, F16), rows go
// through the CPU backend's exact path (WeightRow + Dot). Both accumulate in fp32; the vector
// path's summation order differs from the exact one, so results agree to rounding (~1e-6
// relative), not bitwise.
#pragma once

#include <cstdint>

#include "runtime/backend/backend.h"
#include "runtime/core/thread_pool.h"

namespace ef::runtime {

// Rows per call the kernel keeps in registers; larger m is processed in blocks of this many.
inline constexpr int kHostGemvMaxRows = 4;

// The part of a weight one call multiplies: rows [row_begin, row_end), columns [col_begin,
// col_end) (an end < 0: the weight's last). A missed expert split between the GPU and the host
// (cache.cpu_compute auto) takes the last rows of gate and up and the last columns of down here.
struct GemvBlock {
  int64_t row_begin = 0, row_end = -1;
  int64_t col_begin = 0, col_end = -1;
};

// y[m, n] = x[m, k] W[block]^T (overwritten; n and k the block's rows and columns), split over
// `pool` by output columns. A quantized weight's columns must be cut at multiples of its group
// (64); the vector path takes blocks whose columns start and end at multiples of 64, others go
// through fp32-widened rows.
void HostGemv(ThreadPool& pool, const float* x, int64_t m, const Weight& w, float* y, GemvBlock block = {});

// True when HostGemv takes its vector path for w on this CPU.
bool HostGemvVectorized(const Weight& w);

}  // namespace ef::runtime
