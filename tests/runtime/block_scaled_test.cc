// The block-scaled weight formats (runtime/core/block_scaled_format.h, block_scaled.h): sizes,
// packing (GPT-OSS's interleaved gate/up rows), row dequantization against the checkpoint's
// reference dequantization, and the CPU backend's Gemm on packed weights, which must equal Gemm on
// the dequantized fp32 weights bit for bit (same values, same summation order).
#include "runtime/core/block_scaled.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"
#include "tests/runtime/block_scaled_weights.h"

namespace ef {
namespace {

using testing::RandomBlockScaled;

TEST(BlockScaledFormatTest, WeightBytesIsTheStoredSize) {
  // MXFP4: half a byte a value and a byte per 32 values; gpt-oss-120b's gate [2880, 2880].
  EXPECT_EQ(WeightBytes(DType::kMxfp4, 2880, 2880), 2880u * 2880 / 2 + 2880u * 2880 / 32);
  // 3 x 64: 96 value bytes, 6 scale bytes padded to 16.
  EXPECT_EQ(WeightBytes(DType::kMxfp4, 3, 64), 96u + 16);
  // Block FP8: a byte a value and 4 bytes per block of 128 x 128, partial blocks included.
  EXPECT_EQ(WeightBytes(DType::kFp8Block, 2048, 7168), 2048u * 7168 + 16 * 56 * 4);
  EXPECT_EQ(WeightBytes(DType::kFp8Block, 130, 200), 26000u + 16);  // a 2 x 2 grid
  EXPECT_EQ(WeightBytes(DType::kFp8Block, 5, 3), 16u + 16);         // 15 value bytes, one scale
  for (DType t : {DType::kMxfp4, DType::kFp8Block}) {
    EXPECT_EQ(WeightBytes(t, 64, 256) % 16, 0u) << DTypeName(t);
    EXPECT_TRUE(IsBlockScaled(t) && IsPackedWeight(t) && !IsQuantized(t) && !IsFloatWeight(t));
    EXPECT_EQ(DTypeSize(t), 0u);
    DType parsed;
    EXPECT_FALSE(ParseDType(DTypeName(t), &parsed)) << DTypeName(t) << " is the runtime's, no checkpoint's";
  }
  EXPECT_STREQ(DTypeName(DType::kMxfp4), "MXFP4");
  EXPECT_STREQ(DTypeName(DType::kFp8Block), "FP8B128");
}

TEST(BlockScaledFormatTest, RowsDequantizeToTheCheckpointsValues) {
  struct Case {
    DType t;
    int64_t rows, cols;
  };
  // FP8 shapes with partial blocks in both dimensions, and widths that are no multiple of 16.
  for (const Case& c : {Case{DType::kMxfp4, 7, 96}, Case{DType::kMxfp4, 64, 2880}, Case{DType::kFp8Block, 130, 200},
                        Case{DType::kFp8Block, 300, 257}, Case{DType::kFp8Block, 3, 5}}) {
    const testing::BlockScaledWeight w = RandomBlockScaled(c.t, c.rows, c.cols, 1);
    std::vector<float> row(static_cast<size_t>(c.cols));
    for (int64_t r = 0; r < c.rows; ++r) {
      DequantizeBlockScaledRow(c.t, w.packed.data(), c.rows, c.cols, r, row.data());
      ASSERT_EQ(std::memcmp(row.data(), &w.values[static_cast<size_t>(r * c.cols)], row.size() * sizeof(float)), 0)
          << DTypeName(c.t) << " [" << c.rows << ", " << c.cols << "] row " << r;
    }
  }
}

TEST(BlockScaledFormatTest, Mxfp4StrideTwoTakesInterleavedRows) {
  // Rows 2i and 2i + 1 of a fused [2I, H] gate_up projection become row i of gate and of up.
  const int64_t I = 5, H = 64;
  std::mt19937_64 rng(3);
  std::vector<uint8_t> blocks(2 * I * H / 2), scales(2 * I * H / 32);
  for (uint8_t& b : blocks) b = static_cast<uint8_t>(rng());
  for (uint8_t& s : scales) s = static_cast<uint8_t>(120 + rng() % 8);
  std::vector<std::byte> gate(WeightBytes(DType::kMxfp4, I, H)), up(gate.size()),
      fused(WeightBytes(DType::kMxfp4, 2 * I, H));
  PackMxfp4(blocks.data(), scales.data(), I, H, 2, gate.data());
  PackMxfp4(blocks.data() + H / 2, scales.data() + H / 32, I, H, 2, up.data());
  PackMxfp4(blocks.data(), scales.data(), 2 * I, H, 1, fused.data());
  std::vector<float> a(H), b(H);
  for (int64_t i = 0; i < I; ++i) {
    DequantizeBlockScaledRow(DType::kMxfp4, gate.data(), I, H, i, a.data());
    DequantizeBlockScaledRow(DType::kMxfp4, fused.data(), 2 * I, H, 2 * i, b.data());
    EXPECT_EQ(a, b) << "gate row " << i;
    DequantizeBlockScaledRow(DType::kMxfp4, up.data(), I, H, i, a.data());
    DequantizeBlockScaledRow(DType::kMxfp4, fused.data(), 2 * I, H, 2 * i + 1, b.data());
    EXPECT_EQ(a, b) << "up row " << i;
  }
}

TEST(BlockScaledCpuGemmTest, EqualsGemmOnTheDequantizedWeightsBitwise) {
  runtime::CpuBackend cpu;
  struct Case {
    DType t;
    int64_t n, k;
  };
  for (const Case& c :
       {Case{DType::kMxfp4, 96, 320}, Case{DType::kFp8Block, 130, 200}, Case{DType::kFp8Block, 257, 129}}) {
    const testing::BlockScaledWeight w = RandomBlockScaled(c.t, c.n, c.k, 4);
    auto wq = cpu.UploadWeight(c.t, w.packed.data(), c.n, c.k);
    ASSERT_TRUE(wq.ok()) << wq.status().ToString();
    std::mt19937_64 rng(5);
    std::normal_distribution<float> d(0.f, 1.f);
    std::vector<float> bias(static_cast<size_t>(c.n));
    for (float& v : bias) v = d(rng);
    const runtime::Weight wd{DType::kF32, w.values.data(), c.n, c.k}, b{DType::kF32, bias.data(), 1, c.n};
    for (int64_t m : {1, 3, 8}) {
      for (bool accumulate : {false, true}) {
        std::vector<float> x(static_cast<size_t>(m * c.k)), yq(static_cast<size_t>(m * c.n));
        for (float& v : x) v = d(rng);
        for (float& v : yq) v = d(rng);
        std::vector<float> yd = yq;
        cpu.Gemm(x.data(), m, *wq, &b, yq.data(), accumulate);
        cpu.Gemm(x.data(), m, wd, &b, yd.data(), accumulate);
        EXPECT_EQ(yq, yd) << DTypeName(c.t) << " [" << c.n << ", " << c.k << "] m=" << m;
      }
    }
  }
}

TEST(BlockScaledCpuGemmTest, UploadChecksTheBlockWidth) {
  runtime::CpuBackend cpu;
  std::vector<std::byte> q(WeightBytes(DType::kMxfp4, 2, 64));
  EXPECT_TRUE(cpu.UploadWeight(DType::kMxfp4, q.data(), 2, 64).ok());
  auto bad = cpu.UploadWeight(DType::kMxfp4, q.data(), 2, 48);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("MXFP4 weight's cols (48) must be a multiple of its group (32)"),
            std::string::npos)
      << bad.status().message();
  EXPECT_TRUE(cpu.UploadWeight(DType::kFp8Block, q.data(), 2, 5).ok());  // any shape: partial blocks
}

}  // namespace
}  // namespace ef
