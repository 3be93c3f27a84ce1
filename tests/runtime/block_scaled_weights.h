// Test helper: random packed block-scaled weights (runtime/core/block_scaled_format.h) with valid
// codes and scales, and their fp32 values by the checkpoint's reference dequantization
// (runtime/model/checkpoint_quant.h), for the CPU and GPU Gemm tests.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "runtime/core/block_scaled.h"
#include "runtime/model/checkpoint_quant.h"
#include "runtime/model/safetensors_file.h"

namespace ef::testing {

struct BlockScaledWeight {
  DType dtype;
  int64_t rows, cols;
  std::vector<std::byte> packed;  // WeightBytes(dtype, rows, cols)
  std::vector<float> values;      // [rows, cols], DequantizeMxfp4 / DequantizeFp8 into F32
};

// Codes uniform over the non-NaN ones; MXFP4 scales 2^-8 .. 2^-3, FP8 scales in [0.5, 2] / 448
// (weights of order 0.1 and activations of order 1 keep products in a range fp32 sums well).
inline BlockScaledWeight RandomBlockScaled(DType t, int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  BlockScaledWeight w{t, rows, cols, std::vector<std::byte>(WeightBytes(t, rows, cols)),
                      std::vector<float>(static_cast<size_t>(rows * cols))};
  const BlockScaledFormat f = BlockScaledFormat::Of(t);
  if (t == DType::kMxfp4) {
    std::vector<uint8_t> blocks(static_cast<size_t>(rows * cols / 2)), scales(static_cast<size_t>(rows * cols / 32));
    for (uint8_t& b : blocks) b = static_cast<uint8_t>(rng());
    for (uint8_t& s : scales) s = static_cast<uint8_t>(119 + rng() % 6);
    PackMxfp4(blocks.data(), scales.data(), rows, cols, /*row_stride=*/1, w.packed.data());
    EXPECT_TRUE(
        runtime::DequantizeMxfp4(blocks.data(), scales.data(), rows, cols, DType::kF32, w.values.data(), "w").ok());
    return w;
  }
  std::vector<uint8_t> q(static_cast<size_t>(rows * cols));
  for (uint8_t& c : q) {
    do c = static_cast<uint8_t>(rng());
    while ((c & 0x7f) == 0x7f);
  }
  std::vector<float> grid(static_cast<size_t>(f.grid_rows(rows) * f.grid_cols(cols)));
  std::uniform_real_distribution<float> d(0.5f, 2.f);
  for (float& s : grid) s = d(rng) / 448.f;
  PackFp8Block(q.data(), grid.data(), rows, cols, w.packed.data());
  const runtime::TensorView qv{
      "q", DType::kF8E4M3, {rows, cols}, reinterpret_cast<const std::byte*>(q.data()), q.size()};
  const runtime::TensorView sv{"s",
                               DType::kF32,
                               {f.grid_rows(rows), f.grid_cols(cols)},
                               reinterpret_cast<const std::byte*>(grid.data()),
                               grid.size() * sizeof(float)};
  EXPECT_TRUE(runtime::DequantizeFp8(qv, sv, f.block_rows, f.block_cols, DType::kF32, w.values.data()).ok());
  return w;
}

}  // namespace ef::testing
