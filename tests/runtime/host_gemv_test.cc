// HostGemv (the host kernel for experts computed on the CPU) against the CPU backend's Gemm, the
// exact reference: every weight type, 1..9 rows of x (blocks of kHostGemvMaxRows and a ragged
// last block), widths the vector path takes (multiples of 64) and one it does not; quantized
// weights with x in fp32 and in int8 (against the Gemm of x rounded as RoundToInt8Groups says).
#include "runtime/backend/cpu/host_gemv.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/core/quant.h"

namespace ef::runtime {
namespace {

struct Case {
  DType dtype;
  int64_t rows, cols;
};

// A weight of `dtype` made from normal values; the bytes live in `store`.
Weight MakeWeight(DType dtype, int64_t rows, int64_t cols, std::mt19937& rng, std::vector<std::byte>& store) {
  std::normal_distribution<float> nd(0.f, 0.5f);
  std::vector<float> f(static_cast<size_t>(rows * cols));
  for (float& v : f) v = nd(rng);
  Weight w{dtype, nullptr, rows, cols};
  store.assign(w.nbytes(), std::byte{0});
  if (dtype == DType::kF32) {
    std::memcpy(store.data(), f.data(), store.size());
  } else if (dtype == DType::kBF16) {
    auto* b = reinterpret_cast<uint16_t*>(store.data());
    for (size_t i = 0; i < f.size(); ++i) b[i] = F32ToBf16(f[i]);
  } else {
    auto n = Quantize(dtype, DType::kF32, f.data(), rows, cols, store.data(), store.size());
    EXPECT_TRUE(n.ok()) << n.status().ToString();
  }
  w.data = store.data();
  return w;
}

// x as HostGemv multiplies w with it: rounded to int8 groups where it takes x in int8.
std::vector<float> AsMultiplied(const std::vector<float>& x, int64_t m, int64_t k, const Weight& w, HostPath a) {
  if (HostGemvPath(w, a) != HostPath::kInt8X) return x;
  std::vector<float> r(x.size());
  RoundToInt8Groups(x.data(), m, k, r.data());
  return r;
}

constexpr HostPath kPaths[] = {HostPath::kDefault, HostPath::kFloat, HostPath::kInt8X, HostPath::kAmx};

TEST(HostGemv, MatchesTheCpuBackendForEveryTypeAndRowCount) {
  std::mt19937 rng(7);
  ThreadPool pool(3);
  CpuBackend cpu(&pool);
  const Case cases[] = {{DType::kF32, 37, 128}, {DType::kBF16, 70, 192}, {DType::kQ8, 33, 256},
                        {DType::kQ4, 65, 128},  {DType::kBF16, 9, 40},   {DType::kQ8, 5, 64},
                        {DType::kQ4, 21, 1280}, {DType::kQ8, 21, 1280},  {DType::kBF16, 403, 256}};
  for (const Case& c : cases) {
    std::vector<std::byte> store;
    const Weight w = MakeWeight(c.dtype, c.rows, c.cols, rng, store);
    EXPECT_EQ(HostGemvVectorized(w), HostGemvVectorized(Weight{DType::kF32, store.data(), 1, 64}) && c.cols % 64 == 0)
        << DTypeName(c.dtype) << " " << c.cols;
    for (HostPath a : kPaths) {
      // Only quantized weights take x in int8, only bf16 ones go to AMX; the rest is kFloat.
      const HostPath use = HostGemvPath(w, a);
      const bool quantized = c.dtype == DType::kQ8 || c.dtype == DType::kQ4;
      if (use == HostPath::kInt8X) {
        EXPECT_TRUE(quantized && a != HostPath::kFloat && a != HostPath::kAmx);
      }
      if (use == HostPath::kAmx) {
        EXPECT_TRUE(c.dtype == DType::kBF16 && a != HostPath::kFloat && a != HostPath::kInt8X);
      }
      if (a == HostPath::kFloat) {
        EXPECT_EQ(use, HostPath::kFloat);
      }
      for (int64_t m : {1, 2, 3, 4, 5, 9, 16, 19}) {
        std::normal_distribution<float> nd(0.f, 1.f);
        std::vector<float> x(static_cast<size_t>(m * c.cols));
        for (float& v : x) v = nd(rng);
        const std::vector<float> xm = AsMultiplied(x, m, c.cols, w, a);
        std::vector<float> want(static_cast<size_t>(m * c.rows)), got(want.size(), -1.f);
        cpu.Gemm(xm.data(), m, w, nullptr, want.data(), false);
        HostGemv(pool, x.data(), m, w, got.data(), {}, a);
        // Summation order differs: bound by the row's magnitude, sum |x| |w| ~ cols * 0.8 * 0.4.
        const double tol = 1e-5 * static_cast<double>(c.cols);
        for (size_t i = 0; i < want.size(); ++i)
          ASSERT_NEAR(got[i], want[i], tol)
              << DTypeName(c.dtype) << " path " << static_cast<int>(use) << " m " << m << " at " << i;
      }
    }
  }
}

// x in int8 against x in fp32: each value moves by at most its group's max / 254, about 0.6%
// relative error per output for normal x (a group with a 20x outlier: ~1.5%).
TEST(HostGemv, Int8ActivationsStayCloseToTheFloatProduct) {
  std::mt19937 rng(3);
  ThreadPool pool(2);
  CpuBackend cpu(&pool);
  for (DType t : {DType::kQ8, DType::kQ4}) {
    std::vector<std::byte> store;
    const Weight w = MakeWeight(t, 96, 1024, rng, store);
    std::normal_distribution<float> nd(0.f, 1.f);
    const int64_t m = 3;
    std::vector<float> x(static_cast<size_t>(m * w.cols));
    for (float& v : x) v = nd(rng);
    std::vector<float> exact(static_cast<size_t>(m * w.rows)), got(exact.size());
    cpu.Gemm(x.data(), m, w, nullptr, exact.data(), false);
    HostGemv(pool, x.data(), m, w, got.data(), {}, HostPath::kInt8X);
    double err = 0, norm = 0;
    for (size_t i = 0; i < exact.size(); ++i) {
      err += (got[i] - exact[i]) * (got[i] - exact[i]);
      norm += exact[i] * exact[i];
    }
    const double rel = std::sqrt(err / norm);
    EXPECT_LT(rel, 1e-2) << DTypeName(t);
    if (HostGemvPath(w, HostPath::kInt8X) == HostPath::kInt8X)
      EXPECT_GT(rel, 0) << DTypeName(t) << ": x was not rounded";
    else
      EXPECT_LT(rel, 1e-5) << DTypeName(t);
  }
}

// A group of zeros stays zero; a NaN reaches the outputs of its row only, as in the fp32 product.
TEST(HostGemv, Int8ActivationsKeepZerosAndNaNs) {
  std::mt19937 rng(5);
  ThreadPool pool(2);
  for (DType t : {DType::kQ8, DType::kQ4}) {
    std::vector<std::byte> store;
    const Weight w = MakeWeight(t, 8, 128, rng, store);
    std::vector<float> x(3 * 128, 0.f), y(3 * 8, -1.f);
    for (int c = 64; c < 128; ++c) x[c] = 0.5f;            // row 0: a zero group, then a constant one
    x[128 + 7] = std::numeric_limits<float>::quiet_NaN();  // row 1: NaN
    HostGemv(pool, x.data(), 3, w, y.data(), {}, HostPath::kInt8X);
    for (int j = 0; j < 8; ++j) {
      EXPECT_TRUE(std::isfinite(y[j])) << DTypeName(t);
      EXPECT_TRUE(std::isnan(y[8 + j])) << DTypeName(t) << " output " << j;
      EXPECT_EQ(y[16 + j], 0.f) << DTypeName(t);  // row 2: all zeros
    }
  }
}

// Without knobs: int4 weights take x in int8 where the CPU has VNNI, int8 weights keep it in fp32
// (their quality would suffer), bf16 weights go to AMX where the CPU has it.
TEST(HostGemv, DefaultPathsPerWeightType) {
  std::vector<std::byte> store(1 << 16);
  auto path = [&](DType t) { return HostGemvPath(Weight{t, store.data(), 4, 128}); };
  EXPECT_EQ(path(DType::kQ8), HostPath::kFloat);
  EXPECT_EQ(path(DType::kF32), HostPath::kFloat);
  EXPECT_EQ(path(DType::kQ4), HostGemvPath(Weight{DType::kQ4, store.data(), 4, 128}, HostPath::kInt8X));
  EXPECT_EQ(path(DType::kBF16), HostGemvPath(Weight{DType::kBF16, store.data(), 4, 128}, HostPath::kAmx));
  // A width off the vector path takes the exact path whatever is asked.
  EXPECT_EQ(HostGemvPath(Weight{DType::kQ4, store.data(), 4, 96}, HostPath::kInt8X), HostPath::kFloat);
}

// Groups at the edges of fp32: values near FLT_MAX stay finite, tiny values count as zeros, an
// infinity turns its row NaN; the kernels agree with RoundToInt8Groups on each.
TEST(HostGemv, Int8ActivationsAtTheEdgesOfFloat) {
  std::mt19937 rng(17);
  ThreadPool pool(2);
  CpuBackend cpu(&pool);
  for (DType t : {DType::kQ8, DType::kQ4}) {
    std::vector<std::byte> store;
    const Weight w = MakeWeight(t, 8, 192, rng, store);
    std::vector<float> x(4 * 192, 0.f);
    for (int c = 0; c < 64; ++c) x[c] = 1e37f * static_cast<float>(c % 5 - 2);  // row 0: sum overflows
    for (int c = 64; c < 192; ++c) x[c] = 1e-3f * static_cast<float>(c % 7 - 3);
    for (int c = 0; c < 64; ++c) x[192 + c] = 1e-38f * static_cast<float>(c % 3);  // row 1: tiny group
    for (int c = 64; c < 192; ++c) x[192 + c] = static_cast<float>(c % 11) - 5.f;
    x[2 * 192 + 100] = -std::numeric_limits<float>::infinity();  // row 2
    // Row 3: exact ties of the rounding (each group's max is 127, so q = x): to even, 0.5 -> 0.
    for (int c = 0; c < 192; ++c) x[3 * 192 + c] = c % 64 == 0 ? 127.f : static_cast<float>(c % 4) + 0.5f;
    std::vector<float> rounded(x.size()), want(4 * 8), got(4 * 8);
    RoundToInt8Groups(x.data(), 4, 192, rounded.data());
    for (int c = 0; c < 64; ++c) EXPECT_EQ(rounded[192 + c], 0.f);
    for (int c = 1; c < 8; ++c) EXPECT_EQ(rounded[3 * 192 + c], static_cast<float>((c % 4 + 1) / 2 * 2)) << c;
    cpu.Gemm(rounded.data(), 4, w, nullptr, want.data(), false);
    HostGemv(pool, x.data(), 4, w, got.data(), {}, HostPath::kInt8X);
    for (int j = 0; j < 8; ++j) {
      EXPECT_TRUE(std::isnan(got[16 + j])) << DTypeName(t) << " " << j;
      for (int i : {0, 1, 3}) {
        ASSERT_TRUE(std::isfinite(got[i * 8 + j])) << DTypeName(t) << " row " << i;
        EXPECT_NEAR(got[i * 8 + j], want[i * 8 + j], 1e-5 * std::fabs(want[i * 8 + j]) + 1e-4)
            << DTypeName(t) << " row " << i << " output " << j;
      }
    }
  }
}

TEST(HostGemv, RoundToInt8GroupsRoundsEachGroupToItsOwnScale) {
  std::vector<float> x(128), out(128);
  for (int c = 0; c < 64; ++c) x[c] = static_cast<float>(c - 32) / 32.f;   // max 1: steps of 1/127
  for (int c = 64; c < 128; ++c) x[c] = 10.f * static_cast<float>(c % 3);  // multiples of the step, 10
  x[127] = 1270.f;
  RoundToInt8Groups(x.data(), 1, 128, out.data());
  for (int c = 0; c < 64; ++c) {
    EXPECT_NEAR(out[c], x[c], 0.5f / 127.f + 1e-6f) << c;
    EXPECT_FLOAT_EQ(out[c], std::nearbyint(x[c] * 127.f) / 127.f) << c;
  }
  for (int c = 64; c < 128; ++c) EXPECT_FLOAT_EQ(out[c], x[c]) << c;
  // A non-finite value makes its whole group NaN (the kernels scale the group by NaN).
  x[3] = std::numeric_limits<float>::infinity();
  RoundToInt8Groups(x.data(), 1, 128, out.data());
  for (int c = 0; c < 64; ++c) EXPECT_TRUE(std::isnan(out[c])) << c;
  EXPECT_FLOAT_EQ(out[64], x[64]);
}

// A block of rows and columns is the whole product restricted to those rows, with x zero outside
// the block's columns (how a missed expert split between GPU and host uses it).
TEST(HostGemv, BlocksAreTheWholeProductRestricted) {
  std::mt19937 rng(11);
  ThreadPool pool(3);
  CpuBackend cpu(&pool);
  struct BlockCase {
    DType dtype;
    int64_t rows, cols;
    GemvBlock block;
  };
  const BlockCase cases[] = {
      {DType::kBF16, 40, 256, {8, 40, 64, 256}},   {DType::kBF16, 40, 256, {0, 13, 0, 128}},
      {DType::kQ8, 33, 256, {5, 33, 128, 256}},    {DType::kQ4, 65, 384, {0, 65, 192, 384}},
      {DType::kQ4, 20, 128, {3, 19, 64, -1}},      {DType::kF32, 17, 128, {0, -1, 64, -1}},
      {DType::kBF16, 9, 100, {2, 7, 10, 90}},      {DType::kF32, 12, 192, {0, 12, 17, 150}},
      {DType::kQ8, 10, 128, {0, -1, 0, -1}},       {DType::kQ8, 12, 2112, {2, 11, 960, 2112}},
      {DType::kQ4, 12, 2112, {0, 12, 1088, 2048}},
  };
  for (const BlockCase& c : cases) {
    std::vector<std::byte> store;
    const Weight w = MakeWeight(c.dtype, c.rows, c.cols, rng, store);
    const int64_t r0 = c.block.row_begin, r1 = c.block.row_end < 0 ? c.rows : c.block.row_end;
    const int64_t c0 = c.block.col_begin, c1 = c.block.col_end < 0 ? c.cols : c.block.col_end;
    for (auto [m, a] : {std::pair{1, HostPath::kFloat},
                        {3, HostPath::kFloat},
                        {6, HostPath::kFloat},
                        {1, HostPath::kInt8X},
                        {5, HostPath::kInt8X},
                        {1, HostPath::kAmx},
                        {6, HostPath::kAmx},
                        {17, HostPath::kAmx}}) {
      std::normal_distribution<float> nd(0.f, 1.f);
      const int64_t k = c1 - c0;
      std::vector<float> x(static_cast<size_t>(m * k)), padded(static_cast<size_t>(m * c.cols), 0.f);
      for (float& v : x) v = nd(rng);
      // The block's x as multiplied (its columns start at a group boundary when it goes int8).
      const bool int8 = HostGemvPath(w, a) == HostPath::kInt8X && c0 % 64 == 0 && k % 64 == 0;
      std::vector<float> xm = x;
      if (int8) RoundToInt8Groups(x.data(), m, k, xm.data());
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = c0; j < c1; ++j) padded[i * c.cols + j] = xm[i * k + j - c0];
      std::vector<float> full(static_cast<size_t>(m * c.rows)), got(static_cast<size_t>(m * (r1 - r0)), -1.f);
      cpu.Gemm(padded.data(), m, w, nullptr, full.data(), false);
      HostGemv(pool, x.data(), m, w, got.data(), c.block, a);
      const double tol = 1e-5 * static_cast<double>(c.cols);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = r0; j < r1; ++j)
          ASSERT_NEAR(got[i * (r1 - r0) + j - r0], full[i * c.rows + j], tol)
              << DTypeName(c.dtype) << " block rows [" << r0 << "," << r1 << ") cols [" << c0 << "," << c1 << ") m "
              << m << " row " << i << " col " << j;
    }
  }
}

// Every path gives the same bits whatever the thread count and the rows of x beside a row: a
// token's outputs depend neither on the machine's cores nor on its batch.
TEST(HostGemv, OutputsDependOnNeitherThreadsNorBatch) {
  std::mt19937 rng(13);
  ThreadPool one(1), three(3);
  for (DType t : {DType::kF32, DType::kBF16, DType::kQ8, DType::kQ4}) {
    std::vector<std::byte> store;
    const Weight w = MakeWeight(t, 403, 256, rng, store);  // 25 blocks of 16 rows and a tail of 3
    const int64_t m = 19;
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> x(static_cast<size_t>(m * w.cols));
    for (float& v : x) v = nd(rng);
    for (HostPath a : kPaths) {
      std::vector<float> batch(static_cast<size_t>(m * w.rows)), threads(batch.size()), alone(w.rows);
      HostGemv(one, x.data(), m, w, batch.data(), {}, a);
      HostGemv(three, x.data(), m, w, threads.data(), {}, a);
      EXPECT_EQ(batch, threads) << DTypeName(t) << " path " << static_cast<int>(HostGemvPath(w, a));
      for (int64_t i = 0; i < m; ++i) {
        HostGemv(three, x.data() + i * w.cols, 1, w, alone.data(), {}, a);
        for (int64_t j = 0; j < w.rows; ++j)
          ASSERT_EQ(alone[j], batch[i * w.rows + j])
              << DTypeName(t) << " path " << static_cast<int>(HostGemvPath(w, a)) << " row " << i << " output " << j;
      }
    }
  }
}

// Against an identity weight every path returns x itself, bit for bit: the AMX path's three bf16
// parts hold all of x's bits, including values next to FLT_MAX (rounding the first part up would
// give inf there) and ones that need all 24 bits.
TEST(HostGemv, IdentityWeightsReturnEveryBitOfX) {
  ThreadPool pool(2);
  const int64_t n = 24, k = 64;
  std::vector<uint16_t> w(static_cast<size_t>(n * k), 0);
  for (int64_t j = 0; j < n; ++j) w[j * k + j] = 0x3F80;  // 1.0
  const Weight weight{DType::kBF16, w.data(), n, k};
  std::vector<float> x(static_cast<size_t>(2 * k), 0.f);
  const float special[] = {1.f + 0x1p-9f,  1.f + 0x1p-17f, 1.f + 0x1p-23f, -0.f,         3.3962e38f,
                           -3.4028235e38f, 1e-20f,         -7.25e-3f,      0x1.fffffep0f};
  for (size_t i = 0; i < std::size(special); ++i) x[i] = special[i];
  std::mt19937 rng(19);
  std::uniform_real_distribution<float> ud(-1e6f, 1e6f);
  for (int64_t c = std::size(special); c < 2 * k; ++c) x[c] = ud(rng);
  for (HostPath a : kPaths) {
    std::vector<float> y(static_cast<size_t>(2 * n), -1.f);
    HostGemv(pool, x.data(), 2, weight, y.data(), {}, a);
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t j = 0; j < n; ++j)
        ASSERT_EQ(y[i * n + j], x[i * k + j])
            << "path " << static_cast<int>(HostGemvPath(weight, a)) << " row " << i << " column " << j;
  }
}

TEST(HostGemv, NoRowsWritesNothing) {
  ThreadPool pool(2);
  std::vector<float> w(64 * 4, 1.f), y(4, 5.f);
  HostGemv(pool, nullptr, 0, Weight{DType::kF32, w.data(), 4, 64}, y.data());
  EXPECT_EQ(y, std::vector<float>(4, 5.f));
}

}  // namespace
}  // namespace ef::runtime
