// Helpers for the GPU tests: random inputs, device round trips and error metrics.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/backend/cuda/cuda_backend.h"

namespace ef::runtime::testing {

inline std::vector<float> RandomFloats(size_t n, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// max |got - want| / max |want|: a normwise relative error that stays meaningful where single
// elements of `want` are near zero.
inline double MaxRelError(const std::vector<float>& got, const std::vector<float>& want) {
  EXPECT_EQ(got.size(), want.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
    num = std::max(num, std::abs(double(got[i]) - want[i]));
    den = std::max(den, std::abs(double(want[i])));
  }
  return den > 0 ? num / den : num;
}

// Normalised mean squared error: sum (got - want)^2 / sum want^2 (ggml's test-backend-ops metric).
inline double Nmse(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += double(want[i]) * want[i];
  }
  return den > 0 ? num / den : num;
}

inline bool HaveDevice() { return CudaDeviceAvailable(); }

// A CUDA backend for tests; null (with a recorded failure) when creation fails.
inline std::unique_ptr<CudaBackend> MakeTestCudaBackend(CudaBackendOptions o = {}) {
  auto b = CudaBackend::Create(o);
  EXPECT_TRUE(b.ok()) << b.status().ToString();
  return b.ok() ? std::move(b).value() : nullptr;
}

// Owns device copies of host vectors for one test.
class DeviceArrays {
 public:
  explicit DeviceArrays(Backend* b) : b_(b) {}
  template <typename T>
  T* Put(const std::vector<T>& host) {
    auto buf = b_->Allocate(std::max<size_t>(host.size(), 1) * sizeof(T));
    EXPECT_TRUE(buf.ok());
    b_->CopyToDevice(buf->data(), host.data(), host.size() * sizeof(T));
    bufs_.push_back(std::move(buf).value());
    return static_cast<T*>(bufs_.back().data());
  }
  template <typename T>
  T* Zeros(size_t n) {
    auto buf = b_->Allocate(std::max<size_t>(n, 1) * sizeof(T));
    EXPECT_TRUE(buf.ok());
    bufs_.push_back(std::move(buf).value());
    return static_cast<T*>(bufs_.back().data());
  }
  template <typename T>
  std::vector<T> Get(const T* dev, size_t n) {
    std::vector<T> h(n);
    b_->CopyToHost(h.data(), dev, n * sizeof(T));
    return h;
  }

 private:
  Backend* b_;
  std::vector<Buffer> bufs_;
};

inline std::vector<float> RoundedToBf16(const std::vector<float>& f) {
  std::vector<float> r(f.size());
  for (size_t i = 0; i < f.size(); ++i) r[i] = Bf16ToF32(F32ToBf16(f[i]));
  return r;
}

// Gemm of m random rows on a packed weight (host: the CPU's view, device: its upload), bias
// optional, against the CPU backend. m <= max_gemv_rows: the fused GEMV computes the CPU's fp32
// weight values with fp32 activations, only the summation order differs (<= 1e-5). Larger m:
// cuBLAS on bf16-rounded dequantized weights (`rounded`, F32 [n, k]) and activations with fp32
// accumulation: <= 1e-5 against the CPU fed those rounded operands, NMSE <= 1e-4 against the CPU
// on the exact ones.
inline void ExpectPackedGemmMatchesCpu(CpuBackend& cpu, Backend& gpu, DeviceArrays& dev, const Weight& host,
                                       const Weight& device, const Weight& rounded, const Weight* bias_host,
                                       const Weight* bias_device, int64_t m, bool accumulate, int64_t max_gemv_rows,
                                       const std::string& what) {
  const int64_t n = host.rows, k = host.cols;
  const std::vector<float> x = RandomFloats(m * k, 42 + m);
  const std::vector<float> y0 = RandomFloats(m * n, 43);
  std::vector<float> want = y0;
  cpu.Gemm(x.data(), m, host, bias_host, want.data(), accumulate);
  float* yd = dev.Put(y0);
  gpu.Gemm(dev.Put(x), m, device, bias_device, yd, accumulate);
  const std::vector<float> got = dev.Get(yd, want.size());
  if (m <= max_gemv_rows) {
    EXPECT_LE(MaxRelError(got, want), 1e-5) << "gemv " << what;
    return;
  }
  std::vector<float> want_rounded = y0;
  const std::vector<float> xr = RoundedToBf16(x);
  cpu.Gemm(xr.data(), m, rounded, bias_host, want_rounded.data(), accumulate);
  EXPECT_LE(MaxRelError(got, want_rounded), 1e-5) << "cublas " << what;
  EXPECT_LE(Nmse(got, want), 1e-4) << "cublas " << what;
}

// The fixture of the op tests: a CPU backend (the reference), a CUDA backend (skipped without a
// device) and device arrays; after each test the CUDA backend must have no sticky error.
template <class Base = ::testing::Test>
class CpuVsCudaTest : public Base {
 protected:
  void SetUp() override {
    if (!HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
    gpu_ = MakeTestCudaBackend();
    ASSERT_NE(gpu_, nullptr);
    dev_ = std::make_unique<DeviceArrays>(gpu_.get());
  }
  void TearDown() override {
    if (gpu_) {
      gpu_->Synchronize();
      EXPECT_TRUE(gpu_->status().ok()) << gpu_->status().ToString();
    }
    dev_.reset();
  }
  CpuBackend cpu_;
  std::unique_ptr<CudaBackend> gpu_;
  std::unique_ptr<DeviceArrays> dev_;
};

}  // namespace ef::runtime::testing
