// The expert cache inside the engine: outputs identical whatever the budget and policy; counters
// add up; under a routing trace override the engine's hit rate equals the trace replay's.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "cache/cached_expert_source.h"
#include "cache/replay.h"
#include "placement/trace_routing_override.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/generator.h"
#include "runtime/model/safetensors_file.h"
#include "tests/runtime/prompt_run.h"

namespace ef::cache {
namespace {

namespace fs = std::filesystem;
using runtime::Engine;
using runtime::EngineOptions;

std::unique_ptr<Engine> MakeEngine(const std::string& dir) {
  EngineOptions o;
  o.backend = "cpu";
  auto e = Engine::Create(dir, o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return std::move(e).value();
}

using Output = ef::testing::PromptRun;

Output RunModel(Engine& engine) { return ef::testing::RunPrompt(engine, {11, 42, 7, 99, 3, 150, 2, 77, 5}, 8); }

class CachedEngineTest : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(CachedEngineTest, IdenticalOutputsForEveryBudgetAndPolicy) {
  const auto& [family, policy] = GetParam();
  const std::string dir = family == "tiny-code-moe" ? std::string(EF_MODELS_DIR) + "/tiny-code-moe"
                                                    : std::string(EF_TEST_DATA) + "/" + family;
  auto engine = MakeEngine(dir);
  const auto& c = engine->config();
  // The reference run (all experts resident) also counts routing, the profile `static` pins by.
  std::vector<int64_t> counts(static_cast<size_t>(c.num_layers) * c.num_experts, 0);
  engine->AddRoutingHook([&](runtime::LayerRouting& r) {
    for (int32_t e : r.ids) ++counts[static_cast<size_t>(r.layer) * c.num_experts + e];
    return Status::Ok();
  });
  const Output want = RunModel(*engine);
  engine->ClearRoutingHooks();
  for (int slots = c.top_k; slots <= c.num_experts; slots += std::max(1, (c.num_experts - c.top_k) / 3)) {
    for (bool async : {false, true}) {
      CachedExpertSourceOptions o;
      o.slots_per_layer = slots;
      o.policy = policy;
      o.async = async;
      o.prefetch_layers = 1;
      o.static_counts = counts;
      auto src = CachedExpertSource::Create(engine->weights(), &engine->backend(), o);
      ASSERT_TRUE(src.ok()) << src.status().ToString();
      engine->SetExpertSource(src->get());
      const Output got = RunModel(*engine);
      engine->SetExpertSource(nullptr);
      EXPECT_EQ(got.logits, want.logits) << family << " " << policy << " slots " << slots << " async " << async;
      EXPECT_EQ(got.tokens, want.tokens) << family << " " << policy << " slots " << slots;
      (*src)->store().WaitForPrefetches();
      const ExpertStoreStats st = (*src)->stats();
      EXPECT_GT(st.total.hits + st.total.misses, 0);
      if (slots == c.num_experts && !async) {
        EXPECT_LE(st.total.misses, c.num_moe_layers() * c.num_experts);
      }
    }
  }
  // A global budget shared by all layers gives the same result too.
  CachedExpertSourceOptions o;
  o.global_slots = c.top_k;
  o.policy = policy;
  o.static_counts = counts;
  auto src = CachedExpertSource::Create(engine->weights(), &engine->backend(), o);
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  engine->SetExpertSource(src->get());
  EXPECT_EQ(RunModel(*engine).tokens, want.tokens);
  engine->SetExpertSource(nullptr);
}

INSTANTIATE_TEST_SUITE_P(FamiliesAndPolicies, CachedEngineTest,
                         ::testing::Combine(::testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                                                              "deepseek_v2", "deepseek_v3", "gpt_oss", "tiny-code-moe"),
                                            ::testing::Values("lru", "lfu", "expertflow", "static")));

TEST(CachedEngine, BudgetSmallerThanTopKIsAnError) {
  auto engine = MakeEngine(std::string(EF_TEST_DATA) + "/qwen3_moe");  // top-4
  CachedExpertSourceOptions o;
  o.slots_per_layer = 3;
  auto src = CachedExpertSource::Create(engine->weights(), &engine->backend(), o);
  ASSERT_FALSE(src.ok());
  EXPECT_NE(src.status().message().find("smaller than the model's top-k (4)"), std::string::npos)
      << src.status().ToString();
}

// The source's per-layer steps, driven by hand on tiny-code-moe (one slot more than top-k per
// layer): OnRouting puts hits first and acquires every expert of the layer at once (a miss loads
// there, before Acquire), and the prefetch after the last MoE layer wraps to the first one, whose
// upcoming list forecasts the next step.
TEST(CachedEngine, RoutingAcquiresTheLayerAndPrefetchWrapsIntoTheNextStep) {
  auto engine = MakeEngine(std::string(EF_MODELS_DIR) + "/tiny-code-moe");
  const auto& c = engine->config();
  const std::vector<int> moe = c.MoeLayers();
  ASSERT_GE(moe.size(), 2u);
  ASSERT_GE(c.num_experts, 4);
  CachedExpertSourceOptions o;
  o.slots_per_layer = c.top_k + 1;
  o.policy = "lru";
  o.prefetch_layers = 1;
  auto src = CachedExpertSource::Create(engine->weights(), &engine->backend(), o);
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  CachedExpertSource& s = **src;
  const int last = moe.back(), first = moe.front();
  // Expert 2 of the last layer resident before its routing.
  ASSERT_TRUE(s.Acquire(last, 2).ok());
  s.Release(last, 2);
  s.SetUpcoming(first, {3});
  std::vector<int32_t> experts = {0, 1, 2};
  s.OnRouting(last, experts);
  EXPECT_EQ(experts, (std::vector<int32_t>{2, 0, 1}));  // the hit first, the misses in routing order
  ExpertCounters t = s.stats().total;
  EXPECT_EQ(t.hits, 1);
  EXPECT_EQ(t.misses, 3);  // the first load of 2, then 0 and 1 at routing
  EXPECT_TRUE(s.store().IsResident(first, 3)) << "the prefetch did not wrap to the first MoE layer";
  EXPECT_EQ(t.prefetch_issued, 1);
  for (int32_t e : experts) {
    ASSERT_TRUE(s.Acquire(last, e).ok());  // held since routing: no further access counted
    s.Release(last, e);
  }
  t = s.stats().total;
  EXPECT_EQ(t.hits + t.misses, 4);
}

// One access sequence driven by hand on tiny-code-moe, with and without the store's load worker:
// the first MoE layer routes to 0 and 1 (neither forecast: corrections) while 3 of the second is
// forecast and prefetched; the second routes to 3 (in time: a hit, a prefetch used) and 0 (a
// correction). A correction is a miss and a load, never a prefetch or a hit, whichever thread loads
// it; both paths count the same. The loads end before the compute (WaitForPrefetches), as they may.
TEST(CachedEngine, CorrectionsCountAsMissesWithAndWithoutTheLoadWorker) {
  auto engine = MakeEngine(std::string(EF_MODELS_DIR) + "/tiny-code-moe");
  const auto& c = engine->config();
  const std::vector<int> moe = c.MoeLayers();
  ASSERT_GE(moe.size(), 2u);
  ASSERT_GE(c.num_experts, 4);
  std::vector<ExpertCounters> got;
  for (bool async : {false, true}) {
    SCOPED_TRACE(async ? "async" : "sync");
    CachedExpertSourceOptions o;
    o.slots_per_layer = c.top_k + 1;
    o.policy = "lru";
    o.prefetch_layers = 1;
    o.async = async;
    auto src = CachedExpertSource::Create(engine->weights(), &engine->backend(), o);
    ASSERT_TRUE(src.ok()) << src.status().ToString();
    CachedExpertSource& s = **src;
    s.SetUpcoming(moe[1], {3});
    using Step = std::pair<int, std::vector<int32_t>>;  // a MoE layer, the experts its router picked
    for (Step step : std::vector<Step>{{moe[0], {0, 1}}, {moe[1], {3, 0}}}) {
      auto& [layer, routed] = step;
      s.OnRouting(layer, routed);
      s.store().WaitForPrefetches();
      for (int32_t e : routed) {
        ASSERT_TRUE(s.Acquire(layer, e).ok());
        s.Release(layer, e);
      }
    }
    const ExpertCounters t = s.stats().total;
    EXPECT_EQ(t.misses, 3);  // 0 and 1 of the first layer, 0 of the second
    EXPECT_EQ(t.hits, 1);    // 3 of the second
    EXPECT_EQ(t.prefetch_issued, 1);
    EXPECT_EQ(t.prefetch_used, 1);
    EXPECT_EQ(t.prefetch_wasted, 0);
    EXPECT_EQ(t.bytes_from_host, static_cast<int64_t>(s.layout().Bytes(moe[0], 0) + s.layout().Bytes(moe[0], 1) +
                                                      s.layout().Bytes(moe[1], 3) + s.layout().Bytes(moe[1], 0)));
    EXPECT_EQ(t.bytes_from_device, static_cast<int64_t>(s.layout().Bytes(moe[1], 3)));
    got.push_back(t);
  }
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].hits, got[1].hits);
  EXPECT_EQ(got[0].misses, got[1].misses);
  EXPECT_EQ(got[0].prefetch_issued, got[1].prefetch_issued);
  EXPECT_EQ(got[0].prefetch_used, got[1].prefetch_used);
  EXPECT_EQ(got[0].bytes_from_host, got[1].bytes_from_host);
}

// A pass that fails after its layer's routing leaves the experts it had not computed acquired; the
// layer's next routing releases them, so a budget of top-k slots is not held by them for good.
TEST(CachedEngine, RoutingReleasesWhatAFailedPassStillHeld) {
  auto engine = MakeEngine(std::string(EF_MODELS_DIR) + "/tiny-code-moe");
  const auto& c = engine->config();
  ASSERT_GE(c.num_experts, 2 * c.top_k);
  CachedExpertSourceOptions o;
  o.slots_per_layer = c.top_k;
  o.policy = "lru";
  o.prefetch_layers = 0;
  auto src = CachedExpertSource::Create(engine->weights(), &engine->backend(), o);
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  CachedExpertSource& s = **src;
  const int layer = c.MoeLayers().front();
  std::vector<int32_t> first(c.top_k), second(c.top_k);
  std::iota(first.begin(), first.end(), 0);
  std::iota(second.begin(), second.end(), c.top_k);
  s.OnRouting(layer, first);  // acquires every slot of the layer; the pass then fails: no Release
  std::vector<int32_t> next = second;
  s.OnRouting(layer, next);
  for (int32_t e : next) {
    auto w = s.Acquire(layer, e);
    ASSERT_TRUE(w.ok()) << "expert " << e << ": " << w.status().ToString();
    s.Release(layer, e);
  }
  for (int32_t e : second) EXPECT_TRUE(s.store().IsResident(layer, e));
  for (int32_t e : first) EXPECT_FALSE(s.store().IsResident(layer, e));
}

// A tiny synthetic checkpoint with the Mixtral-8x7B routing shape (32 layers x 8 experts, top-2),
// written with the project's safetensors writer.
std::string WriteSyntheticMixtral(const fs::path& dir, int layers, int experts) {
  fs::create_directories(dir);
  const int H = 16, I = 32, V = 64, heads = 2, kv = 1, hd = 8;
  std::ofstream(dir / "config.json") << "{\"model_type\": \"mixtral\", \"vocab_size\": " << V
                                     << ", \"hidden_size\": " << H << ", \"intermediate_size\": " << I
                                     << ", \"num_hidden_layers\": " << layers << ", \"num_attention_heads\": " << heads
                                     << ", \"num_key_value_heads\": " << kv << ", \"num_local_experts\": " << experts
                                     << ", \"num_experts_per_tok\": 2, \"max_position_embeddings\": 512}";
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 0.1f);
  std::vector<std::vector<float>> store;
  std::vector<runtime::TensorToWrite> ts;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    store.emplace_back(n);
    for (auto& v : store.back()) v = shape.size() == 1 ? 1.f : nd(rng);
    ts.push_back({name, DType::kF32, shape, nullptr});
  };
  add("model.embed_tokens.weight", {V, H});
  add("model.norm.weight", {H});
  add("lm_head.weight", {V, H});
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l);
    add(p + ".input_layernorm.weight", {H});
    add(p + ".post_attention_layernorm.weight", {H});
    add(p + ".self_attn.q_proj.weight", {heads * hd, H});
    add(p + ".self_attn.k_proj.weight", {kv * hd, H});
    add(p + ".self_attn.v_proj.weight", {kv * hd, H});
    add(p + ".self_attn.o_proj.weight", {H, heads * hd});
    add(p + ".block_sparse_moe.gate.weight", {experts, H});
    for (int e = 0; e < experts; ++e) {
      const std::string q = p + ".block_sparse_moe.experts." + std::to_string(e);
      add(q + ".w1.weight", {I, H});
      add(q + ".w2.weight", {H, I});
      add(q + ".w3.weight", {I, H});
    }
  }
  for (size_t i = 0; i < ts.size(); ++i) ts[i].data = store[i].data();
  EXPECT_TRUE(runtime::WriteSafetensors((dir / "model.safetensors").string(), ts).ok());
  return dir.string();
}

TEST(CachedEngine, CountersUnderTraceOverrideAgreeWithReplay) {
  const std::string trace_path = std::string(EF_TEST_DATA) + "/traces/mixtral8x7b_gsm8k_decode.jsonl";
  ASSERT_TRUE(fs::exists(trace_path)) << trace_path << " is missing (tests/data/traces)";
  auto trace = placement::ReadRoutingTrace(trace_path);
  ASSERT_TRUE(trace.ok());
  const fs::path dir = fs::temp_directory_path() / ("ef_synth_mixtral_" + std::to_string(::getpid()));
  auto engine = MakeEngine(WriteSyntheticMixtral(dir, 32, 8));
  auto ov = placement::TraceRoutingOverride::Create(*trace, engine->config());
  ASSERT_TRUE(ov.ok()) << ov.status().ToString();
  engine->AddRoutingHook((*ov)->Hook());
  CachedExpertSourceOptions o;
  o.slots_per_layer = 4;
  o.policy = "lru";
  auto src = CachedExpertSource::Create(engine->weights(), &engine->backend(), o);
  ASSERT_TRUE(src.ok());
  engine->SetExpertSource(src->get());
  // Decode the trace's tokens one at a time (batch 1, as the trace was recorded), one sequence
  // per trace sequence.
  trace->SortBySeqPos();
  int64_t seq = -1;
  for (const auto& t : trace->tokens) {
    if (t.seq != seq) {
      if (seq >= 0) engine->RemoveSequence(seq);
      seq = t.seq;
      ASSERT_TRUE(engine->AddSequence(seq).ok());
    }
    int32_t tok = static_cast<int32_t>((t.token >= 0 ? t.token : t.pos) % 64);
    runtime::SeqChunk chunk{seq, {&tok, 1}, false};
    runtime::ForwardResult r;
    ASSERT_TRUE(engine->Forward({&chunk, 1}, &r).ok());
  }
  const ExpertStoreStats st = (*src)->stats();
  const int64_t accesses = st.total.hits + st.total.misses;
  EXPECT_EQ(accesses, static_cast<int64_t>(trace->tokens.size()) * 32 * 2);
  ReplayOptions ro;
  ro.policy = "lru";
  ro.slots_per_layer = 4;
  auto rep = Replay(*trace, ro);
  ASSERT_TRUE(rep.ok());
  // The engine computes resident experts first (hits before misses), which changes LRU recency
  // order within a token relative to the replay convention's listed order; the rates agree to
  // the third decimal, the precision the convention states.
  EXPECT_NEAR(st.hit_rate(), rep->hit_rate, 1e-3);
  EXPECT_NEAR(st.hit_rate(), 0.601, 0.0005);
  EXPECT_NEAR(rep->hit_rate, 0.601, 0.0005);
  fs::remove_all(dir);
}

TEST(CachedEngine, TraceOfTheWrongShapeIsAnError) {
  const std::string trace_path = std::string(EF_TEST_DATA) + "/traces/mixtral8x7b_gsm8k_decode.jsonl";
  ASSERT_TRUE(fs::exists(trace_path)) << trace_path << " is missing (tests/data/traces)";
  auto trace = placement::ReadRoutingTrace(trace_path);
  ASSERT_TRUE(trace.ok());
  auto engine = MakeEngine(std::string(EF_MODELS_DIR) + "/tiny-code-moe");
  auto ov = placement::TraceRoutingOverride::Create(*trace, engine->config());
  ASSERT_FALSE(ov.ok());
  EXPECT_NE(ov.status().message().find("does not match the model"), std::string::npos);
}

}  // namespace
}  // namespace ef::cache
