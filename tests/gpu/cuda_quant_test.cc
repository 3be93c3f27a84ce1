// CudaBackend::Gemm on quantized weights (kQ8, kQ4) against the CPU backend on the same blocks:
// the fused-dequantization GEMV (gemv_quant.cu) for m <= kGemvQuantMaxRows, the bf16 dequantize
// (dequantize.cu) + cuBLAS path past it. Skips when no CUDA device is visible.
#include <gtest/gtest.h>

#include <cstring>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/core/quant.h"
#include "runtime/engine/engine.h"
#include "tests/gpu/gpu_test_util.h"

namespace ef::runtime {
namespace {

using testing::DeviceArrays;
using testing::MaxRelError;
using testing::Nmse;
using testing::RandomFloats;
using testing::RoundedToBf16;

class CudaQuantTest : public testing::CpuVsCudaTest<> {
 protected:
  // A quantized block on the host (kept alive by the fixture) and its device copy.
  std::pair<Weight, Weight> Quantized(DType t, const std::vector<float>& w, int64_t n, int64_t k) {
    keep_.emplace_back(WeightBytes(t, n, k));
    auto bytes = Quantize(t, DType::kF32, w.data(), n, k, keep_.back().data(), keep_.back().size());
    EXPECT_TRUE(bytes.ok()) << bytes.status().ToString();
    const Weight c{t, keep_.back().data(), n, k};
    auto g = gpu_->UploadWeight(t, c.data, n, k);
    EXPECT_TRUE(g.ok()) << g.status().ToString();
    return {c, g.ok() ? *g : Weight{}};
  }

  std::vector<std::vector<std::byte>> keep_;
};

TEST_F(CudaQuantTest, GemmMatchesCpu) {
  // Bounds in ExpectPackedGemmMatchesCpu (the GEMV for m <= kGemvQuantMaxRows, cuBLAS on bf16
  // tiles past it). The 4165 x 4096 weight takes two dequantization tiles (4096 rows, then 69).
  struct Case {
    int64_t n, k;
    bool bias, acc;
  };
  for (DType t : {DType::kQ8, DType::kQ4}) {
    for (Case c : {Case{128, 64, false, false}, Case{1000, 640, true, false}, Case{1024, 4096, false, true},
                   Case{4096, 1408, true, true}, Case{4165, 4096, false, false}}) {
      const std::vector<float> w = RandomFloats(c.n * c.k, 40 + c.n, -0.05f, 0.05f);
      auto [wc, wg] = Quantized(t, w, c.n, c.k);
      ASSERT_FALSE(wg.empty());
      const std::vector<float> b = RandomFloats(c.n, 41);
      const Weight bc{DType::kF32, b.data(), 1, c.n};
      auto bg = gpu_->UploadWeight(DType::kF32, b.data(), 1, c.n);
      ASSERT_TRUE(bg.ok());
      // The bf16 operands the cuBLAS path sees.
      std::vector<float> deq(static_cast<size_t>(c.n * c.k));
      ASSERT_TRUE(Dequantize(t, wc.data, c.n, c.k, deq.data()).ok());
      const std::vector<float> deq_rounded = RoundedToBf16(deq);
      const Weight wr{DType::kF32, deq_rounded.data(), c.n, c.k};
      for (int64_t m : {1, 2, 3, 4, 16, 64}) {
        const std::string what = std::string(DTypeName(t)) + " m=" + std::to_string(m) + " n=" + std::to_string(c.n) +
                                 " k=" + std::to_string(c.k);
        testing::ExpectPackedGemmMatchesCpu(cpu_, *gpu_, *dev_, wc, wg, wr, c.bias ? &bc : nullptr,
                                            c.bias ? &*bg : nullptr, m, c.acc, cuda::kGemvQuantMaxRows, what);
      }
    }
  }
}

// A trained checkpoint's experts (models/tiny-code-moe, bf16, widths 128 and 256), quantized from
// bf16 as the expert cache's tiers do: the device's GEMMs on the blocks compute what the CPU's do.
TEST_F(CudaQuantTest, TrainedExpertsMatchCpu) {
  EngineOptions eo;
  eo.backend = "cpu";
  auto engine = Engine::Create(std::string(EF_TEST_DATA) + "/../../models/tiny-code-moe", eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const ModelConfig& c = (*engine)->config();
  for (DType t : {DType::kQ8, DType::kQ4}) {
    for (int l : {0, c.num_layers - 1}) {
      for (int e = 0; e < c.num_experts; ++e) {
        const ExpertWeights& w = (*engine)->weights().host_expert(l, e);
        for (const Weight* p : {&w.gate, &w.up, &w.down}) {
          keep_.emplace_back(WeightBytes(t, p->rows, p->cols));
          auto q = Quantize(t, p->dtype, p->data, p->rows, p->cols, keep_.back().data(), keep_.back().size());
          ASSERT_TRUE(q.ok()) << q.status().ToString();
          const Weight wc{t, keep_.back().data(), p->rows, p->cols};
          auto wg = gpu_->UploadWeight(t, wc.data, p->rows, p->cols);
          ASSERT_TRUE(wg.ok()) << wg.status().ToString();
          for (int64_t m : {1, 2, 3, 4, 9}) {
            const std::vector<float> x = RandomFloats(m * p->cols, 70 + m);
            std::vector<float> want(static_cast<size_t>(m * p->rows));
            cpu_.Gemm(x.data(), m, wc, nullptr, want.data(), false);
            float* yd = dev_->Zeros<float>(want.size());
            gpu_->Gemm(dev_->Put(x), m, *wg, nullptr, yd, false);
            const std::vector<float> got = dev_->Get(yd, want.size());
            const std::string what = std::string(DTypeName(t)) + " layer " + std::to_string(l) + " expert " +
                                     std::to_string(e) + " [" + std::to_string(p->rows) + ", " +
                                     std::to_string(p->cols) + "] m=" + std::to_string(m);
            if (m <= cuda::kGemvQuantMaxRows)
              EXPECT_LE(MaxRelError(got, want), 1e-5) << what;
            else
              EXPECT_LE(Nmse(got, want), 1e-4) << what;
          }
        }
      }
    }
  }
}

TEST_F(CudaQuantTest, GemvEverySplitMatchesCpuAndRowsAreIndependentOfM) {
  // As GemvEverySplitMatchesCpuAndRowsAreIndependentOfM of cuda_ops_test.cc: n not a multiple of
  // the rows per block, a row's chunk count (Q8: 260, Q4: 130) not a multiple of 32.
  const int64_t n = 1000, k = 4160, M = cuda::kGemvQuantMaxRows;
  const std::vector<float> x = RandomFloats(M * k, 50);
  const std::vector<float> w = RandomFloats(n * k, 51, -0.05f, 0.05f);
  const std::vector<float> y0 = RandomFloats(M * n, 52);
  float* xd = dev_->Put(x);
  for (DType t : {DType::kQ8, DType::kQ4}) {
    auto [wc, wg] = Quantized(t, w, n, k);
    ASSERT_FALSE(wg.empty());
    std::vector<float> want = y0;
    cpu_.Gemm(x.data(), M, wc, nullptr, want.data(), true);
    for (int split = 1; split <= cuda::kGemvMaxWarpsPerRow; split *= 2) {
      float* yd = dev_->Put(y0);
      ASSERT_EQ(cuda::launch_gemv_quant(xd, M, wg.data, t, n, k, yd, true, split, gpu_->stream()), cudaSuccess);
      const std::vector<float> all = dev_->Get(yd, static_cast<size_t>(M * n));
      EXPECT_LE(MaxRelError(all, want), 1e-5) << DTypeName(t) << " split " << split;
      for (int64_t r = 0; r < M; ++r) {
        const std::vector<float> row0(y0.begin() + r * n, y0.begin() + (r + 1) * n);
        float* y1 = dev_->Put(row0);
        ASSERT_EQ(cuda::launch_gemv_quant(xd + r * k, 1, wg.data, t, n, k, y1, true, split, gpu_->stream()),
                  cudaSuccess);
        const std::vector<float> want_row(all.begin() + r * n, all.begin() + (r + 1) * n);
        EXPECT_EQ(dev_->Get(y1, n), want_row) << DTypeName(t) << " split " << split << " row " << r;
      }
    }
  }
  EXPECT_FALSE(cuda::gemv_quant_supported(M + 1, k, DType::kQ8, xd, xd));
  EXPECT_FALSE(cuda::gemv_quant_supported(1, 96, DType::kQ8, xd, xd));   // 96: not a multiple of 64
  EXPECT_FALSE(cuda::gemv_quant_supported(1, k, DType::kBF16, xd, xd));  // not quantized
  EXPECT_EQ(cuda::launch_gemv_quant(xd, 1, xd, DType::kQ4, n, k, nullptr, false, /*warps_per_row=*/3, gpu_->stream()),
            cudaErrorInvalidValue);
}

TEST_F(CudaQuantTest, DequantizeBf16IsTheCpuValuesRounded) {
  const int64_t n = 300, k = 1408, row_begin = 37, rows = 200;
  const std::vector<float> w = RandomFloats(n * k, 60, -0.05f, 0.05f);
  for (DType t : {DType::kQ8, DType::kQ4}) {
    auto [wc, wg] = Quantized(t, w, n, k);
    ASSERT_FALSE(wg.empty());
    uint16_t* dst = dev_->Zeros<uint16_t>(static_cast<size_t>(rows * k));
    ASSERT_EQ(cuda::launch_dequantize_bf16(wg.data, t, n, k, row_begin, rows, dst, gpu_->stream()), cudaSuccess);
    const std::vector<uint16_t> got = dev_->Get(dst, static_cast<size_t>(rows * k));
    std::vector<float> row(k);
    int bad = 0;
    for (int64_t r = 0; r < rows; ++r) {
      DequantizeRow(t, wc.data, n, k, row_begin + r, row.data());
      for (int64_t c = 0; c < k; ++c)
        if (got[r * k + c] != F32ToBf16(row[c]) && bad++ < 5)
          ADD_FAILURE() << DTypeName(t) << " row " << row_begin + r << " col " << c << ": " << got[r * k + c]
                        << " != " << F32ToBf16(row[c]);
    }
    EXPECT_EQ(bad, 0) << DTypeName(t);
    EXPECT_EQ(cuda::launch_dequantize_bf16(wg.data, t, n, k, n - 10, 11, dst, gpu_->stream()), cudaErrorInvalidValue);
  }
}

TEST_F(CudaQuantTest, UploadChecksTheGroupAndAccountsTheBlock) {
  std::vector<std::byte> q(WeightBytes(DType::kQ4, 64, 128));
  const size_t before = gpu_->bytes_in_use();
  auto w = gpu_->UploadWeight(DType::kQ4, q.data(), 64, 128);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  EXPECT_EQ(w->nbytes(), q.size());
  EXPECT_GE(gpu_->bytes_in_use(), before + q.size());
  auto bad = gpu_->UploadWeight(DType::kQ8, q.data(), 2, 96);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("multiple of its group (64)"), std::string::npos) << bad.status().message();
}

}  // namespace
}  // namespace ef::runtime
