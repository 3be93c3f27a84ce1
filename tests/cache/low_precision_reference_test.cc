// Low-precision loads (cache.miss_precision int8 / int4) compute the model whose experts are the
// quantize-dequantize of the checkpoint's ("fake-quantized"), no more and no less: the CPU engine
// with the expert cache at the smallest budget against the CPU engine whose expert source hands
// out fp32 copies of the dequantized experts. Equality within fp32 rounding (the Gemm reads the
// same values in both; only F32 vs Q8G/Q4G row conversion order differs: none, in fact, since
// DequantizeRow is what both use), so 1e-6 relative.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>
#include <vector>

#include "cache/expert_cache.h"
#include "runtime/core/quant.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/expert_source.h"
#include "tests/runtime/fake_quant.h"
#include "tests/runtime/prompt_run.h"

namespace ef::cache {
namespace {

using runtime::Engine;

// Every expert as fp32 values of Dequantize(Quantize(w)) (or w itself where the width does not
// allow the format's group, as the tiers keep those in the checkpoint's precision).
class FakeQuantSource final : public runtime::ExpertSource {
 public:
  static std::unique_ptr<FakeQuantSource> Create(const runtime::ModelWeights& m, DType t) {
    auto s = std::make_unique<FakeQuantSource>();
    const runtime::ModelConfig& c = m.config();
    for (int l : c.MoeLayers())
      for (int e = 0; e < c.num_experts; ++e) {
        const runtime::ExpertWeights& w = m.host_expert(l, e);
        runtime::ExpertWeights f = w;
        runtime::Weight* to[] = {&f.gate, &f.up, &f.down};
        for (runtime::Weight* p : to) {
          const std::vector<float>& dst = s->store_.emplace_back(ef::testing::FakeQuantized(*p, t));
          *p = runtime::Weight{DType::kF32, dst.data(), p->rows, p->cols};
        }
        s->experts_[{l, e}] = f;
      }
    return s;
  }
  StatusOr<runtime::ExpertWeights> Acquire(int layer, int expert) override { return experts_.at({layer, expert}); }

 private:
  std::vector<std::vector<float>> store_;
  std::map<std::pair<int, int>, runtime::ExpertWeights> experts_;
};

double Distance(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
  return std::sqrt(num / den);
}

class LowPrecisionReferenceTest : public ::testing::TestWithParam<std::string> {};

TEST_P(LowPrecisionReferenceTest, CacheLoadsComputeTheFakeQuantizedModel) {
  const std::string dir = GetParam() == "tiny-code-moe" ? std::string(EF_MODELS_DIR) + "/tiny-code-moe"
                                                        : std::string(EF_TEST_DATA) + "/" + GetParam();
  runtime::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = Engine::Create(dir, eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const std::vector<int32_t> prompt = {11, 42, 7, 99, 3, 150, 2, 77, 5};
  const ef::testing::PromptRun native = ef::testing::RunPrompt(**engine, prompt, 4);
  for (DType t : {DType::kQ8, DType::kQ4}) {
    auto fake = FakeQuantSource::Create((*engine)->weights(), t);
    (*engine)->SetExpertSource(fake.get());
    const ef::testing::PromptRun want = ef::testing::RunPrompt(**engine, prompt, 4);
    (*engine)->SetExpertSource(nullptr);

    ExpertCacheOptions o;
    o.policy = "lru";
    o.predictor = "none";
    o.prefetch_layers = 0;
    o.slots_per_layer = (*engine)->config().top_k;
    o.miss_precision = t == DType::kQ8 ? "int8" : "int4";
    auto cache = ExpertCache::Create(engine->get(), o);
    ASSERT_TRUE(cache.ok()) << cache.status().ToString();
    const ef::testing::PromptRun got = ef::testing::RunPrompt(**engine, prompt, 4);
    cache->reset();
    ASSERT_EQ(got.logits.size(), want.logits.size());
    EXPECT_LE(Distance(got.logits, want.logits), 1e-6)
        << GetParam() << " " << o.miss_precision << ": the fake-quantized model is "
        << Distance(want.logits, native.logits) << " from the native one";
    EXPECT_EQ(got.tokens, want.tokens) << GetParam() << " " << o.miss_precision;
    // The quantization itself moves the logits (so the comparison above could fail).
    EXPECT_GT(Distance(want.logits, native.logits), 1e-5) << GetParam() << " " << o.miss_precision;
    std::printf("[ low precision ] %s %s: fake-quantized model %.4g from the native one\n", GetParam().c_str(),
                o.miss_precision.c_str(), Distance(want.logits, native.logits));
  }
}

// A budget of every expert, in int4 slots: the cache stays on and every expert is int4 (turning it
// off would upload every expert in the checkpoint's precision, four times the memory asked for). In
// the checkpoint's precision the same budget turns the cache off.
TEST(LowPrecisionBudget, EveryExpertInLowPrecisionSlotsKeepsTheCacheOn) {
  runtime::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = Engine::Create(std::string(EF_MODELS_DIR) + "/tiny-code-moe", eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const std::vector<int32_t> prompt = {11, 42, 7, 99, 3, 150, 2, 77, 5};
  auto fake = FakeQuantSource::Create((*engine)->weights(), DType::kQ4);
  (*engine)->SetExpertSource(fake.get());
  const ef::testing::PromptRun want = ef::testing::RunPrompt(**engine, prompt, 4);
  (*engine)->SetExpertSource(nullptr);
  for (const char* precision : {"int4", "native"}) {
    ExpertCacheOptions o;
    o.policy = "lru";
    o.predictor = "none";
    o.prefetch_layers = 0;
    o.slots_per_layer = (*engine)->config().num_experts;
    o.miss_precision = precision;
    auto cache = ExpertCache::Create(engine->get(), o);
    ASSERT_TRUE(cache.ok()) << cache.status().ToString();
    if (std::string(precision) == "native") {
      EXPECT_FALSE((*cache)->active()) << (*cache)->Describe();
      continue;
    }
    ASSERT_TRUE((*cache)->active()) << (*cache)->Describe();
    EXPECT_NE((*cache)->Describe().find("8 of 8 slots per MoE layer"), std::string::npos) << (*cache)->Describe();
    const ef::testing::PromptRun got = ef::testing::RunPrompt(**engine, prompt, 4);
    cache->reset();
    EXPECT_LE(Distance(got.logits, want.logits), 1e-6);
    EXPECT_EQ(got.tokens, want.tokens);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, LowPrecisionReferenceTest, ::testing::Values("tiny-code-moe", "mixtral"));

}  // namespace
}  // namespace ef::cache
