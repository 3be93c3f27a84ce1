// The expert cache on CUDA (CachedExpertSource over the CUDA parts: device slots, pinned host
// tier, copy streams, per-slot events) inside the engine: for every transformers fixture, every cache size from top-k
// to all experts per layer and the lru / expertflow policies, with and without prefetch, the logits
// are bitwise identical to the all-resident engine on CUDA (same kernels, same weights, the MoE
// accumulation order fixed), and the counters add up. Biased experts (gpt_oss) carry their biases
// in the slots; packed experts (MXFP4, block FP8 checkpoints) move at their stored size.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "cache/cuda/cuda_cache_source.h"
#include "runtime/core/params.h"
#include "runtime/engine/engine.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/runtime/quant_checkpoint_writer.h"

namespace ef::params {
bool CudaBf16Weights();
}

namespace ef::cache {
namespace {

using runtime::Engine;
using runtime::EngineOptions;

std::unique_ptr<Engine> MakeCudaEngine(const std::string& family, const std::string& dir = "") {
  EngineOptions o;
  o.backend = "cuda";
  auto e = Engine::Create(dir.empty() ? std::string(EF_TEST_DATA) + "/" + family : dir, o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return e.ok() ? std::move(e).value() : nullptr;
}

// Prefill of a prompt, then 6 single-token decode steps (greedy), all logits concatenated.
std::vector<float> RunLogits(Engine& engine) {
  std::vector<float> all;
  std::vector<int32_t> prompt = {11, 42, 7, 99, 3, 150, 2, 77, 5};
  EXPECT_TRUE(engine.AddSequence(1).ok());
  runtime::SeqChunk chunk{1, prompt, true};
  runtime::ForwardResult r;
  Status st = engine.Forward({&chunk, 1}, &r);
  EXPECT_TRUE(st.ok()) << st.ToString();
  all.insert(all.end(), r.logits.begin(), r.logits.end());
  const int V = engine.config().vocab_size;
  for (int step = 0; step < 6 && st.ok(); ++step) {
    const float* last = r.logits.data() + r.logits.size() - V;
    const int32_t next = static_cast<int32_t>(std::max_element(last, last + V) - last);
    const std::vector<int32_t> tok = {next};
    runtime::SeqChunk c{1, tok, true};
    st = engine.Forward({&c, 1}, &r);
    EXPECT_TRUE(st.ok()) << st.ToString();
    all.insert(all.end(), r.logits.begin(), r.logits.end());
  }
  engine.RemoveSequence(1);
  return all;
}

class CudaCachedEngineTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!runtime::testing::HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
    if (params::CudaBf16Weights()) GTEST_SKIP() << "fp32 suite: EF_CUDA_BF16_WEIGHTS is set";
  }
};

TEST_P(CudaCachedEngineTest, LogitsIdenticalToAllResidentForEveryBudget) {
  auto engine = MakeCudaEngine(GetParam());
  ASSERT_NE(engine, nullptr);
  const std::vector<float> want = RunLogits(*engine);
  ASSERT_FALSE(want.empty());
  const auto& c = engine->config();
  for (int slots = c.top_k; slots <= c.num_experts; ++slots) {
    for (const char* policy : {"lru", "expertflow"}) {
      for (int prefetch : {0, 1}) {
        CachedExpertSourceOptions o;
        o.slots_per_layer = slots;
        o.policy = policy;
        o.prefetch_layers = prefetch;
        CudaCacheOptions co;
        co.copy_chunk_bytes = 1 << 20;
        auto src = CreateCudaCacheSource(engine->weights(), &engine->backend(), o, co);
        ASSERT_TRUE(src.ok()) << src.status().ToString();
        if (prefetch) {
          // A fixed, mostly wrong forecast: prefetches evict experts the router then needs, so
          // corrections, waits on in-flight copies and slot reuse are all exercised.
          for (int l = 0; l < c.num_layers; ++l) (*src)->SetUpcoming(l, {0, static_cast<int32_t>(c.num_experts - 1)});
        }
        engine->SetExpertSource(src->get());
        const std::vector<float> got = RunLogits(*engine);
        engine->SetExpertSource(nullptr);
        ASSERT_EQ(got.size(), want.size());
        double max_diff = 0;
        for (size_t i = 0; i < got.size(); ++i) max_diff = std::max(max_diff, double(std::abs(got[i] - want[i])));
        EXPECT_EQ(got, want) << GetParam() << " " << policy << " slots " << slots << " prefetch " << prefetch
                             << ": max |diff| " << max_diff;
        const ExpertStoreStats st = (*src)->stats();
        EXPECT_GT(st.total.hits + st.total.misses, 0);
        const CudaCopyStats& cs = CudaArenaOf(**src).copy_stats();
        const int64_t expert_bytes = static_cast<int64_t>((*src)->layout().Bytes(c.MoeLayers()[0], 0));
        EXPECT_EQ(cs.bytes_h2d, (st.total.misses + st.total.prefetch_issued) * expert_bytes);
        if (slots == c.num_experts && !prefetch) {
          EXPECT_LE(st.total.misses, c.num_moe_layers() * c.num_experts);
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, CudaCachedEngineTest,
                         ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"));

// The quantized fixtures: slots hold the packed experts (and gpt_oss's biases), a slot is the
// stored size rather than the float one, and the logits equal the all-resident engine's.
TEST(CudaCachedEngine, PackedExpertsLoadAtTheirStoredSize) {
  if (!runtime::testing::HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("ef_cached_packed_" + std::to_string(::getpid()));
  for (const std::string family : {"gpt_oss", "deepseek_v3"}) {
    const std::string out = (dir / family).string();
    Status st = runtime::testing::WriteQuantizedFixture(std::string(EF_TEST_DATA) + "/" + family, out);
    ASSERT_TRUE(st.ok()) << st.ToString();
    auto engine = MakeCudaEngine(family, out);
    ASSERT_NE(engine, nullptr);
    ASSERT_TRUE(IsBlockScaled(engine->weights().expert_dtype())) << family;
    const std::vector<float> want = RunLogits(*engine);
    const auto& c = engine->config();
    CachedExpertSourceOptions o;
    o.slots_per_layer = c.top_k;
    o.policy = "lru";
    CudaCacheOptions co;
    auto src = CreateCudaCacheSource(engine->weights(), &engine->backend(), o, co);
    ASSERT_TRUE(src.ok()) << src.status().ToString();
    const int first = c.MoeLayers().front();
    const runtime::ExpertWeights& w = engine->weights().host_expert(first, 0);
    const runtime::ExpertWeights shape = (*src)->layout().Shape(first, 0);
    EXPECT_EQ(shape.gate.dtype, w.gate.dtype) << family;
    EXPECT_EQ(shape.has_bias(), w.has_bias()) << family;
    // Each part padded to 256 bytes: at most 5 x 255 bytes over the packed expert.
    const size_t slot = (*src)->layout().Bytes(first, 0);
    EXPECT_GE(slot, w.nbytes()) << family;
    EXPECT_LT(slot, w.nbytes() + 5 * 255) << family;
    engine->SetExpertSource(src->get());
    const std::vector<float> got = RunLogits(*engine);
    engine->SetExpertSource(nullptr);
    EXPECT_EQ(got, want) << family;
    EXPECT_GT((*src)->stats().total.misses, 0) << family;
    if (w.has_bias()) {
      co.cpu_compute = "on";
      auto refused = CreateCudaCacheSource(engine->weights(), &engine->backend(), o, co);
      ASSERT_FALSE(refused.ok());
      EXPECT_NE(refused.status().message().find("without biases"), std::string::npos) << refused.status().ToString();
    }
  }
  fs::remove_all(dir);
}

TEST(CudaCachedEngine, BudgetSmallerThanTopKIsAnError) {
  if (!runtime::testing::HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  auto engine = MakeCudaEngine("qwen3_moe");  // top-4
  ASSERT_NE(engine, nullptr);
  CachedExpertSourceOptions o;
  o.slots_per_layer = 3;
  auto src = CreateCudaCacheSource(engine->weights(), &engine->backend(), o, CudaCacheOptions{});
  ASSERT_FALSE(src.ok());
  EXPECT_NE(src.status().message().find("smaller than the model's top-k (4)"), std::string::npos)
      << src.status().ToString();
}

}  // namespace
}  // namespace ef::cache
