// Dequantization of the quantized layouts that published checkpoints store weights in, into the
// float types the runtime holds weights in (F32, F16, BF16). ModelWeights calls these at load,
// one tensor (or one expert) at a time, so the float copy of a model is built piece by piece and
// never held twice.
//
// MXFP4 (OCP Microscaling; gpt_oss experts, quantization_config.quant_method "mxfp4"): a
// [rows, cols] matrix (row = output, col = input) is two uint8 tensors
//   blocks  [rows, cols / 32, 16]  e2m1 codes, two per byte: value 2k of a group of 32 in the low
//                                  nibble of byte k, value 2k + 1 in the high nibble
//   scales  [rows, cols / 32]      e8m0: the group's values are multiplied by 2^(s - 127); 255 is NaN
// e2m1 is {0, 0.5, 1, 1.5, 2, 3, 4, 6} with bit 3 the sign.
//
// Block FP8 (DeepSeek-V3; quant_method "fp8", weight_block_size [br, bc]): a [rows, cols] weight
// is F8_E4M3 with an fp32 tensor <name>_scale_inv of [ceil(rows / br), ceil(cols / bc)];
//   w[i][j] = fp8(w[i][j]) * scale_inv[i / br][j / bc]
// (the last block of a row or column may be partial).
//
// The Encode functions are the other direction, for writers of checkpoints in these layouts (the
// synthetic checkpoints of launch/synthetic_model.h, the test fixtures): round to nearest and
// saturate, so any finite input gives a valid encoding whose dequantization is close to it.
//
// All functions are thread-safe (they touch only their arguments). The Dequantize and
// Encode...Rows/Blocks functions spread rows over ThreadPool::Default() (EF_NUM_THREADS); the
// result and the error reported (the first bad row's) do not depend on the split (so they must
// not be called from a ParallelFor body on that pool). Dequantizing takes about 2 ns a value on
// one core.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/core/status.h"
#include "runtime/model/safetensors_file.h"

namespace ef::runtime {

inline constexpr int64_t kMxfp4Group = 32;       // values sharing one e8m0 scale
inline constexpr int64_t kMxfp4GroupBytes = 16;  // their packed e2m1 codes

// The value of an e2m1 code (its low 4 bits).
float E2m1ToF32(uint8_t code);

// Checks that `blocks` and `scales` hold MXFP4 for weights of shape [lead..., rows, cols]: both
// U8, blocks [lead..., rows, cols / 32, 16], scales [lead..., rows, cols / 32], cols a multiple
// of 32. InvalidArgument naming the tensor, its shape and the shape expected otherwise.
[[nodiscard]] Status CheckMxfp4(const TensorView& blocks, const TensorView& scales, const std::vector<int64_t>& lead,
                                int64_t rows, int64_t cols);

// dst[rows, cols] (type out: F32, F16 or BF16, row-major) = the MXFP4 matrix at blocks/scales
// (rows * cols / 2 and rows * cols / 32 bytes; cols a multiple of 32). Every value is computed
// exactly in fp32 and must be exact in `out`: a NaN scale (255), a value out of range of fp32 or
// not representable in `out` is InvalidArgument starting with `what` (which names the matrix,
// e.g. `tensor "x", expert 3`), then the row and the group. (Finite values are always exact in
// BF16 and F32.) On error dst's contents are unspecified.
[[nodiscard]] Status DequantizeMxfp4(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t cols,
                                     DType out, void* dst, const std::string& what);

// The e2m1 code nearest to x (x already divided by the group's scale), ties to the even code,
// saturating at +-6; -0 and values rounding to 0 give code 0.
uint8_t EncodeE2m1(float x);

// rows x cols values x (row-major; cols a multiple of 32) as MXFP4: blocks [rows, cols / 32, 16]
// (rows * cols / 2 bytes) and scales [rows, cols / 32] (rows * cols / 32 bytes). The shared
// exponent of a group is floor(log2(amax)) - 2 (e2m1's largest exponent), clamped to [-127, 127],
// as the OCP specification describes (0 for an all-zero group).
void EncodeMxfp4Rows(const float* x, int64_t rows, int64_t cols, uint8_t* blocks, uint8_t* scales);

// The F8_E4M3 code nearest to x, ties to the even code, saturating at +-448; -0 and values
// rounding to 0 give code 0.
uint8_t EncodeE4m3(float x);

// A [rows, cols] weight w (row-major) as block FP8: codes q [rows, cols] and the fp32 scale_inv
// grid [ceil(rows / block_rows), ceil(cols / block_cols)] (row-major; the last block of a row or
// column may be partial). A block's scale is its largest |w| / 448 (1 for an all-zero block) and
// each value is EncodeE4m3(w / scale).
void EncodeFp8Blocks(const float* w, int64_t rows, int64_t cols, int block_rows, int block_cols, uint8_t* q,
                     float* scale_inv);

// Whether DeepSeek-V3 publishes tensor `name` as block FP8: the decoder's linear weights
// (model.layers.N.*_proj.weight and *_proj_with_mqa.weight: attention projections, dense MLP,
// shared and routed experts); not the router, norms, e_score_correction_bias, embedding or lm_head.
bool DeepseekV3StoresAsFp8(const std::string& name);

// The scale tensor of an FP8 weight: "<weight_name>_scale_inv" (x.weight -> x.weight_scale_inv).
std::string Fp8ScaleName(const std::string& weight_name);

// Checks a block FP8 pair: weight F8_E4M3 of rank 2, scale_inv F32 [ceil(rows / block_rows),
// ceil(cols / block_cols)]. InvalidArgument naming the tensor, its shape and the grid expected.
[[nodiscard]] Status CheckFp8(const TensorView& weight, const TensorView& scale_inv, int block_rows, int block_cols);

// dst[rows, cols] (type out: F32, F16 or BF16) = the block FP8 weight: each value is
// fp8 * scale_inv as an fp32 product (one rounding, to nearest even), then rounded to nearest
// even to `out` (exact for F32; BF16 keeps 8 significant bits, so a product of a 4-bit fp8
// significand and a 24-bit scale generally rounds once more). Call CheckFp8 first. A NaN code, a
// non-finite scale or a product out of fp32 range is InvalidArgument naming the tensor and the
// position. On error dst's contents are unspecified.
[[nodiscard]] Status DequantizeFp8(const TensorView& weight, const TensorView& scale_inv, int block_rows,
                                   int block_cols, DType out, void* dst);

}  // namespace ef::runtime
