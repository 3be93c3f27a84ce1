// The quantized weight formats (runtime/core/quant_format.h, quant.h): round trips within the
// stated bound, sizes, rejected inputs, the CPU backend's Gemm on quantized weights, and the error
// on the experts of models/tiny-code-moe that the formats were chosen by.
#include "runtime/core/quant.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/model/checkpoint.h"

namespace ef {
namespace {

std::vector<float> Gaussian(size_t n, uint64_t seed, float stddev = 0.02f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<std::byte> QuantizeOrDie(DType t, const std::vector<float>& w, int64_t rows, int64_t cols) {
  std::vector<std::byte> q(WeightBytes(t, rows, cols));
  auto n = Quantize(t, DType::kF32, w.data(), rows, cols, q.data(), q.size());
  EXPECT_TRUE(n.ok()) << n.status().ToString();
  if (n.ok()) {
    EXPECT_EQ(*n, q.size());
  }
  return q;
}

std::vector<float> DequantizeOrDie(DType t, const std::vector<std::byte>& q, int64_t rows, int64_t cols) {
  std::vector<float> d(static_cast<size_t>(rows * cols));
  Status s = Dequantize(t, q.data(), rows, cols, d.data());
  EXPECT_TRUE(s.ok()) << s.ToString();
  return d;
}

// Parameter p (0: scale, 1: min) of group g of row r, as stored.
float Param(DType t, const std::vector<std::byte>& q, int64_t rows, int64_t cols, int64_t r, int64_t g, int p) {
  const QuantFormat f = QuantFormat::Of(t);
  const size_t off = f.params_offset(rows, cols) + r * f.row_param_bytes(cols) +
                     (g * f.params_per_group() + p) * QuantFormat::kParamBytes;
  uint16_t h;
  std::memcpy(&h, q.data() + off, 2);
  return F16ToF32(h);
}

// Every value within half its group's stored scale (plus fp32 rounding of the dequantization).
void ExpectWithinHalfScale(DType t, const std::vector<float>& w, int64_t rows, int64_t cols) {
  const QuantFormat f = QuantFormat::Of(t);
  const std::vector<std::byte> q = QuantizeOrDie(t, w, rows, cols);
  const std::vector<float> d = DequantizeOrDie(t, q, rows, cols);
  int bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float s = Param(t, q, rows, cols, r, c / f.group, 0);
      const double x = w[r * cols + c], err = std::abs(x - d[r * cols + c]);
      if (err > s / 2 * (1 + 1e-5) + std::abs(x) * 1e-6 && bad++ < 5)
        ADD_FAILURE() << DTypeName(t) << " [" << r << ", " << c << "]: " << x << " -> " << d[r * cols + c] << ", error "
                      << err << " > scale / 2 = " << s / 2;
    }
  }
}

TEST(QuantFormatTest, NamesAreRuntimeOnly) {
  EXPECT_STREQ(DTypeName(DType::kQ8), "Q8G");
  EXPECT_STREQ(DTypeName(DType::kQ4), "Q4G");
  DType t = DType::kF32;
  EXPECT_FALSE(ParseDType("Q8G", &t));
  EXPECT_FALSE(ParseDType("Q4G", &t));
  EXPECT_EQ(t, DType::kF32);
  EXPECT_TRUE(IsQuantized(DType::kQ8) && IsQuantized(DType::kQ4));
  EXPECT_FALSE(IsQuantized(DType::kBF16) || IsQuantized(DType::kI8) || IsFloatWeight(DType::kQ8));
}

TEST(QuantFormatTest, WeightBytesIsTheLayoutsSize) {
  EXPECT_EQ(WeightBytes(DType::kBF16, 3, 5), 30u);
  EXPECT_EQ(WeightBytes(DType::kF32, 3, 5), 60u);
  // Mixtral's w1 [14336, 4096]: int8 values + one fp16 scale per 64; int4 + {scale, min} per 64.
  EXPECT_EQ(WeightBytes(DType::kQ8, 14336, 4096), 14336u * 4096 + 14336u * 64 * 2);
  EXPECT_EQ(WeightBytes(DType::kQ4, 14336, 4096), 14336u * 2048 + 14336u * 64 * 4);
  // Values and parameters each padded to 16 bytes: 3 x 64 values, 3 scales.
  EXPECT_EQ(WeightBytes(DType::kQ8, 3, 64), 192u + 16);
  EXPECT_EQ(WeightBytes(DType::kQ4, 3, 64), 96u + 16);
  const runtime::Weight w{DType::kQ4, nullptr, 14336, 4096};
  EXPECT_EQ(w.nbytes(), WeightBytes(DType::kQ4, 14336, 4096));
  for (DType t : {DType::kQ8, DType::kQ4})
    for (int64_t rows : {1, 3, 17})
      for (int64_t cols : {64, 192, 1408}) EXPECT_EQ(WeightBytes(t, rows, cols) % 16, 0u);
}

TEST(QuantTest, RoundTripIsWithinHalfTheScale) {
  for (DType t : {DType::kQ8, DType::kQ4}) {
    SCOPED_TRACE(DTypeName(t));
    ExpectWithinHalfScale(t, Gaussian(17 * 256, 1), 17, 256);
    ExpectWithinHalfScale(t, Gaussian(4 * 128, 2, 3e-6f), 4, 128);  // scales in fp16's subnormals
    ExpectWithinHalfScale(t, Gaussian(4 * 128, 3, 1000.f), 4, 128);
  }
}

TEST(QuantTest, Q8ScaleIsTheSmallestHalfCoveringTheGroup) {
  const int64_t rows = 8, cols = 128;
  const std::vector<float> w = Gaussian(rows * cols, 4);
  const std::vector<std::byte> q = QuantizeOrDie(DType::kQ8, w, rows, cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < 2; ++g) {
      float amax = 0;
      for (int j = 0; j < 64; ++j) amax = std::max(amax, std::abs(w[r * cols + g * 64 + j]));
      const float s = Param(DType::kQ8, q, rows, cols, r, g, 0);
      EXPECT_GE(s * 127, amax);
      EXPECT_LT(F16ToF32(static_cast<uint16_t>(F32ToF16(s) - 1)) * 127, amax);
    }
}

TEST(QuantTest, ZeroAndConstantRows) {
  const int64_t rows = 3, cols = 128;
  std::vector<float> w(rows * cols, 0.f);
  for (int64_t c = 0; c < cols; ++c) w[cols + c] = 0.375f;  // row 1 constant, exactly representable
  for (int64_t c = 0; c < cols; ++c) w[2 * cols + c] = c < 64 ? 0.f : -1e-3f;
  for (DType t : {DType::kQ8, DType::kQ4}) {
    SCOPED_TRACE(DTypeName(t));
    const std::vector<std::byte> q = QuantizeOrDie(t, w, rows, cols);
    const std::vector<float> d = DequantizeOrDie(t, q, rows, cols);
    for (int64_t c = 0; c < cols; ++c) EXPECT_EQ(d[c], 0.f) << c;
    EXPECT_EQ(Param(t, q, rows, cols, 0, 0, 0), 0.f);
    for (int64_t c = 0; c < 64; ++c) EXPECT_EQ(d[2 * cols + c], 0.f) << c;
    ExpectWithinHalfScale(t, w, rows, cols);
  }
  // Q4 stores a constant group as its minimum with a zero scale: exact.
  const std::vector<float> d = DequantizeOrDie(DType::kQ4, QuantizeOrDie(DType::kQ4, w, rows, cols), rows, cols);
  for (int64_t c = 0; c < cols; ++c) EXPECT_EQ(d[cols + c], 0.375f) << c;
}

TEST(QuantTest, AnOutlierWidensOnlyItsGroup) {
  const int64_t rows = 2, cols = 256;
  std::vector<float> w = Gaussian(rows * cols, 5);
  w[70] = 4.0f;  // row 0, group 1
  for (DType t : {DType::kQ8, DType::kQ4}) {
    SCOPED_TRACE(DTypeName(t));
    const std::vector<std::byte> q = QuantizeOrDie(t, w, rows, cols);
    const float outlier_scale = Param(t, q, rows, cols, 0, 1, 0);
    for (int64_t g : {0, 2, 3}) EXPECT_LT(Param(t, q, rows, cols, 0, g, 0) * 20, outlier_scale) << g;
    const std::vector<float> d = DequantizeOrDie(t, q, rows, cols);
    EXPECT_NEAR(d[70], 4.0f, outlier_scale / 2);
    ExpectWithinHalfScale(t, w, rows, cols);
  }
}

TEST(QuantTest, BadInputsAreClearErrors) {
  std::vector<float> w(4 * 100, 0.5f);
  std::vector<std::byte> q(1 << 16);
  auto r = Quantize(DType::kQ8, DType::kF32, w.data(), 4, 100, q.data(), q.size());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("Q8G weight [4, 100]"), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find("group of 64"), std::string::npos) << r.status().message();
  r = Quantize(DType::kQ4, DType::kF32, w.data(), 2, 96, q.data(), q.size());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("Q4G weight [2, 96]"), std::string::npos) << r.status().message();

  r = Quantize(DType::kBF16, DType::kF32, w.data(), 2, 64, q.data(), q.size());
  EXPECT_FALSE(r.ok());
  r = Quantize(DType::kQ8, DType::kI32, w.data(), 2, 64, q.data(), q.size());
  EXPECT_FALSE(r.ok());
  r = Quantize(DType::kQ8, DType::kF32, w.data(), 2, 64, q.data(), WeightBytes(DType::kQ8, 2, 64) - 1);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("needs 144 bytes"), std::string::npos) << r.status().message();

  w[64 + 3] = NAN;
  r = Quantize(DType::kQ4, DType::kF32, w.data(), 2, 64, q.data(), q.size());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("row 1 group 0"), std::string::npos) << r.status().message();
  w[64 + 3] = 1e9f;  // past fp16's range for an int8 scale (65504 * 127)
  r = Quantize(DType::kQ8, DType::kF32, w.data(), 2, 64, q.data(), q.size());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("too wide for fp16"), std::string::npos) << r.status().message();

  std::vector<float> out(2 * 96);
  EXPECT_FALSE(Dequantize(DType::kQ8, q.data(), 2, 96, out.data()).ok());
  EXPECT_FALSE(Dequantize(DType::kF32, q.data(), 2, 64, out.data()).ok());
}

TEST(QuantTest, Bf16AndF16SourcesQuantizeLikeTheirF32Values) {
  const int64_t rows = 5, cols = 192;
  std::vector<float> w = Gaussian(rows * cols, 6);
  std::vector<uint16_t> bf(w.size()), hf(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    bf[i] = F32ToBf16(w[i]);
    hf[i] = F32ToF16(w[i]);
  }
  for (DType t : {DType::kQ8, DType::kQ4}) {
    for (auto [src_t, src] : {std::pair{DType::kBF16, &bf}, std::pair{DType::kF16, &hf}}) {
      std::vector<float> as_f32(w.size());
      ConvertToF32(src_t, src->data(), as_f32.data(), as_f32.size());
      std::vector<std::byte> q(WeightBytes(t, rows, cols));
      ASSERT_TRUE(Quantize(t, src_t, src->data(), rows, cols, q.data(), q.size()).ok());
      EXPECT_EQ(q, QuantizeOrDie(t, as_f32, rows, cols)) << DTypeName(t) << " from " << DTypeName(src_t);
    }
  }
}

TEST(QuantTest, ThreadedQuantizationEqualsRowByRow) {
  // 2048 x 1024: two million values, quantized by two threads or more.
  const int64_t rows = 2048, cols = 1024;
  const std::vector<float> w = Gaussian(rows * cols, 7);
  for (DType t : {DType::kQ8, DType::kQ4}) {
    const std::vector<std::byte> whole = QuantizeOrDie(t, w, rows, cols);
    const QuantFormat f = QuantFormat::Of(t);
    for (int64_t r : {int64_t{0}, int64_t{1023}, int64_t{1024}, rows - 1}) {
      const std::vector<float> one(w.begin() + r * cols, w.begin() + (r + 1) * cols);
      const std::vector<std::byte> q = QuantizeOrDie(t, one, 1, cols);
      EXPECT_EQ(0, std::memcmp(q.data(), whole.data() + r * f.row_value_bytes(cols), f.row_value_bytes(cols)))
          << DTypeName(t) << " values of row " << r;
      EXPECT_EQ(0, std::memcmp(q.data() + f.params_offset(1, cols),
                               whole.data() + f.params_offset(rows, cols) + r * f.row_param_bytes(cols),
                               f.row_param_bytes(cols)))
          << DTypeName(t) << " parameters of row " << r;
    }
  }
}

// Values that fall exactly between two steps round to the even one (std::nearbyint's rule), in
// both formats; and the thread count given to Quantize changes no byte.
TEST(QuantTest, TiesRoundToEvenAndThreadsChangeNothing) {
  const float s = 1.f / 128;  // exact in fp16: the scale of groups spanning 127 s (Q8) or [0, 15 s] (Q4)
  const std::vector<float> halves = {0.5f, 1.5f, 2.5f, 3.5f, 6.5f, 13.5f, 14.5f};
  for (DType t : {DType::kQ8, DType::kQ4}) {
    SCOPED_TRACE(DTypeName(t));
    const bool q4 = t == DType::kQ4;
    std::vector<float> w(64, 0.f);
    w[63] = (q4 ? 15 : 127) * s;  // the group's maximum fixes the scale at s
    for (size_t i = 0; i < halves.size(); ++i) w[i] = halves[i] * s;
    if (!q4) w[halves.size()] = -2.5f * s;
    const std::vector<std::byte> q = QuantizeOrDie(t, w, 1, 64);
    ASSERT_EQ(Param(t, q, 1, 64, 0, 0, 0), s);
    for (size_t i = 0; i <= halves.size(); ++i) {
      const int want = static_cast<int>(std::nearbyint(w[i] / s));
      const int got = q4 ? (std::to_integer<int>(q[i / 2]) >> (4 * (i % 2))) & 0xf : static_cast<int8_t>(q[i]);
      EXPECT_EQ(got, want) << "value " << w[i] / s << " steps";
    }
  }
  const int64_t rows = 512, cols = 4096;  // two million values: split over threads by default
  const std::vector<float> w = Gaussian(rows * cols, 11);
  for (DType t : {DType::kQ8, DType::kQ4}) {
    std::vector<std::byte> one(WeightBytes(t, rows, cols)), three(one.size()), any(one.size());
    ASSERT_TRUE(Quantize(t, DType::kF32, w.data(), rows, cols, one.data(), one.size(), 1).ok());
    ASSERT_TRUE(Quantize(t, DType::kF32, w.data(), rows, cols, three.data(), three.size(), 3).ok());
    ASSERT_TRUE(Quantize(t, DType::kF32, w.data(), rows, cols, any.data(), any.size()).ok());
    EXPECT_EQ(one, three) << DTypeName(t);
    EXPECT_EQ(one, any) << DTypeName(t);
  }
}

// A group whose minimum is zero of both signs stores the sign of its first zero, whatever lane of
// the scan holds it (the stored bytes do not depend on how the scan is split).
TEST(QuantTest, TheFirstZeroOfAGroupGivesItsMinimumItsSign) {
  const QuantFormat f = QuantFormat::Of(DType::kQ4);
  for (auto [a, b] : {std::pair{0, 63}, {1, 8}, {7, 9}, {8, 15}, {62, 63}}) {
    for (float zero : {-0.0f, 0.0f}) {
      std::vector<float> w(64, 0.01f);
      w[a] = zero;   // the first zero
      w[b] = -zero;  // a later one of the other sign
      const std::vector<std::byte> q = QuantizeOrDie(DType::kQ4, w, 1, 64);
      uint16_t min_h;
      std::memcpy(&min_h, q.data() + f.params_offset(1, 64) + QuantFormat::kParamBytes, 2);
      EXPECT_EQ(min_h, std::signbit(zero) ? 0x8000 : 0x0000) << "zeros at " << a << " and " << b;
    }
  }
}

TEST(QuantCpuGemmTest, EqualsGemmOnTheDequantizedWeights) {
  runtime::CpuBackend cpu;
  const int64_t n = 96, k = 320;
  const std::vector<float> w = Gaussian(n * k, 8);
  const std::vector<float> bias = Gaussian(n, 9);
  for (DType t : {DType::kQ8, DType::kQ4}) {
    const std::vector<std::byte> q = QuantizeOrDie(t, w, n, k);
    const std::vector<float> d = DequantizeOrDie(t, q, n, k);
    auto wq = cpu.UploadWeight(t, q.data(), n, k);
    ASSERT_TRUE(wq.ok()) << wq.status().ToString();
    const runtime::Weight wd{DType::kF32, d.data(), n, k}, b{DType::kF32, bias.data(), 1, n};
    for (int64_t m : {1, 3, 17}) {
      for (bool accumulate : {false, true}) {
        const std::vector<float> x = Gaussian(m * k, 10 + m, 1.f);
        std::vector<float> yq = Gaussian(m * n, 20 + m, 1.f), yd = yq;
        cpu.Gemm(x.data(), m, *wq, &b, yq.data(), accumulate);
        cpu.Gemm(x.data(), m, wd, &b, yd.data(), accumulate);
        for (int64_t i = 0; i < m * n; ++i)
          ASSERT_NEAR(yq[i], yd[i], 1e-5 * std::max(1.f, std::abs(yd[i])))
              << DTypeName(t) << " m=" << m << " element " << i;
      }
    }
  }
  std::vector<std::byte> q(WeightBytes(DType::kQ8, 2, 64));
  auto bad = cpu.UploadWeight(DType::kQ8, q.data(), 2, 96);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("multiple of its group (64)"), std::string::npos) << bad.status().message();
}

// --- the experts of models/tiny-code-moe ---

// A candidate format, quantized by a plain model of Quantize (parameters rounded outward in their
// type) so that other group sizes, parameter types and symmetric int4 can be compared.
struct Candidate {
  const char* name;
  int bits;
  int group;
  bool asym;
  DType param;  // F16, BF16 or F32
  double bytes_per_value() const {
    return bits / 8.0 + (asym ? 2 : 1) * (param == DType::kF32 ? 4 : 2) / static_cast<double>(group);
  }
};

float RoundParam(float v, DType p, bool up) {
  if (p == DType::kF32) return v;
  const auto to = [p](float f) { return p == DType::kF16 ? F32ToF16(f) : F32ToBf16(f); };
  const auto from = [p](uint16_t h) { return p == DType::kF16 ? F16ToF32(h) : Bf16ToF32(h); };
  uint16_t h = to(v);
  const float f = from(h);
  if (up && f < v) return from(h + 1);  // v >= 0
  if (!up && f > v) return from((h & 0x8000u) ? h + 1 : (h == 0 ? 0x8001u : h - 1));
  return f;
}

std::vector<float> FakeQuantize(const Candidate& c, const std::vector<float>& w, int64_t cols) {
  std::vector<float> d(w.size());
  for (size_t g0 = 0; g0 < w.size(); g0 += c.group) {
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < c.group; ++j) lo = std::min(lo, w[g0 + j]), hi = std::max(hi, w[g0 + j]);
    if (c.asym) {
      const float mn = RoundParam(lo, c.param, false), qmax = float((1 << c.bits) - 1);
      const float s = RoundParam((hi - mn) / qmax, c.param, true), inv = s > 0 ? 1 / s : 0;
      for (int j = 0; j < c.group; ++j)
        d[g0 + j] = std::clamp(std::nearbyint((w[g0 + j] - mn) * inv), 0.f, qmax) * s + mn;
    } else {
      const float qmax = float((1 << (c.bits - 1)) - 1);
      const float s = RoundParam(std::max(-lo, hi) / qmax, c.param, true), inv = s > 0 ? 1 / s : 0;
      for (int j = 0; j < c.group; ++j) d[g0 + j] = std::clamp(std::nearbyint(w[g0 + j] * inv), -qmax, qmax) * s;
    }
  }
  (void)cols;
  return d;
}

// Accumulates sum (a - b)^2 and sum b^2.
struct RelError {
  double num = 0, den = 0;
  void Add(const std::vector<float>& got, const std::vector<float>& want) {
    for (size_t i = 0; i < want.size(); ++i) {
      num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
      den += double(want[i]) * want[i];
    }
  }
  double value() const { return den > 0 ? std::sqrt(num / den) : 0; }
};

struct Expert {
  std::vector<float> w1, w3, w2;  // gate, up [inter, hidden]; down [hidden, inter]
};

// silu(x W1^T) * (x W3^T) W2^T for one input row.
std::vector<float> ExpertForward(const Expert& e, const std::vector<float>& x, int64_t hidden, int64_t inter) {
  std::vector<float> h(inter), y(hidden);
  for (int64_t i = 0; i < inter; ++i) {
    double g = 0, u = 0;
    for (int64_t j = 0; j < hidden; ++j)
      g += double(e.w1[i * hidden + j]) * x[j], u += double(e.w3[i * hidden + j]) * x[j];
    h[i] = static_cast<float>(g / (1 + std::exp(-g)) * u);
  }
  for (int64_t j = 0; j < hidden; ++j) {
    double s = 0;
    for (int64_t i = 0; i < inter; ++i) s += double(e.w2[j * inter + i]) * h[i];
    y[j] = static_cast<float>(s);
  }
  return y;
}

class QuantTinyModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto ck = runtime::Checkpoint::Open(std::string(EF_MODELS_DIR) + "/tiny-code-moe");
    if (!ck.ok()) GTEST_SKIP() << ck.status().ToString();
    for (int l = 0;; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".block_sparse_moe.experts.";
      if (!(*ck)->Has(p + "0.w1.weight")) break;
      for (int e = 0; (*ck)->Has(p + std::to_string(e) + ".w1.weight"); ++e) {
        Expert ex;
        for (auto [name, dst] : {std::pair{"w1", &ex.w1}, std::pair{"w3", &ex.w3}, std::pair{"w2", &ex.w2}}) {
          const runtime::TensorView* t = (*ck)->Find(p + std::to_string(e) + "." + name + ".weight");
          ASSERT_NE(t, nullptr);
          dst->resize(t->numel());
          ConvertToF32(t->dtype, t->data, dst->data(), dst->size());
          if (std::string(name) == "w2") hidden_ = t->dim(0), inter_ = t->dim(1);
        }
        experts_.push_back(std::move(ex));
      }
    }
    ASSERT_FALSE(experts_.empty());
  }

  // Weight and expert-output relative errors (Frobenius / L2) of a quantizer over every expert;
  // outputs on kInputs Gaussian inputs per expert.
  template <typename Fn>
  std::pair<double, double> Errors(Fn&& quantize) {
    constexpr int kInputs = 4;
    RelError werr, yerr;
    uint64_t seed = 100;
    for (const Expert& e : experts_) {
      Expert q{quantize(e.w1, inter_, hidden_), quantize(e.w3, inter_, hidden_), quantize(e.w2, hidden_, inter_)};
      werr.Add(q.w1, e.w1);
      werr.Add(q.w3, e.w3);
      werr.Add(q.w2, e.w2);
      for (int i = 0; i < kInputs; ++i) {
        const std::vector<float> x = Gaussian(hidden_, seed++, 1.f);
        yerr.Add(ExpertForward(q, x, hidden_, inter_), ExpertForward(e, x, hidden_, inter_));
      }
    }
    return {werr.value(), yerr.value()};
  }

  std::vector<Expert> experts_;
  int64_t hidden_ = 0, inter_ = 0;
};

// The table behind quant_format.h's choices (docs/results/quant/formats.md); the production
// formats must match their candidate's model of them and stay under the error the choice rests on.
TEST_F(QuantTinyModelTest, ErrorOfCandidateFormats) {
  const Candidate candidates[] = {
      {"int8 g32 f16", 8, 32, false, DType::kF16},       {"int8 g64 f16", 8, 64, false, DType::kF16},
      {"int8 g128 f16", 8, 128, false, DType::kF16},     {"int8 g64 bf16", 8, 64, false, DType::kBF16},
      {"int8 g64 f32", 8, 64, false, DType::kF32},       {"int8 g128 f32", 8, 128, false, DType::kF32},
      {"int4 sym g32 f16", 4, 32, false, DType::kF16},   {"int4 sym g64 f16", 4, 64, false, DType::kF16},
      {"int4 sym g128 f16", 4, 128, false, DType::kF16}, {"int4 asym g32 f16", 4, 32, true, DType::kF16},
      {"int4 asym g64 f16", 4, 64, true, DType::kF16},   {"int4 asym g128 f16", 4, 128, true, DType::kF16},
      {"int4 asym g64 bf16", 4, 64, true, DType::kBF16}, {"int4 sym g64 f32", 4, 64, false, DType::kF32},
  };
  std::printf("# tiny-code-moe: %zu experts, hidden %lld, intermediate %lld\n", experts_.size(),
              static_cast<long long>(hidden_), static_cast<long long>(inter_));
  std::printf("%-20s %10s %12s %12s\n", "format", "bytes/val", "weight_rel", "output_rel");
  for (const Candidate& c : candidates) {
    auto [we, ye] =
        Errors([&](const std::vector<float>& w, int64_t, int64_t cols) { return FakeQuantize(c, w, cols); });
    std::printf("%-20s %10.4f %12.3e %12.3e\n", c.name, c.bytes_per_value(), we, ye);
  }
  for (auto [t, model] : {std::pair{DType::kQ8, Candidate{"Q8G", 8, 64, false, DType::kF16}},
                          std::pair{DType::kQ4, Candidate{"Q4G", 4, 64, true, DType::kF16}}}) {
    const auto prod = Errors([&](const std::vector<float>& w, int64_t rows, int64_t cols) {
      return DequantizeOrDie(t, QuantizeOrDie(t, w, rows, cols), rows, cols);
    });
    const auto modeled =
        Errors([&](const std::vector<float>& w, int64_t, int64_t cols) { return FakeQuantize(model, w, cols); });
    std::printf("%-20s %10.4f %12.3e %12.3e\n", DTypeName(t),
                static_cast<double>(WeightBytes(t, inter_, hidden_)) / (inter_ * hidden_), prod.first, prod.second);
    EXPECT_NEAR(prod.first, modeled.first, 1e-6 * modeled.first) << DTypeName(t);
    EXPECT_LT(prod.second, t == DType::kQ8 ? 0.01 : 0.15) << DTypeName(t);
  }
}

}  // namespace
}  // namespace ef
