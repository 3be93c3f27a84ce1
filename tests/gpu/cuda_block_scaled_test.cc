// CudaBackend::Gemm on block-scaled weights (kMxfp4, kFp8Block) against the CPU backend on the same
// blocks: the fused-dequantization GEMV (gemv_block_scaled.cu) for m <= kGemvQuantMaxRows, the bf16
// dequantize (dequantize_block_scaled.cu) + cuBLAS path past it, FP8 shapes with partial blocks and
// widths that are no multiple of 16; then the packed experts of the quantized transformers fixtures
// through the CUDA engine against the CPU engine. Skips when no CUDA device is visible.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/core/block_scaled.h"
#include "runtime/engine/engine.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/runtime/block_scaled_weights.h"
#include "tests/runtime/prompt_run.h"
#include "tests/runtime/quant_checkpoint_writer.h"

namespace ef::runtime {
namespace {

using testing::MaxRelError;
using testing::RandomFloats;
using testing::RoundedToBf16;

struct Shape {
  DType t;
  int64_t n, k;
};
std::string Name(const Shape& s) {
  return std::string(DTypeName(s.t)) + " [" + std::to_string(s.n) + ", " + std::to_string(s.k) + "]";
}

// MXFP4: gpt-oss widths (2880: 90 blocks a row), and 4165 x 4096 (two dequantization tiles: 4096
// rows, then 69). FP8: [130, 200] and [300, 257] end in partial blocks in both dimensions with
// widths no multiple of 16 (the byte path); [1000, 672] ends in a partial block of 32 columns on
// the vector path; [2048, 7168] is DeepSeek-V3's expert gate.
const Shape kShapes[] = {{DType::kMxfp4, 128, 64},      {DType::kMxfp4, 1000, 2880},  {DType::kMxfp4, 4165, 4096},
                         {DType::kFp8Block, 130, 200},  {DType::kFp8Block, 300, 257}, {DType::kFp8Block, 1000, 672},
                         {DType::kFp8Block, 2048, 7168}};

class CudaBlockScaledTest : public testing::CpuVsCudaTest<> {
 protected:
  // A random packed weight (kept alive by the fixture), its host Weight and its device copy.
  struct Uploaded {
    const ef::testing::BlockScaledWeight* w;
    Weight host, device;
  };
  Uploaded Upload(const Shape& s, uint64_t seed) {
    keep_.push_back(
        std::make_unique<ef::testing::BlockScaledWeight>(ef::testing::RandomBlockScaled(s.t, s.n, s.k, seed)));
    const ef::testing::BlockScaledWeight& w = *keep_.back();
    auto g = gpu_->UploadWeight(s.t, w.packed.data(), s.n, s.k);
    EXPECT_TRUE(g.ok()) << g.status().ToString();
    return {&w, Weight{s.t, w.packed.data(), s.n, s.k}, g.ok() ? *g : Weight{}};
  }
  std::vector<std::unique_ptr<ef::testing::BlockScaledWeight>> keep_;
};

TEST_F(CudaBlockScaledTest, GemmMatchesCpu) {
  // Bounds in ExpectPackedGemmMatchesCpu (MXFP4's GEMV applies each block's power-of-two scale to
  // the block's sum: the CPU's result up to subnormals and summation order).
  int i = 0;
  for (const Shape& s : kShapes) {
    const bool bias = i % 2 == 1, acc = i % 3 == 2;
    const Uploaded u = Upload(s, 100 + i++);
    ASSERT_FALSE(u.device.empty()) << Name(s);
    const std::vector<float> b = RandomFloats(s.n, 41);
    const Weight bc{DType::kF32, b.data(), 1, s.n};
    auto bg = gpu_->UploadWeight(DType::kF32, b.data(), 1, s.n);
    ASSERT_TRUE(bg.ok());
    const std::vector<float> w_rounded = RoundedToBf16(u.w->values);
    const Weight wr{DType::kF32, w_rounded.data(), s.n, s.k};
    for (int64_t m : {1, 2, 3, 4, 8, 64}) {
      const std::string what = Name(s) + " m=" + std::to_string(m) + (bias ? " bias" : "") + (acc ? " accumulate" : "");
      testing::ExpectPackedGemmMatchesCpu(cpu_, *gpu_, *dev_, u.host, u.device, wr, bias ? &bc : nullptr,
                                          bias ? &*bg : nullptr, m, acc, cuda::kGemvQuantMaxRows, what);
    }
  }
}

TEST_F(CudaBlockScaledTest, GemvEverySplitMatchesCpuAndRowsAreIndependentOfM) {
  const int64_t M = cuda::kGemvQuantMaxRows;
  for (const Shape& s :
       {Shape{DType::kMxfp4, 1000, 4160}, Shape{DType::kFp8Block, 1000, 4160}, Shape{DType::kFp8Block, 333, 1000}}) {
    const Uploaded u = Upload(s, 51);
    ASSERT_FALSE(u.device.empty());
    const std::vector<float> x = RandomFloats(M * s.k, 50);
    const std::vector<float> y0 = RandomFloats(M * s.n, 52);
    float* xd = dev_->Put(x);
    std::vector<float> want = y0;
    cpu_.Gemm(x.data(), M, u.host, nullptr, want.data(), true);
    for (int split = 1; split <= cuda::kGemvMaxWarpsPerRow; split *= 2) {
      float* yd = dev_->Put(y0);
      ASSERT_EQ(cuda::launch_gemv_block_scaled(xd, M, u.device.data, s.t, s.n, s.k, yd, true, split, gpu_->stream()),
                cudaSuccess);
      const std::vector<float> all = dev_->Get(yd, static_cast<size_t>(M * s.n));
      EXPECT_LE(MaxRelError(all, want), 1e-5) << Name(s) << " split " << split;
      for (int64_t r = 0; r < M; ++r) {
        const std::vector<float> row0(y0.begin() + r * s.n, y0.begin() + (r + 1) * s.n);
        float* y1 = dev_->Put(row0);
        ASSERT_EQ(cuda::launch_gemv_block_scaled(xd + r * s.k, 1, u.device.data, s.t, s.n, s.k, y1, true, split,
                                                 gpu_->stream()),
                  cudaSuccess);
        const std::vector<float> want_row(all.begin() + r * s.n, all.begin() + (r + 1) * s.n);
        EXPECT_EQ(dev_->Get(y1, s.n), want_row) << Name(s) << " split " << split << " row " << r;
      }
    }
  }
  float* xd = dev_->Zeros<float>(64);
  EXPECT_FALSE(cuda::gemv_block_scaled_supported(M + 1, 64, DType::kMxfp4, xd, xd));
  EXPECT_FALSE(cuda::gemv_block_scaled_supported(1, 48, DType::kMxfp4, xd, xd));        // 48: not whole blocks
  EXPECT_FALSE(cuda::gemv_block_scaled_supported(1, 64, DType::kQ8, xd, xd));           // not block-scaled
  EXPECT_TRUE(cuda::gemv_block_scaled_supported(1, 57, DType::kFp8Block, xd + 1, xd));  // byte path: any x
  EXPECT_EQ(
      cuda::launch_gemv_block_scaled(xd, 1, xd, DType::kMxfp4, 2, 64, xd, false, /*warps_per_row=*/3, gpu_->stream()),
      cudaErrorInvalidValue);
}

TEST_F(CudaBlockScaledTest, DequantizeBf16IsTheCpuValuesRounded) {
  // A tile starting at row 37 (inside the first 128-row FP8 block) and ending in the second.
  const int64_t row_begin = 37, rows = 200;
  for (const Shape& s :
       {Shape{DType::kMxfp4, 300, 1408}, Shape{DType::kFp8Block, 300, 1408}, Shape{DType::kFp8Block, 300, 201}}) {
    const Uploaded u = Upload(s, 60);
    ASSERT_FALSE(u.device.empty());
    uint16_t* dst = dev_->Zeros<uint16_t>(static_cast<size_t>(rows * s.k));
    ASSERT_EQ(
        cuda::launch_dequantize_block_scaled_bf16(u.device.data, s.t, s.n, s.k, row_begin, rows, dst, gpu_->stream()),
        cudaSuccess);
    const std::vector<uint16_t> got = dev_->Get(dst, static_cast<size_t>(rows * s.k));
    int bad = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < s.k; ++c) {
        const uint16_t want = F32ToBf16(u.w->values[(row_begin + r) * s.k + c]);
        if (got[r * s.k + c] != want && bad++ < 5)
          ADD_FAILURE() << Name(s) << " row " << row_begin + r << " col " << c << ": " << got[r * s.k + c]
                        << " != " << want;
      }
    EXPECT_EQ(bad, 0) << Name(s);
    EXPECT_EQ(
        cuda::launch_dequantize_block_scaled_bf16(u.device.data, s.t, s.n, s.k, s.n - 10, 11, dst, gpu_->stream()),
        cudaErrorInvalidValue);
  }
}

TEST_F(CudaBlockScaledTest, UploadChecksTheBlockAndAccountsTheStoredSize) {
  for (const Shape& s : {Shape{DType::kMxfp4, 64, 128}, Shape{DType::kFp8Block, 130, 200}}) {
    std::vector<std::byte> q(WeightBytes(s.t, s.n, s.k));
    const size_t before = gpu_->bytes_in_use();
    auto w = gpu_->UploadWeight(s.t, q.data(), s.n, s.k);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    EXPECT_EQ(w->nbytes(), q.size());
    EXPECT_GE(gpu_->bytes_in_use(), before + q.size());
  }
  std::vector<std::byte> q(WeightBytes(DType::kMxfp4, 2, 64));
  auto bad = gpu_->UploadWeight(DType::kMxfp4, q.data(), 2, 48);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("multiple of its group (32)"), std::string::npos) << bad.status().message();
}

// The quantized fixtures (gpt_oss: MXFP4 experts with biases; deepseek_v3: block FP8, routed
// experts packed) through the CUDA engine, experts resident on the device, against the CPU engine
// within 1e-3, the CUDA fp32 bound of the transformers fixtures. Tighter than that does not hold:
// past the fused GEMV's 4 rows (the prompt's prefill) a packed expert is dequantized into bf16
// tiles and meets bf16-rounded activations in cuBLAS (measured on H200: 7.3e-4 gpt_oss, 2.2e-4
// deepseek_v3), where the fp32 fixtures' unpacked experts keep fp32 activations.
TEST_F(CudaBlockScaledTest, PackedExpertCheckpointsMatchTheCpuEngine) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("ef_cuda_block_scaled_" + std::to_string(::getpid()));
  for (const std::string family : {"gpt_oss", "deepseek_v3"}) {
    const std::string out = (dir / family).string();
    Status st = ef::runtime::testing::WriteQuantizedFixture(std::string(EF_TEST_DATA) + "/" + family, out);
    ASSERT_TRUE(st.ok()) << st.ToString();
    std::vector<std::unique_ptr<Engine>> engines;
    for (const char* backend : {"cpu", "cuda"}) {
      EngineOptions o;
      o.backend = backend;
      auto e = Engine::Create(out, o);
      ASSERT_TRUE(e.ok()) << e.status().ToString();
      ASSERT_TRUE(IsBlockScaled((*e)->weights().expert_dtype())) << family;
      engines.push_back(std::move(e).value());
    }
    const std::vector<int32_t> prompt = {1, 17, 42, 5, 99, 7, 23, 64, 3, 11};
    const ef::testing::PromptRun a = ef::testing::RunPrompt(*engines[0], prompt, 4);
    const ef::testing::PromptRun b = ef::testing::RunPrompt(*engines[1], prompt, 4);
    double max_diff = 0;
    for (size_t i = 0; i < a.logits.size() && i < b.logits.size(); ++i)
      max_diff = std::max(max_diff, std::abs(double(a.logits[i]) - b.logits[i]));
    std::printf("[ %s packed ] max |cuda - cpu| logit = %.3g\n", family.c_str(), max_diff);
    EXPECT_LT(max_diff, 1e-3) << family;
    EXPECT_EQ(a.tokens, b.tokens) << family;
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace ef::runtime
