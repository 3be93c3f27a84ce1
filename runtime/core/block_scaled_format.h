// BlockScaledFormat: the in-memory layout of the block-scaled weight formats that published
// checkpoints ship (DType kMxfp4, kFp8Block), in one place.
//
// The routed experts of such checkpoints stay in their stored form in host memory, in the expert
// cache's slots and on the device, so a load moves the checkpoint's bytes and Gemm (CPU, CUDA)
// dequantizes on the fly. A weight [rows, cols] (row-major, y = x W^T) is one contiguous block, like
// the runtime's own kQ8/kQ4 (quant_format.h):
//
//   values  rows * cols * bits / 8 bytes, row-major
//           kMxfp4:    e2m1 codes, two per byte: value 2k of a row in the low nibble of byte k,
//                      2k + 1 in the high nibble (the checkpoint's *_blocks, [rows, cols / 32, 16])
//           kFp8Block: OCP e4m3 (F8_E4M3) codes, one per byte
//   (zero padding to 16 bytes)
//   scales  a row-major grid [ceil(rows / block_rows), ceil(cols / block_cols)]
//           kMxfp4:    blocks of 1 x 32, e8m0 bytes: the block's values are multiplied by 2^(s - 127)
//                      (the checkpoint's *_scales, [rows, cols / 32])
//           kFp8Block: blocks of 128 x 128, fp32 (DeepSeek-V3's weight_scale_inv); the last block of
//                      a row or column may be partial
//   (zero padding to 16 bytes)
//
// w[i][j] = value(i, j) * scale[i / block_rows][j / block_cols], one fp32 product (exact for MXFP4:
// e2m1 values times a power of two). kMxfp4 needs cols to be a multiple of 32; kFp8Block takes any
// shape. The padding keeps both parts 16-byte aligned when the block is (the CUDA GEMV loads a row's
// values 16 bytes at a time where the row allows it), and blocks laid end to end too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "runtime/core/dtype.h"

namespace ef {

struct BlockScaledFormat {
  DType dtype;
  int bits;         // per value: 4 (e2m1) or 8 (e4m3)
  int block_rows;   // rows sharing a scale
  int block_cols;   // columns sharing a scale
  int scale_bytes;  // 1 (e8m0) or 4 (fp32)

  static constexpr int64_t kAlign = 16;

  // The format of a block-scaled dtype (t must be kMxfp4 or kFp8Block).
  static constexpr BlockScaledFormat Of(DType t);

  // Whether a weight of `cols` columns has this format (whole bytes per row and whole e8m0 blocks).
  constexpr bool divides(int64_t cols) const { return cols > 0 && (bits == 8 || cols % block_cols == 0); }
  constexpr int64_t grid_rows(int64_t rows) const { return (rows + block_rows - 1) / block_rows; }
  constexpr int64_t grid_cols(int64_t cols) const { return (cols + block_cols - 1) / block_cols; }
  constexpr int64_t row_value_bytes(int64_t cols) const { return (cols * bits + 7) / 8; }
  constexpr int64_t scales_offset(int64_t rows, int64_t cols) const { return AlignUp(rows * row_value_bytes(cols)); }
  constexpr size_t bytes(int64_t rows, int64_t cols) const {
    return static_cast<size_t>(
        AlignUp(scales_offset(rows, cols) + grid_rows(rows) * grid_cols(cols) * int64_t{scale_bytes}));
  }

  static constexpr int64_t AlignUp(int64_t b) { return (b + kAlign - 1) / kAlign * kAlign; }
};

inline constexpr BlockScaledFormat kMxfp4Format{DType::kMxfp4, 4, 1, 32, 1};
inline constexpr BlockScaledFormat kFp8BlockFormat{DType::kFp8Block, 8, 128, 128, 4};

constexpr BlockScaledFormat BlockScaledFormat::Of(DType t) {
  return t == DType::kMxfp4 ? kMxfp4Format : kFp8BlockFormat;
}

// A 16-byte load of MXFP4 values is one block of 32; a 16-byte load of FP8 values never straddles
// two blocks of 128 columns (the CUDA kernels rely on both).
static_assert(kMxfp4Format.block_cols * kMxfp4Format.bits == 16 * 8);
static_assert(kFp8BlockFormat.block_cols % 16 == 0);
// gpt-oss-120b's down projection [2880, 2880]: 4.15 MB of values, 259 KB of scales.
static_assert(kMxfp4Format.bytes(2880, 2880) == 2880ull * 1440 + 2880ull * 90);
// DeepSeek-V3's expert gate [2048, 7168]: a 16 x 56 grid of fp32 scales.
static_assert(kFp8BlockFormat.bytes(2048, 7168) == 2048ull * 7168 + 16 * 56 * 4);
// Partial blocks: [130, 200] has a 2 x 2 grid; 26000 value bytes pad to 26000 (a multiple of 16).
static_assert(kFp8BlockFormat.bytes(130, 200) == 26000 + 16);

// The e2m1 values by code: sign in bit 3, then {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
inline constexpr float kE2m1Values[16] = {0.f,  0.5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                                          -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

// An e8m0 scale byte as fp32: 2^(s - 127) (subnormal for s = 0), NaN for 255.
inline float E8m0ToF32(uint8_t s) {
  const uint32_t bits = s == 0xff ? 0x7fc00000u : s == 0 ? 0x00400000u : static_cast<uint32_t>(s) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace ef
