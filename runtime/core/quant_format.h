// QuantFormat: the layout of the runtime's group-quantized weights (DType kQ8, kQ4), in one place.
//
// The expert cache keeps low-precision copies of experts so that a miss moves fewer bytes over
// PCIe; Gemm consumes them directly (CPU, CUDA). A weight [rows, cols] (row-major, y = x W^T) is
// one contiguous block:
//
//   values  rows * cols * bits / 8 bytes, row-major; a row's groups of `group` consecutive values
//           (along cols, the input dimension) share their parameters.
//           kQ8: int8 q in [-127, 127], x ~ q * scale                          (symmetric)
//           kQ4: uint4 q in [0, 15], two per byte, element 2i in the low nibble and 2i + 1 in
//                the high one, x ~ q * scale + min                             (asymmetric)
//   (zero padding to 16 bytes)
//   params  rows * (cols / group) entries, row-major, each fp16: kQ8 {scale}, kQ4 {scale, min}
//   (zero padding to 16 bytes)
//
// Why these choices (relative errors measured on the 64 experts of models/tiny-code-moe by
// QuantTinyModelTest.ErrorOfCandidateFormats; table in docs/results/quant/formats.md):
//   - fp16 parameters: as accurate as fp32 ones at half the bytes (bf16 is 1% worse for int8);
//     fp16's subnormals still cover groups of values down to 1e-7.
//   - int8, groups of 64: 1.031 bytes a value (1.94x fewer than bf16), weight error 0.59%
//     (groups of 128: 0.65%, of 32: 0.54% at 3% more bytes).
//   - int4 asymmetric, groups of 64: 0.5625 bytes a value (3.56x fewer than bf16), weight error
//     9.0%; symmetric int4 at the same bytes (groups of 32) is 9.7%, and 10.8% at groups of 64
//     (15 levels over [-max, max] against 16 over [min, max]).
//   - 64 divides the expert widths of the supported models (Mixtral 4096/14336, OLMoE, Qwen MoE)
//     and the test fixtures' hidden size; the Qwen fixtures' experts of width 32 stay unquantized.
//
// Quantize rounds the parameters so that every value of a group lies within the representable
// range (scale rounded up, min rounded down): |x - dequant(x)| <= scale / 2 holds for the stored
// scale, up to fp32 rounding. The 16-byte padding keeps each part of a block 16-byte aligned when
// the block is (the CUDA GEMV reads values with 16-byte loads), and blocks laid end to end too.
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/core/dtype.h"

namespace ef {

struct QuantFormat {
  DType dtype;
  int bits;         // per value: 8 or 4
  int group;        // consecutive values of a row sharing one parameter entry
  bool asymmetric;  // parameters {scale, min} (q unsigned) instead of {scale} (q signed)

  static constexpr int64_t kAlign = 16;
  static constexpr int64_t kParamBytes = 2;  // fp16 scale and min

  // The format of a quantized dtype (t must be kQ8 or kQ4).
  static constexpr QuantFormat Of(DType t);

  // Largest |q| (symmetric) or largest q (asymmetric).
  constexpr int qmax() const { return asymmetric ? (1 << bits) - 1 : (1 << (bits - 1)) - 1; }
  constexpr int params_per_group() const { return asymmetric ? 2 : 1; }
  // Values per 16-byte load of a row.
  constexpr int values_per_chunk() const { return static_cast<int>(kAlign) * 8 / bits; }
  constexpr bool divides(int64_t cols) const { return cols % group == 0; }
  // Rounded up when cols is not a multiple of the group (such shapes are never quantized, but
  // their size stays well defined).
  constexpr int64_t groups_per_row(int64_t cols) const { return (cols + group - 1) / group; }
  constexpr int64_t row_value_bytes(int64_t cols) const { return (cols * bits + 7) / 8; }
  constexpr int64_t params_offset(int64_t rows, int64_t cols) const { return AlignUp(rows * row_value_bytes(cols)); }
  constexpr int64_t row_param_bytes(int64_t cols) const {
    return groups_per_row(cols) * params_per_group() * kParamBytes;
  }
  constexpr size_t bytes(int64_t rows, int64_t cols) const {
    return static_cast<size_t>(AlignUp(params_offset(rows, cols) + rows * row_param_bytes(cols)));
  }

  static constexpr int64_t AlignUp(int64_t b) { return (b + kAlign - 1) / kAlign * kAlign; }
};

inline constexpr QuantFormat kQ8Format{DType::kQ8, 8, 64, false};
inline constexpr QuantFormat kQ4Format{DType::kQ4, 4, 64, true};

constexpr QuantFormat QuantFormat::Of(DType t) { return t == DType::kQ4 ? kQ4Format : kQ8Format; }

// A 16-byte load of values never straddles two groups, and a row of values starts 16-byte
// aligned whenever cols is a multiple of the group (the CUDA GEMV relies on both).
static_assert(kQ8Format.group % kQ8Format.values_per_chunk() == 0);
static_assert(kQ4Format.group % kQ4Format.values_per_chunk() == 0);
static_assert(kQ8Format.qmax() == 127 && kQ4Format.qmax() == 15);
static_assert(kQ8Format.bytes(2, 128) == 256 + 16);  // 2 rows x 2 groups x fp16 = 8, padded
static_assert(kQ4Format.bytes(2, 128) == 128 + 16);  // 2 rows x 2 groups x 2 x fp16 = 16
static_assert(kQ8Format.bytes(4096, 14336) == 4096ull * 14336 + 4096ull * 224 * 2);

}  // namespace ef
