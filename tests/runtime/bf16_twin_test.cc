// bf16 twins on the CPU backend (Backend::Bf16Twins): RmsNormTwin and GatherRowsTwin write what
// RmsNorm and GatherRows write, and beside it every value rounded to the nearest bf16 (ties to the
// even one; infinities and signed zeros kept, NaN stays NaN), checked against a rounding computed
// here from the two bf16 neighbours of each value; the CPU asks for no twins (its GEMMs read fp32),
// and its GemmGroup ignores one. The CUDA kernels are checked against these bits in
// tests/gpu/cuda_ops_test.cc.
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

// The nearest bf16 of a finite or infinite f, found among its two bf16 neighbours by distance
// (in double), a tie to the one with an even last mantissa bit: independent of F32ToBf16's
// carry trick.
uint16_t NearestBf16(float f) {
  const uint32_t b = Bits(f);
  const auto down = static_cast<uint16_t>(b >> 16);  // toward zero
  if ((b & 0xffffu) == 0 || std::isinf(f)) return down;
  const auto up = static_cast<uint16_t>(down + 1);  // away from zero (0x7f80 past the largest: inf)
  const double d_down = std::abs(double(f) - double(FromBits(uint32_t{down} << 16)));
  // Past the largest bf16 the next step up is 2^128 (overflowing to inf), as rounding sees it.
  const double up_value =
      (up & 0x7fffu) == 0x7f80u ? std::copysign(std::ldexp(1.0, 128), double(f)) : double(FromBits(uint32_t{up} << 16));
  const double d_up = std::abs(double(f) - up_value);
  if (d_down != d_up) return d_down < d_up ? down : up;
  return (down & 1u) == 0 ? down : up;
}

void ExpectTwin(const std::vector<float>& values, const std::vector<uint16_t>& twin) {
  ASSERT_EQ(values.size(), twin.size());
  for (size_t i = 0; i < values.size(); ++i) {
    if (std::isnan(values[i])) {
      ASSERT_TRUE(std::isnan(Bf16ToF32(twin[i]))) << i;
      continue;
    }
    ASSERT_EQ(twin[i], NearestBf16(values[i])) << i << ": " << values[i];
  }
}

Weight F32Weight(const std::vector<float>& v, int64_t rows, int64_t cols) {
  Weight w;
  w.data = v.data();
  w.dtype = DType::kF32;
  w.rows = rows;
  w.cols = cols;
  return w;
}

TEST(Bf16TwinTest, TheReferenceRoundingIsToNearestEven) {
  EXPECT_EQ(NearestBf16(FromBits(0x3f808000u)), 0x3f80);  // 1 + 2^-8: a tie, 0x3f80 is even
  EXPECT_EQ(NearestBf16(FromBits(0x3f818000u)), 0x3f82);  // a tie, up to the even 0x3f82
  EXPECT_EQ(NearestBf16(FromBits(0x3f808001u)), 0x3f81);  // past the tie
  EXPECT_EQ(NearestBf16(FromBits(0xbf818000u)), 0xbf82);  // negative: the same by magnitude
  EXPECT_EQ(NearestBf16(FromBits(0x7f7fffffu)), 0x7f80);  // the largest float rounds to inf
}

TEST(Bf16TwinTest, RmsNormTwinIsRmsNormRounded) {
  CpuBackend cpu;
  const int rows = 5, dim = 96;
  const auto x = Random(rows * dim, 1);
  const auto g = Random(dim, 2);
  const Weight w = F32Weight(g, 1, dim);
  std::vector<float> want(x.size()), got(x.size());
  std::vector<uint16_t> twin(x.size(), 0xffff);
  cpu.RmsNorm(x.data(), rows, dim, w, 1e-5f, want.data());
  cpu.RmsNormTwin(x.data(), rows, dim, w, 1e-5f, got.data(), twin.data());
  EXPECT_EQ(got, want);
  ExpectTwin(want, twin);
  // In place (out aliasing x): the same.
  std::vector<float> inplace = x;
  std::vector<uint16_t> twin2(x.size(), 0xffff);
  cpu.RmsNormTwin(inplace.data(), rows, dim, w, 1e-5f, inplace.data(), twin2.data());
  EXPECT_EQ(inplace, want);
  EXPECT_EQ(twin2, twin);
}

TEST(Bf16TwinTest, GatherRowsTwinIsGatherRowsRounded) {
  // Copied values keep their bits, so ties, infinities, signed zeros and NaN reach the rounding.
  CpuBackend cpu;
  const int n_src = 9, dim = 40;
  auto src = Random(n_src * dim, 3);
  src[0] = FromBits(0x3f808000u);  // ties
  src[1] = FromBits(0x3f818000u);
  src[2] = FromBits(0xc0018000u);
  src[3] = std::numeric_limits<float>::infinity();
  src[4] = -0.0f;
  src[5] = std::numeric_limits<float>::quiet_NaN();
  src[6] = FromBits(0x7f7fffffu);
  src[7] = std::numeric_limits<float>::denorm_min();
  const std::vector<int32_t> idx = {4, 0, 8, 4, 2, 7, 7};
  const int64_t n = static_cast<int64_t>(idx.size());
  std::vector<float> want(n * dim), got(n * dim);
  std::vector<uint16_t> twin(n * dim);
  cpu.GatherRows(src.data(), idx.data(), n, dim, want.data());
  cpu.GatherRowsTwin(src.data(), idx.data(), n, dim, got.data(), twin.data());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
  ExpectTwin(want, twin);
  // dst row 1 is src row 0.
  EXPECT_EQ(twin[1 * dim + 0], 0x3f80);
  EXPECT_EQ(twin[1 * dim + 1], 0x3f82);
  EXPECT_EQ(twin[1 * dim + 2], 0xc002);
  EXPECT_EQ(twin[1 * dim + 3], 0x7f80);
  EXPECT_EQ(twin[1 * dim + 4], 0x8000);
  EXPECT_EQ(twin[1 * dim + 6], 0x7f80);
  EXPECT_EQ(twin[1 * dim + 7], 0x0000);
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
