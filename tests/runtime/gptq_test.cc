// GPTQ (runtime/core/gptq.h): the runtime's block format exactly, Quantize's bytes when the
// inputs are uncorrelated, a smaller output error than rounding to nearest on correlated inputs
// it did not see, and clear errors for what it cannot use.
#include "runtime/core/gptq.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "runtime/core/quant.h"

namespace ef {
namespace {

std::vector<float> Gaussian(size_t n, std::mt19937_64& rng, float stddev = 1.0f) {
  std::normal_distribution<float> d(0.f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Inputs x = A z with z standard normal and A a fixed random mixing (strongly correlated columns,
// and a few columns of large scale, as activations have), t rows of n.
struct Inputs {
  int64_t n;
  std::vector<float> mix;  // [n, n]
  std::vector<float> Draw(int64_t t, std::mt19937_64& rng) const {
    std::vector<float> z = Gaussian(static_cast<size_t>(t * n), rng), x(static_cast<size_t>(t * n), 0.f);
    for (int64_t r = 0; r < t; ++r)
      for (int64_t i = 0; i < n; ++i) {
        float s = 0;
        for (int64_t k = 0; k < n; ++k) s += mix[i * n + k] * z[r * n + k];
        x[r * n + i] = s;
      }
    return x;
  }
};

Inputs MakeInputs(int64_t n, std::mt19937_64& rng) {
  Inputs in{n, Gaussian(static_cast<size_t>(n * n), rng, 0.3f)};
  for (int64_t i = 0; i < n; ++i) in.mix[i * n + i] += 1.0f;
  for (int64_t i = 0; i < n; i += 17)
    for (int64_t k = 0; k < n; ++k) in.mix[i * n + k] *= 6.0f;  // outlier channels
  return in;
}

std::vector<double> SecondMoment(const std::vector<float>& x, int64_t t, int64_t n) {
  std::vector<double> h(static_cast<size_t>(n * n), 0.0);
  for (int64_t r = 0; r < t; ++r)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) h[i * n + j] += double(x[r * n + i]) * x[r * n + j];
  return h;
}

// sum over rows of x of |(W - Q) x|^2.
double OutputError(const std::vector<float>& w, const std::vector<float>& q, int64_t rows, int64_t n,
                   const std::vector<float>& x, int64_t t) {
  double err = 0;
  for (int64_t r = 0; r < t; ++r)
    for (int64_t o = 0; o < rows; ++o) {
      double d = 0;
      for (int64_t i = 0; i < n; ++i) d += (double(w[o * n + i]) - q[o * n + i]) * x[r * n + i];
      err += d * d;
    }
  return err;
}

std::vector<float> Dequantized(DType t, const std::vector<std::byte>& b, int64_t rows, int64_t cols) {
  std::vector<float> d(static_cast<size_t>(rows * cols));
  EXPECT_TRUE(Dequantize(t, b.data(), rows, cols, d.data()).ok());
  return d;
}

class GptqTest : public ::testing::TestWithParam<DType> {};

TEST_P(GptqTest, UncorrelatedInputsGiveQuantizesBytes) {
  const DType t = GetParam();
  const int64_t rows = 24, cols = 192;
  std::mt19937_64 rng(7);
  const std::vector<float> w = Gaussian(static_cast<size_t>(rows * cols), rng, 0.05f);
  std::vector<double> h(static_cast<size_t>(cols * cols), 0.0);
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] = 3.5;
  std::vector<std::byte> rtn(WeightBytes(t, rows, cols)), gptq(rtn.size(), std::byte{0x5a});
  ASSERT_TRUE(Quantize(t, DType::kF32, w.data(), rows, cols, rtn.data(), rtn.size()).ok());
  auto n = QuantizeGptq(t, w.data(), rows, cols, h.data(), gptq.data(), gptq.size());
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, rtn.size());
  EXPECT_EQ(gptq, rtn);
}

// Act order permutes the columns by the diagonal; with nothing off it the permutation must still
// land every value and parameter where Quantize puts it.
TEST_P(GptqTest, UncorrelatedInputsOfDifferentScalesGiveQuantizesBytes) {
  const DType t = GetParam();
  const int64_t rows = 12, cols = 128;
  std::mt19937_64 rng(9);
  const std::vector<float> w = Gaussian(static_cast<size_t>(rows * cols), rng, 0.05f);
  std::vector<double> h(static_cast<size_t>(cols * cols), 0.0);
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] = 1.0 + static_cast<double>((i * 37) % cols);
  std::vector<std::byte> rtn(WeightBytes(t, rows, cols)), gptq(rtn.size());
  ASSERT_TRUE(Quantize(t, DType::kF32, w.data(), rows, cols, rtn.data(), rtn.size()).ok());
  ASSERT_TRUE(QuantizeGptq(t, w.data(), rows, cols, h.data(), gptq.data(), gptq.size()).ok());
  EXPECT_EQ(gptq, rtn);
}

TEST_P(GptqTest, SmallerOutputErrorThanRoundingOnInputsItDidNotSee) {
  const DType t = GetParam();
  const int64_t rows = 32, n = 128;
  std::mt19937_64 rng(11);
  const Inputs in = MakeInputs(n, rng);
  const std::vector<float> w = Gaussian(static_cast<size_t>(rows * n), rng, 0.05f);
  const std::vector<float> calib = in.Draw(1024, rng), held_out = in.Draw(512, rng);
  const std::vector<double> h = SecondMoment(calib, 1024, n);
  std::vector<std::byte> rtn(WeightBytes(t, rows, n)), gptq(rtn.size());
  ASSERT_TRUE(Quantize(t, DType::kF32, w.data(), rows, n, rtn.data(), rtn.size()).ok());
  ASSERT_TRUE(QuantizeGptq(t, w.data(), rows, n, h.data(), gptq.data(), gptq.size()).ok());
  const double e_rtn = OutputError(w, Dequantized(t, rtn, rows, n), rows, n, held_out, 512);
  const double e_gptq = OutputError(w, Dequantized(t, gptq, rows, n), rows, n, held_out, 512);
  EXPECT_LT(e_gptq, 0.6 * e_rtn) << "rtn " << e_rtn << " gptq " << e_gptq;
  // Still a valid block: every value dequantizes within its group's range.
  for (float v : Dequantized(t, gptq, rows, n)) EXPECT_TRUE(std::isfinite(v));
}

INSTANTIATE_TEST_SUITE_P(Formats, GptqTest, ::testing::Values(DType::kQ8, DType::kQ4),
                         [](const auto& p) { return std::string(DTypeName(p.param)); });

TEST(GptqErrors, NameWhatIsWrong) {
  const int64_t rows = 2, cols = 64;
  std::vector<float> w(rows * cols, 0.5f);
  std::vector<double> h(cols * cols, 0.0);
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] = 1;
  std::vector<std::byte> dst(WeightBytes(DType::kQ8, rows, cols));
  auto msg = [](const StatusOr<size_t>& s) { return s.ok() ? std::string("ok") : s.status().ToString(); };

  EXPECT_NE(msg(QuantizeGptq(DType::kBF16, w.data(), rows, cols, h.data(), dst.data(), dst.size())).find("Q8 or Q4"),
            std::string::npos);
  EXPECT_NE(msg(QuantizeGptq(DType::kQ8, w.data(), rows, 48, h.data(), dst.data(), dst.size())).find("group of 64"),
            std::string::npos);
  EXPECT_NE(msg(QuantizeGptq(DType::kQ8, w.data(), rows, cols, h.data(), dst.data(), 10)).find("bytes for a block"),
            std::string::npos);
  std::vector<double> bad = h;
  bad[5] = NAN;
  EXPECT_NE(msg(QuantizeGptq(DType::kQ8, w.data(), rows, cols, bad.data(), dst.data(), dst.size())).find("not finite"),
            std::string::npos);
  bad = h;
  bad[3 * cols + 3] = -1;
  EXPECT_NE(msg(QuantizeGptq(DType::kQ8, w.data(), rows, cols, bad.data(), dst.data(), dst.size())).find("negative"),
            std::string::npos);
  // Not positive semi-definite beyond what damping covers.
  bad = h;
  bad[0 * cols + 1] = bad[1 * cols + 0] = 50;
  EXPECT_NE(msg(QuantizeGptq(DType::kQ8, w.data(), rows, cols, bad.data(), dst.data(), dst.size())).find("positive"),
            std::string::npos);
  std::vector<float> inf = w;
  inf[70] = INFINITY;
  EXPECT_NE(msg(QuantizeGptq(DType::kQ8, inf.data(), rows, cols, h.data(), dst.data(), dst.size())).find("not finite"),
            std::string::npos);
}

// A column no input reached (zero row and column of H) does not break the factorisation.
TEST(GptqDeadInputs, ZeroDiagonalColumnsAreAccepted) {
  const int64_t rows = 4, cols = 64;
  std::mt19937_64 rng(3);
  const Inputs in = MakeInputs(cols, rng);
  std::vector<float> x = in.Draw(256, rng);
  for (int64_t r = 0; r < 256; ++r) x[r * cols + 9] = 0;
  const std::vector<double> h = SecondMoment(x, 256, cols);
  const std::vector<float> w = Gaussian(static_cast<size_t>(rows * cols), rng, 0.05f);
  std::vector<std::byte> dst(WeightBytes(DType::kQ8, rows, cols));
  auto n = QuantizeGptq(DType::kQ8, w.data(), rows, cols, h.data(), dst.data(), dst.size());
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  const std::vector<float> d = Dequantized(DType::kQ8, dst, rows, cols);
  for (int64_t r = 0; r < rows; ++r) EXPECT_NEAR(d[r * cols + 9], w[r * cols + 9], 0.05f * 4 / 127 + 1e-3);
}

}  // namespace
}  // namespace ef
