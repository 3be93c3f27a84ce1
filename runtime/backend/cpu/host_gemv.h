// HostGemv: y[m, n] = x[m, k] W^T on the host CPU for a few rows (decode), streaming the weight at
// the host's memory bandwidth. For computing experts on the host instead of copying them to the
// GPU (cache.cpu_compute): a missed expert's weights are read once from host memory, which at
// batch 1 takes less time than copying them over PCIe.
//
// W is F32, BF16, Q8G, Q4G (runtime/core/quant_format.h) or PBF16 (packed_bf16_format.h; its
// values are decoded to their bf16 bits in registers, exceptions added after each row's sum; blocks
// cut at its group of 128 columns). With AVX-512 (checked at run time;
// the build targets baseline x86-64; HostPath below names the kernels) bf16 rows are widened in
// registers, Q8G rows are reduced per group (sum q*x, then one scale multiply per group) and Q4G
// nibbles index a per-group table of their 16 dequantized values (vpermps), so no row is ever
// expanded to fp32 in memory; faster kernels replace two of these where the CPU has them. Without
// AVX-512, or for shapes the vector path does not cover (k not a multiple of 64, F16), rows go
// through the CPU backend's exact path (WeightRow + Dot). Both accumulate in fp32; the vector
// path's summation order differs from the exact one, so results agree to rounding (~1e-6
// relative), not bitwise.
//
// int4 weights on a CPU with AVX-512 VNNI take x in int8 by default (W4A8, the scheme of
// llama.cpp's Q4_0 x Q8_0 dot products): each row of x is rounded per group of 64 columns, the
// weight's groups (RoundToInt8Groups below), the products of a group are summed exactly in int32
// by vpdpbusd, 64 per instruction, and the group's sum is scaled once. The float path looks every
// nibble up in a table: 2-3x the instructions, so at batch 1 it is bound by the cores, not by the
// memory (docs/results/cpu_compute). Rounding x moves each value by at most its group's max / 254
// (about 0.6% relative error per output for normal values, more in a group with an outlier),
// small against int4's own 9% per weight. int8 weights can take x in int8 too (EF_HOST_GEMV_INT8_X
// =all): there it would double the weights' 0.6% error for no gain at batch 1, where the float
// path already streams at the memory's rate, so they keep x in fp32 by default. bf16 and fp32
// weights, the lossless path, always take x in fp32 at full precision: on a CPU with AMX (Intel
// Sapphire Rapids and later) bf16 weights go through tile products with x split into three bf16
// parts that together hold all of its fp32 bits (above 1e-30), so each product is exact and the
// sums are fp32, in the tile unit's order (agreeing with the AVX-512 path to rounding). One tile product serves up to
// 16 rows of x, so a batch of rows costs about what one row costs, where the AVX-512 path is bound by its FMAs from two
// rows on.
#pragma once

#include <cstdint>
#include <string>

#include "runtime/backend/backend.h"
#include "runtime/core/thread_pool.h"

namespace ef::runtime {

// Rows per pass over the weights of the AVX-512 kernels (AMX: 16); larger m takes more passes.
inline constexpr int kHostGemvMaxRows = 4;

// The part of a weight one call multiplies: rows [row_begin, row_end), columns [col_begin,
// col_end) (an end < 0: the weight's last). A missed expert split between the GPU and the host
// (cache.cpu_compute auto) takes the last rows of gate and up and the last columns of down here.
struct GemvBlock {
  int64_t row_begin = 0, row_end = -1;
  int64_t col_begin = 0, col_end = -1;
};

// The kernels of the vector path. kDefault picks per weight type what the knobs allow: kAmx for
// bf16 (EF_HOST_GEMV_AMX, on by default), kInt8X for int4 (EF_HOST_GEMV_INT8_X: int4, all or
// none), kFloat otherwise.
enum class HostPath {
  kDefault,
  kFloat,  // AVX-512 FMAs with x in fp32 (every type)
  kInt8X,  // int8 and int4 weights: x rounded to int8 per group, vpdpbusd (AVX-512 VNNI)
  kAmx,    // bf16 weights (PBF16 when asked: decoded a tile at a time): AMX tiles, x in three bf16 parts
           // (every product exact for |x| > 1e-30)
};

// y[m, n] = x[m, k] W[block]^T (overwritten; n and k the block's rows and columns), split over
// `pool` by output columns. A quantized weight's columns must be cut at multiples of its group
// (64); the vector path takes blocks whose columns start and end at multiples of 64, others go
// through fp32-widened rows.
void HostGemv(ThreadPool& pool, const float* x, int64_t m, const Weight& w, float* y, GemvBlock block = {},
              HostPath path = HostPath::kDefault);

// True when HostGemv takes its vector path for w on this CPU.
bool HostGemvVectorized(const Weight& w);

// The kernel HostGemv runs for w when asked for `path`: kDefault resolved; a path that does not
// apply to w's type, or that this CPU lacks, is kFloat (which also stands for the exact scalar
// path when HostGemvVectorized(w) is false).
HostPath HostGemvPath(const Weight& w, HostPath path = HostPath::kDefault);

// A knob naming which quantized weights take x in int8 (EF_HOST_GEMV_INT8_X, EF_CPU_INT8_X):
// int4, all or none; anything else warns, naming `key`, and counts as `fallback`.
std::string Int8XChoice(const char* key, const std::string& value, const char* fallback);
// Whether such a choice covers weights of type t.
bool Int8XCovers(const std::string& choice, DType t);

// x[m, k] (k a multiple of 64) as the int8 kernels use it, into out[m, k]: per row and group of 64
// columns, with a = max |x| of the group, q = x * (127 / a) rounded to nearest even (fp32
// arithmetic) and x' = q * (a / 127); a group with a < 1e-30 (zeros, or values so small that
// 127 / a would overflow) is zeros, a group holding a non-finite value turns NaN (so do the
// outputs of its row in the kernels). The kernels compute
// y = x' W^T with exact int32 sums of q times the weight's integers.
void RoundToInt8Groups(const float* x, int64_t m, int64_t k, float* out);

}  // namespace ef::runtime
