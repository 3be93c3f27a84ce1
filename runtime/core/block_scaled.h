// Packing of published block-scaled weights (MXFP4, 128 x 128 block FP8) into the runtime's
// one-block layout (runtime/core/block_scaled_format.h), and their dequantization to fp32.
//
// The loader packs a routed expert's checkpoint tensors once (copies, no rounding: the block holds
// the checkpoint's codes and scales); the backends dequantize rows on use. The values are those of
// the checkpoint's reference dequantization (runtime/model/checkpoint_quant.h) into fp32, bit for
// bit: code value times scale, one fp32 product. All functions are thread-safe (they touch only
// their arguments) and unchecked: callers validate codes and shapes first (the loader by
// dequantizing every weight once, which reports NaN scales and overflow by tensor and position).
#pragma once

#include <cstdint>

#include "runtime/core/block_scaled_format.h"
#include "runtime/core/dtype.h"

namespace ef {

// Writes the kMxfp4 block of a [rows, cols] weight (cols a multiple of 32) to dst
// (WeightBytes(kMxfp4, rows, cols) bytes, padding zeroed). Row r is source row r * row_stride of
// `blocks` (rows of cols / 2 bytes) and `scales` (rows of cols / 32 bytes): stride 2 from row 0 or
// row 1 takes GPT-OSS's interleaved gate or up rows out of its fused gate_up projection.
void PackMxfp4(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t cols, int64_t row_stride, void* dst);

// Writes the kFp8Block block of a [rows, cols] weight to dst (WeightBytes(kFp8Block, rows, cols)
// bytes, padding zeroed): the e4m3 codes q [rows, cols] and the fp32 grid scale_inv
// [ceil(rows / 128), ceil(cols / 128)], both row-major (either may be unaligned).
void PackFp8Block(const uint8_t* q, const void* scale_inv, int64_t rows, int64_t cols, void* dst);

// Row `row` of the block-scaled [rows, cols] weight `src` of type t as fp32 into dst[cols]; the CPU
// backend's inner loop, so unchecked: t is kMxfp4 or kFp8Block, the shape its format's, row in
// [0, rows). Each value is code value x scale as one fp32 product (the CUDA kernels compute the
// same values).
void DequantizeBlockScaledRow(DType t, const void* src, int64_t rows, int64_t cols, int64_t row, float* dst);

}  // namespace ef
