// HostGemv (the host kernel for experts computed on the CPU) against the CPU backend's Gemm, the
// exact reference: every weight type, 1..9 rows of x (blocks of kHostGemvMaxRows and a ragged
// last block), widths the vector path takes (multiples of 64) and one it does not.
#include "runtime/backend/cpu/host_gemv.h"

#include <gtest/gtest.h>

#include <cmath>
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

TEST(HostGemv, MatchesTheCpuBackendForEveryTypeAndRowCount) {
  std::mt19937 rng(7);
  ThreadPool pool(3);
  CpuBackend cpu(&pool);
  const Case cases[] = {{DType::kF32, 37, 128}, {DType::kBF16, 70, 192}, {DType::kQ8, 33, 256},
                        {DType::kQ4, 65, 128},  {DType::kBF16, 9, 40},   {DType::kQ8, 5, 64}};
  for (const Case& c : cases) {
    std::vector<std::byte> store;
    const Weight w = MakeWeight(c.dtype, c.rows, c.cols, rng, store);
    EXPECT_EQ(HostGemvVectorized(w), HostGemvVectorized(Weight{DType::kF32, store.data(), 1, 64}) && c.cols % 64 == 0)
        << DTypeName(c.dtype) << " " << c.cols;
    for (int64_t m : {1, 2, 3, 4, 5, 9}) {
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<float> x(static_cast<size_t>(m * c.cols));
      for (float& v : x) v = nd(rng);
      std::vector<float> want(static_cast<size_t>(m * c.rows)), got(want.size(), -1.f);
      cpu.Gemm(x.data(), m, w, nullptr, want.data(), false);
      HostGemv(pool, x.data(), m, w, got.data());
      // Summation order differs: bound by the row's magnitude, sum |x| |w| ~ cols * 0.8 * 0.4.
      const double tol = 1e-5 * static_cast<double>(c.cols);
      for (size_t i = 0; i < want.size(); ++i)
        ASSERT_NEAR(got[i], want[i], tol) << DTypeName(c.dtype) << " m " << m << " at " << i;
    }
  }
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
      {DType::kBF16, 40, 256, {8, 40, 64, 256}}, {DType::kBF16, 40, 256, {0, 13, 0, 128}},
      {DType::kQ8, 33, 256, {5, 33, 128, 256}},  {DType::kQ4, 65, 384, {0, 65, 192, 384}},
      {DType::kQ4, 20, 128, {3, 19, 64, -1}},    {DType::kF32, 17, 128, {0, -1, 64, -1}},
      {DType::kBF16, 9, 100, {2, 7, 10, 90}},    {DType::kF32, 12, 192, {0, 12, 17, 150}},
      {DType::kQ8, 10, 128, {0, -1, 0, -1}},
  };
  for (const BlockCase& c : cases) {
    std::vector<std::byte> store;
    const Weight w = MakeWeight(c.dtype, c.rows, c.cols, rng, store);
    const int64_t r0 = c.block.row_begin, r1 = c.block.row_end < 0 ? c.rows : c.block.row_end;
    const int64_t c0 = c.block.col_begin, c1 = c.block.col_end < 0 ? c.cols : c.block.col_end;
    for (int64_t m : {1, 3, 6}) {
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<float> x(static_cast<size_t>(m * (c1 - c0))), padded(static_cast<size_t>(m * c.cols), 0.f);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = c0; j < c1; ++j) padded[i * c.cols + j] = x[i * (c1 - c0) + j - c0] = nd(rng);
      std::vector<float> full(static_cast<size_t>(m * c.rows)), got(static_cast<size_t>(m * (r1 - r0)), -1.f);
      cpu.Gemm(padded.data(), m, w, nullptr, full.data(), false);
      HostGemv(pool, x.data(), m, w, got.data(), c.block);
      const double tol = 1e-5 * static_cast<double>(c.cols);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = r0; j < r1; ++j)
          ASSERT_NEAR(got[i * (r1 - r0) + j - r0], full[i * c.rows + j], tol)
              << DTypeName(c.dtype) << " block rows [" << r0 << "," << r1 << ") cols [" << c0 << "," << c1 << ") m "
              << m << " row " << i << " col " << j;
    }
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
