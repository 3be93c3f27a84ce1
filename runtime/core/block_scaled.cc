#include "runtime/core/block_scaled.h"

#include <array>
#include <cstddef>
#include <cstring>

namespace ef {
namespace {

// Zeroes the padding after the values and after the scales, so that equal weights give equal
// blocks (caches and tests compare them byte for byte).
void ZeroPadding(const BlockScaledFormat& f, int64_t rows, int64_t cols, std::byte* dst) {
  const int64_t values_end = rows * f.row_value_bytes(cols), scales_begin = f.scales_offset(rows, cols);
  const int64_t scales_end = scales_begin + f.grid_rows(rows) * f.grid_cols(cols) * f.scale_bytes;
  std::memset(dst + values_end, 0, static_cast<size_t>(scales_begin - values_end));
  std::memset(dst + scales_end, 0, f.bytes(rows, cols) - static_cast<size_t>(scales_end));
}

}  // namespace

void PackMxfp4(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t cols, int64_t row_stride,
               void* dst) {
  const BlockScaledFormat f = kMxfp4Format;
  auto* out = static_cast<std::byte*>(dst);
  const size_t value_bytes = static_cast<size_t>(f.row_value_bytes(cols));
  const size_t scale_bytes = static_cast<size_t>(f.grid_cols(cols));
  std::byte* out_scales = out + f.scales_offset(rows, cols);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t src = r * row_stride;
    std::memcpy(out + static_cast<size_t>(r) * value_bytes, blocks + static_cast<size_t>(src) * value_bytes,
                value_bytes);
    std::memcpy(out_scales + static_cast<size_t>(r) * scale_bytes, scales + static_cast<size_t>(src) * scale_bytes,
                scale_bytes);
  }
  ZeroPadding(f, rows, cols, out);
}

void PackFp8Block(const uint8_t* q, const void* scale_inv, int64_t rows, int64_t cols, void* dst) {
  const BlockScaledFormat f = kFp8BlockFormat;
  auto* out = static_cast<std::byte*>(dst);
  std::memcpy(out, q, static_cast<size_t>(rows * cols));
  std::memcpy(out + f.scales_offset(rows, cols), scale_inv,
              static_cast<size_t>(f.grid_rows(rows) * f.grid_cols(cols)) * sizeof(float));
  ZeroPadding(f, rows, cols, out);
}

void DequantizeBlockScaledRow(DType t, const void* src, int64_t rows, int64_t cols, int64_t row, float* dst) {
  const BlockScaledFormat f = BlockScaledFormat::Of(t);
  const auto* base = static_cast<const uint8_t*>(src);
  const uint8_t* values = base + row * f.row_value_bytes(cols);
  const uint8_t* scales = base + f.scales_offset(rows, cols) + (row / f.block_rows) * f.grid_cols(cols) * f.scale_bytes;
  if (t == DType::kMxfp4) {
    for (int64_t g = 0; g < cols / f.block_cols; ++g) {
      const float s = E8m0ToF32(scales[g]);
      const uint8_t* b = values + g * f.block_cols / 2;
      float* o = dst + g * f.block_cols;
      for (int k = 0; k < f.block_cols / 2; ++k) {
        o[2 * k] = kE2m1Values[b[k] & 0xfu] * s;
        o[2 * k + 1] = kE2m1Values[b[k] >> 4] * s;
      }
    }
    return;
  }
  static const std::array<float, 256> kE4m3 = [] {
    std::array<float, 256> v{};
    for (int i = 0; i < 256; ++i) v[static_cast<size_t>(i)] = F8E4M3ToF32(static_cast<uint8_t>(i));
    return v;
  }();
  for (int64_t c0 = 0; c0 < cols; c0 += f.block_cols) {
    float s;  // copied: the block is bytes, not floats
    std::memcpy(&s, scales + (c0 / f.block_cols) * f.scale_bytes, sizeof(float));
    const int64_t end = c0 + f.block_cols < cols ? c0 + f.block_cols : cols;
    for (int64_t c = c0; c < end; ++c) dst[c] = kE4m3[values[c]] * s;
  }
}

}  // namespace ef
