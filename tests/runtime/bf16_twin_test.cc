// bf16 twins on the CPU backend (Backend::Bf16Twins): RmsNormTwin and GatherRowsTwin write what
// RmsNorm and GatherRows write, and beside it every value rounded to bf16 to nearest even, ties
// and NaN included; the CPU asks for no twins (its GEMMs read fp32), and GemmGroup ignores one.
// The CUDA kernels are checked against these bits in tests/gpu/cuda_ops_test.cc.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"

namespace ef::runtime {
namespace {

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

Weight F32Weight(const std::vector<float>& v, int64_t rows, int64_t cols) {
  Weight w;
  w.data = v.data();
  w.dtype = DType::kF32;
  w.rows = rows;
  w.cols = cols;
  return w;
}

TEST(Bf16TwinTest, RoundingIsToNearestEven) {
  // Halfway between two bf16 values: to the even one; just past halfway: up; NaN stays NaN.
  EXPECT_EQ(F32ToBf16(FromBits(0x3f808000u)), 0x3f80);  // 1 + 2^-8: tie, 0x3f80 is even
  EXPECT_EQ(F32ToBf16(FromBits(0x3f818000u)), 0x3f82);  // tie, rounds up to the even 0x3f82
  EXPECT_EQ(F32ToBf16(FromBits(0x3f808001u)), 0x3f81);
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(Bf16TwinTest, RmsNormTwinIsRmsNormRounded) {
  CpuBackend cpu;
  const int rows = 5, dim = 96;
  auto x = Random(rows * dim, 1);
  // Values on exact ties between two bf16 neighbours, so the rounding rule shows.
  x[7] = FromBits(0x40018000u);
  x[8] = FromBits(0x40008000u);
  const auto g = Random(dim, 2);
  const Weight w = F32Weight(g, 1, dim);
  std::vector<float> want(x.size()), got(x.size());
  std::vector<uint16_t> twin(x.size(), 0xffff);
  cpu.RmsNorm(x.data(), rows, dim, w, 1e-5f, want.data());
  cpu.RmsNormTwin(x.data(), rows, dim, w, 1e-5f, got.data(), twin.data());
  EXPECT_EQ(got, want);
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(twin[i], F32ToBf16(got[i])) << i;
    // Within half a bf16 ulp of the fp32 value (8 mantissa bits).
    ASSERT_LE(std::abs(Bf16ToF32(twin[i]) - got[i]), std::ldexp(std::abs(got[i]), -8)) << i;
  }
  // In place, as QK-norm runs it.
  std::vector<float> inplace = x;
  cpu.RmsNormTwin(inplace.data(), rows, dim, w, 1e-5f, inplace.data(), twin.data());
  EXPECT_EQ(inplace, want);
}

TEST(Bf16TwinTest, GatherRowsTwinIsGatherRowsRounded) {
  CpuBackend cpu;
  const int n_src = 9, dim = 40;
  auto src = Random(n_src * dim, 3);
  src[3] = std::numeric_limits<float>::infinity();
  src[4] = -0.0f;
  const std::vector<int32_t> idx = {4, 0, 8, 4, 2, 7, 7};
  const int64_t n = static_cast<int64_t>(idx.size());
  std::vector<float> want(n * dim), got(n * dim);
  std::vector<uint16_t> twin(n * dim);
  cpu.GatherRows(src.data(), idx.data(), n, dim, want.data());
  cpu.GatherRowsTwin(src.data(), idx.data(), n, dim, got.data(), twin.data());
  EXPECT_EQ(got, want);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(twin[i], F32ToBf16(got[i])) << i;
  EXPECT_EQ(twin[1 * dim + 3], F32ToBf16(std::numeric_limits<float>::infinity()));
  EXPECT_EQ(Bits(Bf16ToF32(twin[1 * dim + 4])), Bits(-0.0f));  // dst row 1 is src row 0
}

TEST(Bf16TwinTest, TheCpuWantsNoTwinAndGemmGroupReadsFp32) {
  CpuBackend cpu;
  EXPECT_FALSE(cpu.Bf16Twins(2048, DType::kBF16));
  const int m = 4, k = 64, n = 24;
  const auto x = Random(m * k, 5);
  const auto wv = Random(n * k, 6);
  const Weight w = F32Weight(wv, n, k);
  std::vector<float> want(m * n), got(m * n);
  cpu.Gemm(x.data(), m, w, nullptr, want.data(), false);
  // A twin that disagrees with x: the CPU computes from x, so it cannot matter.
  std::vector<uint16_t> wrong(m * k, F32ToBf16(100.f));
  const Weight* ws[] = {&w};
  const Weight* bs[] = {nullptr};
  float* ys[] = {got.data()};
  cpu.GemmGroup(x.data(), wrong.data(), m, 1, ws, bs, ys);
  EXPECT_EQ(got, want);
}

}  // namespace
}  // namespace ef::runtime
