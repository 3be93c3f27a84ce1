// Lossless bf16 packing (DType kPbf16): every bit back, on the shipped model's experts, on the
// fixture families' weights and on the values that need the format's escapes (zeros, subnormals,
// infinities, NaN, values far below their group's largest); the capacity of exceptions enforced;
// the CPU backend's Gemm on a packed weight bitwise equal to Gemm on the bf16 one.
#include "runtime/core/packed_bf16.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/backend/cpu/host_gemv.h"
#include "runtime/core/dtype.h"
#include "runtime/core/thread_pool.h"
#include "runtime/model/safetensors_file.h"

namespace ef {
namespace {

using F = PackedBf16Format;

std::vector<uint16_t> GaussianBf16(int64_t n, uint32_t seed, float stddev = 0.02f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.f, stddev);
  std::vector<uint16_t> v(static_cast<size_t>(n));
  for (uint16_t& x : v) x = F32ToBf16(d(rng));
  return v;
}

std::vector<std::byte> PackOrDie(const std::vector<uint16_t>& w, int64_t rows, int64_t cols, int threads = 0) {
  std::vector<std::byte> p(WeightBytes(DType::kPbf16, rows, cols), std::byte{0xa5});
  StatusOr<size_t> n = PackBf16(w.data(), rows, cols, p.data(), p.size(), threads);
  EXPECT_TRUE(n.ok()) << n.status().ToString();
  if (n.ok()) {
    EXPECT_EQ(*n, p.size());
  }
  return p;
}

// Packs and unpacks (whole and row by row, bits and fp32); true when every bit came back.
::testing::AssertionResult RoundTrips(const std::vector<uint16_t>& w, int64_t rows, int64_t cols) {
  const std::vector<std::byte> p = PackOrDie(w, rows, cols);
  std::vector<uint16_t> back(w.size());
  if (Status s = UnpackBf16(p.data(), rows, cols, back.data()); !s.ok())
    return ::testing::AssertionFailure() << s.ToString();
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    UnpackBf16RowF32(p.data(), rows, cols, r, row.data());
    for (int64_t c = 0; c < cols; ++c) {
      const size_t i = static_cast<size_t>(r * cols + c);
      uint32_t bits;
      std::memcpy(&bits, &row[c], 4);
      if (back[i] != w[i] || bits != static_cast<uint32_t>(w[i]) << 16)
        return ::testing::AssertionFailure()
               << "value (" << r << ", " << c << ") of [" << rows << ", " << cols << "]: 0x" << std::hex << w[i]
               << " came back as 0x" << back[i] << " / 0x" << bits;
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(PackedBf16FormatTest, SizesAndNames) {
  EXPECT_STREQ(DTypeName(DType::kPbf16), "PBF16");
  DType t;
  EXPECT_FALSE(ParseDType("PBF16", &t)) << "no checkpoint tensor may claim the runtime's own format";
  EXPECT_TRUE(IsPackedWeight(DType::kPbf16));
  EXPECT_EQ(WeightBytes(DType::kPbf16, 256, 128), F::bytes(256, 128));
  // 0.756x of bf16 on Mixtral's expert shapes (0.771x on tiny-code-moe's, whose rows of 128 pay more
  // for their row ends), each section 16-byte aligned.
  for (auto [r, c, most] :
       {std::tuple<int64_t, int64_t, double>{14336, 4096, 0.757}, {4096, 14336, 0.757}, {256, 128, 0.772}}) {
    const double ratio = static_cast<double>(F::bytes(r, c)) / (2.0 * r * c);
    EXPECT_LT(ratio, most) << r << "x" << c;
    EXPECT_GT(ratio, 0.755) << r << "x" << c;
    for (int64_t off : {F::codes_offset(r, c), F::base_offset(r, c), F::row_end_offset(r, c),
                        F::exceptions_offset(r, c), static_cast<int64_t>(F::bytes(r, c))})
      EXPECT_EQ(off % 16, 0);
  }
  EXPECT_TRUE(F::divides(128));
  EXPECT_TRUE(F::divides(65536));
  EXPECT_FALSE(F::divides(64));
  EXPECT_FALSE(F::divides(65536 + 128));
  EXPECT_FALSE(F::divides(0));
}

TEST(PackedBf16Test, GaussianWeightsRoundTripAndThreadsChangeNothing) {
  const int64_t rows = 300, cols = 384;
  const std::vector<uint16_t> w = GaussianBf16(rows * cols, 1);
  EXPECT_TRUE(RoundTrips(w, rows, cols));
  EXPECT_EQ(PackOrDie(w, rows, cols, 1), PackOrDie(w, rows, cols, 7));
}

// Every kind of value the escapes cover, in groups whose largest exponent varies, with exceptions
// in the first and last rows and several in one group.
TEST(PackedBf16Test, SpecialValuesComeBackBitForBit) {
  const int64_t rows = 64, cols = 256;  // room for 16 exceptions
  std::vector<uint16_t> w = GaussianBf16(rows * cols, 2, 1.f);
  const uint16_t specials[] = {
      0x0000, 0x8000,                  // +0, -0
      0x0001, 0x807f, 0x0040,          // subnormals
      0x0080, 0x8080,                  // the smallest normals (exceptions beside Gaussians of 1)
      0x7f80, 0xff80, 0x7fc0, 0xffc1,  // +-inf, NaNs (their group's base is 255: the rest are exceptions)
      0x7f7f, 0xff7f,                  // the largest finite
  };
  // Row 0: the specials among Gaussians, but for inf/NaN and the largest finite, which go in a
  // group of their own (row 1's second) with values within 14 binades of them, and subnormals.
  int at = 0, high = 0;
  for (uint16_t v : specials) {
    if ((v & 0x7f80) >= 0x7f00) {
      w[cols + 128 + high++] = v;
      continue;
    }
    w[at++ * 9] = v;
  }
  for (int c = 128; c < 256; ++c)
    if (c >= 128 + high) w[cols + c] = static_cast<uint16_t>(c % 3 ? 0x7880 | (c & 0x7f) : c % 128);
  // Row 2: a group at 2^4 with values 14 binades below it (inside the window) and 15 below (exceptions).
  w[2 * cols] = 0x4180;         // 16
  w[2 * cols + 1] = 0x3a80;     // 2^-10
  w[2 * cols + 2] = 0xba00;     // -2^-11
  w[2 * cols + 3] = 0x3a7f;     // just under 2^-10
  w[63 * cols + 255] = 0x2000;  // the last value of the last row
  ASSERT_LE(CountBf16Exceptions(w.data(), rows, cols), F::exception_capacity(rows, cols));
  EXPECT_GE(CountBf16Exceptions(w.data(), rows, cols), 8);
  EXPECT_TRUE(RoundTrips(w, rows, cols));
}

TEST(PackedBf16Test, TooManyExceptionsIsOutOfRangeNamingTheCount) {
  const int64_t rows = 8, cols = 128;
  // Per group one value at 2^20 and the rest at 1: 127 exceptions a row, capacity 1 in all.
  std::vector<uint16_t> w(static_cast<size_t>(rows * cols), 0x3f80);
  for (int64_t r = 0; r < rows; ++r) w[r * cols] = 0x4980;
  std::vector<std::byte> p(WeightBytes(DType::kPbf16, rows, cols));
  EXPECT_EQ(CountBf16Exceptions(w.data(), rows, cols), rows * 127);
  StatusOr<size_t> n = PackBf16(w.data(), rows, cols, p.data(), p.size());
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(n.status().code(), StatusCode::kOutOfRange);
  EXPECT_NE(n.status().message().find("1016 values"), std::string::npos) << n.status().message();
  EXPECT_NE(n.status().message().find("cannot be packed losslessly"), std::string::npos) << n.status().message();
  // Exactly at the capacity packs: one exception in 1024 values.
  std::vector<uint16_t> ok(static_cast<size_t>(rows * cols), 0x3f80);
  ok[7 * cols + 3] = 0x3000;  // 2^-31 in a group at 2^0
  EXPECT_EQ(CountBf16Exceptions(ok.data(), rows, cols), 1);
  EXPECT_TRUE(RoundTrips(ok, rows, cols));
}

TEST(PackedBf16Test, BadShapesAndCorruptBlocksAreClearErrors) {
  std::vector<uint16_t> w(64 * 96, 0x3f80);
  std::vector<std::byte> p(WeightBytes(DType::kPbf16, 64, 128));
  StatusOr<size_t> n = PackBf16(w.data(), 64, 96, p.data(), p.size());
  ASSERT_FALSE(n.ok());
  EXPECT_NE(n.status().message().find("multiple of 128"), std::string::npos) << n.status().message();
  w.resize(64 * 128, 0x3f80);
  n = PackBf16(w.data(), 64, 128, p.data(), p.size() - 16);
  ASSERT_FALSE(n.ok());
  EXPECT_NE(n.status().message().find("needs " + std::to_string(p.size()) + " bytes"), std::string::npos)
      << n.status().message();
  // A block whose row ends lie (past the capacity, or going back) is refused, not read past its end.
  ASSERT_TRUE(PackBf16(w.data(), 64, 128, p.data(), p.size()).ok());
  std::vector<uint16_t> back(w.size());
  const uint32_t lie = 1u << 30;
  std::memcpy(p.data() + F::row_end_offset(64, 128) + 4 * 10, &lie, 4);
  Status s = UnpackBf16(p.data(), 64, 128, back.data());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("row 10"), std::string::npos) << s.message();
  runtime::CpuBackend cpu;
  auto bad = cpu.UploadWeight(DType::kPbf16, p.data(), 64, 64);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("PBF16"), std::string::npos) << bad.status().message();
}

// The experts of models/tiny-code-moe (trained, bf16) and the weights of every fixture family
// (fp32, rounded to bf16; viewed as rows of 128): every bit back, at 0.756x the bytes, and how
// many values needed an exception (the format's capacity is one in 1024).
TEST(PackedBf16Test, ShippedModelAndFixtureWeightsRoundTrip) {
  const std::string data = EF_TEST_DATA;
  const std::vector<std::string> files = {std::string(EF_MODELS_DIR) + "/tiny-code-moe/model.safetensors",
                                          data + "/mixtral/model.safetensors",
                                          data + "/deepseek_v2/model.safetensors",
                                          data + "/deepseek_v3/model.safetensors",
                                          data + "/qwen2_moe/model.safetensors",
                                          data + "/qwen3_moe/model.safetensors",
                                          data + "/olmoe/model.safetensors",
                                          data + "/gpt_oss/model.safetensors"};
  for (const std::string& path : files) {
    auto f = runtime::SafetensorsFile::Open(path);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    int64_t values = 0, exceptions = 0, tensors = 0;
    size_t packed = 0;
    for (const auto& [name, t] : (*f)->tensors()) {
      if (t.shape.size() != 2 || t.numel() % F::kGroup != 0 || (t.dtype != DType::kBF16 && t.dtype != DType::kF32))
        continue;
      std::vector<uint16_t> w(static_cast<size_t>(t.numel()));
      for (int64_t i = 0; i < t.numel(); ++i) {
        if (t.dtype == DType::kBF16) {
          std::memcpy(&w[i], t.data + 2 * i, 2);
        } else {
          float v;
          std::memcpy(&v, t.data + 4 * i, 4);
          w[i] = F32ToBf16(v);
        }
      }
      const int64_t rows = t.numel() / F::kGroup;
      ASSERT_TRUE(RoundTrips(w, rows, F::kGroup)) << path << " " << name;
      values += t.numel();
      exceptions += CountBf16Exceptions(w.data(), rows, F::kGroup);
      packed += F::bytes(rows, F::kGroup);
      ++tensors;
    }
    ASSERT_GT(tensors, 0) << path;
    const double share = static_cast<double>(exceptions) / static_cast<double>(values);
    EXPECT_LT(share, 1.0 / F::kValuesPerException) << path;
    std::printf("[ packed bf16 ] %s: %lld tensors, %lld values, %.4f%% exceptions, %.3fx the bytes of bf16\n",
                path.substr(path.find_last_of('/', path.size() - 19) + 1).c_str(), static_cast<long long>(tensors),
                static_cast<long long>(values), 100 * share, static_cast<double>(packed) / (2.0 * values));
  }
}

// Gemm on the packed weight reads the bf16 values exactly: bitwise the bf16 weight's outputs, for
// any m, with and without accumulation and bias; HostGemv (the host expert kernel: AVX-512 decoding
// in registers where the CPU has it) agrees on whole weights and on blocks of rows and columns.
TEST(PackedBf16Test, CpuGemmEqualsTheBf16WeightsBitwise) {
  runtime::CpuBackend cpu;
  const int64_t n = 96, k = 384;
  std::vector<uint16_t> w = GaussianBf16(n * k, 4);
  w[5] = 0x0000;
  w[700] = 0x2000;         // an exception (row 1)
  w[701] = 0x0003;         // a subnormal
  w[20 * k + 5] = 0xa000;  // exceptions left of the block below and inside it
  w[30 * k + 200] = 0x2100;
  w[79 * k + 383] = 0x1f00;
  const std::vector<std::byte> p = PackOrDie(w, n, k);
  auto wp = cpu.UploadWeight(DType::kPbf16, p.data(), n, k);
  ASSERT_TRUE(wp.ok()) << wp.status().ToString();
  const runtime::Weight wb{DType::kBF16, w.data(), n, k};
  std::vector<float> bias(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) bias[i] = 0.01f * static_cast<float>(i);
  const runtime::Weight b{DType::kF32, bias.data(), 1, n};
  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.f, 1.f);
  for (int64_t m : {1, 3, 17}) {
    std::vector<float> x(static_cast<size_t>(m * k));
    for (float& v : x) v = d(rng);
    for (bool accumulate : {false, true}) {
      std::vector<float> yp(static_cast<size_t>(m * n), 0.5f), yb = yp;
      cpu.Gemm(x.data(), m, *wp, &b, yp.data(), accumulate);
      cpu.Gemm(x.data(), m, wb, &b, yb.data(), accumulate);
      ASSERT_EQ(0, std::memcmp(yp.data(), yb.data(), yp.size() * sizeof(float))) << "m=" << m;
    }
    ThreadPool pool(3);
    // Both vector kernels (AVX-512 decoding in registers; AMX tiles of decoded rows) where the CPU
    // has them; the exact path otherwise.
    for (runtime::HostPath path : {runtime::HostPath::kFloat, runtime::HostPath::kAmx}) {
      for (runtime::GemvBlock block : {runtime::GemvBlock{}, runtime::GemvBlock{16, 80, 128, 384}}) {
        const int64_t rows = (block.row_end < 0 ? n : block.row_end) - block.row_begin;
        const int64_t cols = (block.col_end < 0 ? k : block.col_end) - block.col_begin;
        std::vector<float> xb(static_cast<size_t>(m * cols));
        for (int64_t i = 0; i < m; ++i) std::memcpy(&xb[i * cols], &x[i * k + block.col_begin], cols * sizeof(float));
        std::vector<float> hp(static_cast<size_t>(m * rows)), want(hp.size());
        runtime::HostGemv(pool, xb.data(), m, *wp, hp.data(), block, path);
        // The reference: the fp32 values of the bf16 weight's block, summed in double.
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < rows; ++j) {
            double s = 0;
            for (int64_t c = 0; c < cols; ++c)
              s +=
                  static_cast<double>(xb[i * cols + c]) * Bf16ToF32(w[(block.row_begin + j) * k + block.col_begin + c]);
            want[i * rows + j] = static_cast<float>(s);
          }
        for (size_t i = 0; i < hp.size(); ++i)
          ASSERT_NEAR(hp[i], want[i], 1e-5 * std::max(1.f, std::abs(want[i])))
              << "m=" << m << " path " << static_cast<int>(path) << " element " << i;
      }
    }
  }
}

}  // namespace
}  // namespace ef
