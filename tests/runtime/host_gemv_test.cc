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

TEST(HostGemv, NoRowsWritesNothing) {
  ThreadPool pool(2);
  std::vector<float> w(64 * 4, 1.f), y(4, 5.f);
  HostGemv(pool, nullptr, 0, Weight{DType::kF32, w.data(), 4, 64}, y.data());
  EXPECT_EQ(y, std::vector<float>(4, 5.f));
}

}  // namespace
}  // namespace ef::runtime
