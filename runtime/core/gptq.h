// Quantization that sees the inputs (GPTQ, Frantar et al., arXiv 2210.17323): rounds a weight
// matrix into the runtime's group formats (runtime/core/quant_format.h, the same bytes Quantize
// writes and every kernel reads) so that the error of its *outputs* over calibration inputs is
// small, not the error of each weight on its own.
//
// Round to nearest minimises each |w - q| independently; GPTQ quantizes a row's columns in order
// and spreads each column's rounding error over the columns not yet quantized, weighted by the
// inputs' second moment H = sum_t x_t x_t^T, so that the errors of correlated inputs cancel in
// y = W x. The columns go in order of decreasing input energy (act order), and every group's
// parameters (fp16 scale, and min for kQ4) are the ones Quantize picks from the weights as given
// (static groups), so the block differs from Quantize's in its integers only. With H a multiple of the
// identity nothing is spread, and the bytes are Quantize's exactly.
//
// Cost: a Cholesky factorisation and inverse of H (cols^3 / 2 multiply-adds, one thread) and
// rows * cols^2 / 2 for the rows (all threads of ThreadPool::Default()). Mixtral-8x7B's down
// projection (cols 14336) is about 1.5e12 for the factorisation alone; this is meant for experts of
// modest width. Thread-safe except that it uses the default pool (not from inside its bodies).
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/core/dtype.h"
#include "runtime/core/status.h"

namespace ef {

struct GptqOptions {
  // Added to H's diagonal, times the mean of that diagonal: keeps H invertible when the
  // calibration inputs do not span every direction (GPTQ's default).
  double damp = 0.01;
  // Quantize columns in order of decreasing H diagonal (GPTQ's "act order"), not left to right.
  bool act_order = true;
};

// Quantizes the [rows, cols] fp32 weight `w` (row-major, y = x W^T) into `dst` in target's format
// (kQ8 or kQ4), minimising sum_t |(W - Q) x_t|^2 for inputs with second moment `hessian`
// ([cols, cols], row-major, symmetric, sum_t x_t x_t^T; any positive multiple gives the same
// result). Returns the bytes written (WeightBytes(target, rows, cols)). InvalidArgument, naming the
// problem, for what Quantize refuses (target, cols not a multiple of the group, values not finite or
// too large, dst too small) and for a Hessian that is not finite or has a negative diagonal entry.
// FailedPrecondition when H is not positive definite even after damping (the caller may round that
// matrix to nearest instead). A column no input ever reached (zero diagonal) is quantized to nearest.
[[nodiscard]] StatusOr<size_t> QuantizeGptq(DType target, const float* w, int64_t rows, int64_t cols,
                                            const double* hessian, void* dst, size_t dst_bytes,
                                            const GptqOptions& options = {});

}  // namespace ef
