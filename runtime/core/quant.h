// Quantization of weight matrices to the runtime's group formats (kQ8, kQ4; layout and the reasons
// for it in runtime/core/quant_format.h) and back to fp32.
//
// The expert cache quantizes a model's experts once at load (host memory), copies the blocks
// into device slots on a miss, and hands them to Backend::Gemm as Weight{kQ8 or kQ4, block,
// rows, cols}. All functions are thread-safe (they touch only their arguments).
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/core/dtype.h"
#include "runtime/core/quant_format.h"
#include "runtime/core/status.h"

namespace ef {

// Quantizes the [rows, cols] weight `src` (row-major, src_dtype F32, F16 or BF16) into `dst` in
// target's format (kQ8 or kQ4) and returns the bytes written, WeightBytes(target, rows, cols)
// (padding included, zeroed). InvalidArgument, naming the shape, when target is not a quantized
// type, src_dtype is not a float type, cols is not a multiple of the format's group (the caller
// keeps such a weight unquantized), a value is not finite or is too large for fp16 parameters
// (|x| > 65504 * qmax), or dst_bytes is smaller than needed. On error dst's contents are
// unspecified. Matrices of millions of values are split over up to max_threads threads (0: the
// process's CPUs, at most 16; std::thread, one chunk of rows each); the result does not depend on the
// split. A caller that quantizes many matrices at once passes 1.
[[nodiscard]] StatusOr<size_t> Quantize(DType target, DType src_dtype, const void* src, int64_t rows, int64_t cols,
                                        void* dst, size_t dst_bytes, int max_threads = 0);

// dst[rows, cols] (fp32) = the values a quantized block `src` of type t (kQ8 or kQ4) stands for.
// InvalidArgument when t is not quantized or cols is not a multiple of its group.
[[nodiscard]] Status Dequantize(DType t, const void* src, int64_t rows, int64_t cols, float* dst);

// Row `row` of the quantized [rows, cols] block `src` of type t as fp32 into dst[cols]; the
// backends' inner loop, so unchecked: t is kQ8 or kQ4, cols a multiple of the group, row in
// [0, rows). Values are q * scale (kQ8) and q * scale + min (kQ4), in fp32 without fused
// multiply-add (the CUDA kernels compute the same expressions).
void DequantizeRow(DType t, const void* src, int64_t rows, int64_t cols, int64_t row, float* dst);

}  // namespace ef
