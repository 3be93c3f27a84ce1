// The expert cache as the commands build it (SetUpExpertCache, from the config's cache and
// predictor sections) on tiny-code-moe: the same greedy tokens and bitwise the same logits as the
// all-resident engine for budgets of top-k slots per layer, half and all, every online policy,
// with and without each predictor; counters that add up; the budget, trace and predictor-file
// errors; /metrics with the cache's series.
#include "launch/expert_cache_setup.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <regex>
#include <set>

#include "launch/server/server_metrics.h"
#include "placement/frequency_predictor.h"
#include "placement/path_predictor.h"
#include "placement/predictor_file.h"
#include "runtime/engine/generator.h"
#include "tests/runtime/prompt_run.h"

namespace ef::launch {
namespace {

namespace fs = std::filesystem;
using runtime::Engine;

const std::string kModelDir = std::string(EF_MODELS_DIR) + "/tiny-code-moe";
const std::vector<int32_t> kPrompt = {11, 42, 7, 99, 3, 150, 2, 77, 5, 1200, 64, 9};

std::unique_ptr<Engine> MakeEngine(bool upload_experts) {
  runtime::EngineOptions o;
  o.backend = "cpu";
  o.upload_experts = upload_experts;
  auto e = Engine::Create(kModelDir, o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return e.ok() ? std::move(e).value() : nullptr;
}

struct Output {
  std::vector<float> logits;    // score: every position of the prompt
  std::vector<int32_t> tokens;  // generate: greedy continuation
  int64_t expert_accesses = 0;  // distinct experts per (forward, MoE layer): what the cache serves
};

// The expert accesses a forward makes: each MoE layer acquires every expert it routes to once.
int64_t DistinctExperts(const runtime::LayerRouting& r) {
  std::set<int32_t> s(r.ids.begin(), r.ids.end());
  return static_cast<int64_t>(s.size());
}

Output RunModel(Engine& engine, placement::RoutingTrace* record = nullptr) {
  Output out;
  const int id = engine.AddRoutingHook([&](runtime::LayerRouting& r) {
    out.expert_accesses += DistinctExperts(r);
    if (record) {
      for (int t = 0; r.moe_layer.index == 0 && t < r.num_tokens; ++t) {
        placement::TraceToken tok;
        tok.seq = r.seq[t];
        tok.pos = r.pos[t];
        tok.token = r.token_ids[t];
        tok.experts.assign(static_cast<size_t>(record->num_layers()) * r.top_k, -1);
        record->tokens.push_back(std::move(tok));
      }
      for (int t = 0; t < r.num_tokens; ++t) {
        placement::TraceToken& tok = record->tokens[record->tokens.size() - r.num_tokens + t];
        for (int j = 0; j < r.top_k; ++j)
          tok.experts[static_cast<size_t>(r.moe_layer.index) * r.top_k + j] =
              static_cast<int16_t>(r.ids[t * r.top_k + j]);
      }
    }
    return Status::Ok();
  });
  ef::testing::PromptRun run = ef::testing::RunPrompt(engine, kPrompt, 10);
  out.logits = std::move(run.logits);
  out.tokens = std::move(run.tokens);
  engine.RemoveRoutingHook(id);
  return out;
}

class ExpertCacheSetupTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(fs::temp_directory_path() / ("ef_expert_cache_setup_" + std::to_string(::getpid())));
    fs::create_directories(*dir_);
    auto engine = MakeEngine(true);
    ASSERT_NE(engine, nullptr);
    const auto& c = engine->config();
    auto* trace = new placement::RoutingTrace();
    trace->header.model = "tiny-code-moe";
    trace->header.num_layers = c.num_moe_layers();
    trace->header.num_experts = c.num_experts;
    trace->header.top_k = c.top_k;
    trace->header.phase = "mixed";
    want_ = new Output(RunModel(*engine, trace));
    trace_ = trace;
    // Trained predictor files from the reference run's routing: frequency (also the static
    // policy's counts) and a small path predictor.
    placement::PredictorInfo info;
    info.model = "tiny-code-moe";
    info.num_layers = c.num_moe_layers();
    info.num_experts = c.num_experts;
    info.top_k = c.top_k;
    auto freq = placement::FrequencyPredictor::Fit(*trace_);
    ASSERT_TRUE(freq.ok()) << freq.status().ToString();
    info.kind = "frequency";
    ASSERT_TRUE(placement::SavePredictor(**freq, info, (*dir_ / "freq.safetensors").string()).ok());
    placement::PathPredictorOptions po;
    po.epochs = 3;
    po.hidden = 32;
    po.embed_dim = 8;
    po.num_threads = 1;
    trace->SortBySeqPos();
    auto path = placement::PathPredictor::Train(*trace, placement::RoutingTrace{trace->header, {}}, po, nullptr);
    ASSERT_TRUE(path.ok()) << path.status().ToString();
    info.kind = "path";
    ASSERT_TRUE(placement::SavePredictor(**path, info, (*dir_ / "path.safetensors").string()).ok());
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
    delete want_;
    delete trace_;
  }

  static fs::path* dir_;
  static Output* want_;
  static placement::RoutingTrace* trace_;
};
fs::path* ExpertCacheSetupTest::dir_ = nullptr;
Output* ExpertCacheSetupTest::want_ = nullptr;
placement::RoutingTrace* ExpertCacheSetupTest::trace_ = nullptr;

TEST_F(ExpertCacheSetupTest, SameTokensAndLogitsForEveryBudgetPolicyAndPredictor) {
  ASSERT_NE(want_, nullptr);
  ASSERT_FALSE(want_->tokens.empty());
  const std::string freq = (*dir_ / "freq.safetensors").string();
  const std::string path = (*dir_ / "path.safetensors").string();
  struct Predictor {
    std::string kind, file;
  };
  const Predictor predictors[] = {
      {"none", ""}, {"lookahead", ""}, {"frequency", ""}, {"frequency", freq}, {"path", path}};
  // tiny-code-moe: 8 MoE layers x 8 experts, top-2.
  for (const char* budget : {"2 slots per layer", "32 slots", "8 slots per layer"}) {
    for (const char* policy : {"lru", "lfu", "expertflow", "static"}) {
      for (const Predictor& p : predictors) {
        for (int prefetch : {0, 2}) {
          if (prefetch == 0 && p.kind != "none" && std::string(policy) != "expertflow") continue;
          SCOPED_TRACE(std::string(budget) + " " + policy + " predictor " + p.kind + " " + p.file + " prefetch " +
                       std::to_string(prefetch));
          CacheSection cs;
          ASSERT_TRUE(ParseDeviceBudget(budget, &cs).ok());
          cs.policy = policy;
          cs.prefetch_layers = prefetch;
          cs.prefetch_min_prob = 0;  // every forecast expert loads (the gate has its own test)
          PredictorSection ps;
          ps.kind = p.kind;
          ps.path = p.file;
          // static needs routing counts: the recorded trace gives them.
          const placement::RoutingTrace* trace = std::string(policy) == "static" ? trace_ : nullptr;
          auto engine = MakeEngine(false);
          ASSERT_NE(engine, nullptr);
          auto cache = SetUpExpertCache(engine.get(), cs, ps, trace);
          ASSERT_TRUE(cache.ok()) << cache.status().ToString();
          ASSERT_NE(*cache, nullptr);
          const bool all = std::string(budget) == "8 slots per layer";
          EXPECT_EQ((*cache)->active(), !all) << (*cache)->Describe();
          EXPECT_EQ((*cache)->budget().slots_per_layer, all ? 8 : std::string(budget) == "32 slots" ? 4 : 2);
          const Output got = RunModel(*engine);
          EXPECT_EQ(got.tokens, want_->tokens);
          EXPECT_EQ(got.logits, want_->logits);
          const cache::ExpertStoreStats st = (*cache)->stats();
          if (all) {
            EXPECT_TRUE(engine->experts_resident());
            EXPECT_EQ(st.total.hits + st.total.misses, 0);
            continue;
          }
          // Every expert a layer routes to is acquired once per forward: hit or miss.
          EXPECT_EQ(st.total.hits + st.total.misses, got.expert_accesses);
          cache::ExpertCounters sum;
          for (int l = 0; l < st.num_layers; ++l) sum += st.Layer(l);
          EXPECT_EQ(sum.hits, st.total.hits);
          EXPECT_EQ(sum.misses, st.total.misses);
          // Each miss and each prefetch loads one slot; hits are served from the device tier.
          const int64_t slot = static_cast<int64_t>(engine->weights().max_expert_bytes());
          EXPECT_EQ(st.total.bytes_from_host, (st.total.misses + st.total.prefetch_issued) * slot);
          EXPECT_EQ(st.total.bytes_from_device, st.total.hits * slot);
          EXPECT_LE(st.total.prefetch_used + st.total.prefetch_wasted, st.total.prefetch_issued);
          if (prefetch > 0 && p.kind != "none") {
            EXPECT_GT(st.total.prefetch_issued, 0);
            ASSERT_NE((*cache)->prefetcher(), nullptr);
            EXPECT_GT((*cache)->prefetcher()->forecast_chosen(), 0);
          }
          if (p.kind == "none") {
            EXPECT_EQ(st.total.prefetch_issued, 0);
          }
        }
      }
    }
  }
}

TEST_F(ExpertCacheSetupTest, LookaheadForecastsBetterThanPopularityAlone) {
  // Online frequency starts from nothing; lookahead reads the next routers: on the same run its
  // forecast recall is higher (and well above chance, 2 of 8 experts per token).
  std::map<std::string, double> recall;
  for (const char* kind : {"lookahead", "frequency"}) {
    auto engine = MakeEngine(false);
    CacheSection cs;
    cs.device_slots_per_layer = 4;
    cs.policy = "lru";
    cs.prefetch_layers = 1;
    cs.prefetch_min_prob = 0;
    auto cache = SetUpExpertCache(engine.get(), cs, PredictorSection{kind, ""});
    ASSERT_TRUE(cache.ok()) << cache.status().ToString();
    RunModel(*engine);
    recall[kind] = (*cache)->prefetcher()->forecast_recall();
  }
  EXPECT_GT(recall["lookahead"], recall["frequency"]);
  EXPECT_GT(recall["lookahead"], 0.5);
}

TEST_F(ExpertCacheSetupTest, ResetStatsZeroesTheCountersAndKeepsTheSlots) {
  // What a deployment does after its warm-up: the counters start from zero, the slots keep what
  // they hold (the next run hits where a fresh cache would miss), and the outputs are unchanged.
  auto engine = MakeEngine(false);
  CacheSection cs;
  cs.device_slots_per_layer = 4;
  cs.policy = "lru";
  cs.prefetch_layers = 1;
  auto cache = SetUpExpertCache(engine.get(), cs, PredictorSection{"lookahead", ""});
  ASSERT_TRUE(cache.ok()) << cache.status().ToString();
  const Output first = RunModel(*engine);
  ASSERT_GT((*cache)->stats().total.misses, 0);
  ASSERT_GT((*cache)->prefetcher()->forecast_chosen(), 0);
  (*cache)->ResetStats();
  const cache::ExpertStoreStats zero = (*cache)->stats();
  EXPECT_EQ(zero.total.hits + zero.total.misses, 0);
  EXPECT_EQ(zero.total.bytes_from_host, 0);
  EXPECT_EQ(zero.total.prefetch_issued, 0);
  EXPECT_EQ((*cache)->prefetcher()->forecast_chosen(), 0);
  EXPECT_EQ((*cache)->StatsJson()["bytes_loaded"], 0);
  const Output second = RunModel(*engine);
  EXPECT_EQ(second.logits, first.logits);
  EXPECT_EQ(second.tokens, first.tokens);
  const cache::ExpertStoreStats st = (*cache)->stats();
  EXPECT_EQ(st.total.hits + st.total.misses, second.expert_accesses);
  EXPECT_GT(st.total.hits, 0);
}

TEST_F(ExpertCacheSetupTest, PrefetchMinProbGatesPrefetchesNotOutputs) {
  // The same lookahead forecasts, gated at rising thresholds: outputs never change, prefetches
  // only shrink, and what is still prefetched is used at least as often.
  std::vector<int64_t> issued;
  std::vector<double> used_share;
  for (double min_prob : {0.0, 0.5, 0.9}) {
    SCOPED_TRACE("prefetch_min_prob " + std::to_string(min_prob));
    auto engine = MakeEngine(false);
    CacheSection cs;
    cs.device_slots_per_layer = 2;
    cs.policy = "expertflow";
    cs.prefetch_layers = 1;
    cs.prefetch_min_prob = min_prob;
    auto cache = SetUpExpertCache(engine.get(), cs, PredictorSection{"lookahead", ""});
    ASSERT_TRUE(cache.ok()) << cache.status().ToString();
    if (min_prob > 0) {
      EXPECT_NE((*cache)->Describe().find("experts forecast >="), std::string::npos);
    }
    const Output got = RunModel(*engine);
    EXPECT_EQ(got.tokens, want_->tokens);
    EXPECT_EQ(got.logits, want_->logits);
    const cache::ExpertCounters c = (*cache)->stats().total;
    EXPECT_EQ(c.hits + c.misses, got.expert_accesses);
    issued.push_back(c.prefetch_issued);
    const int64_t settled = c.prefetch_used + c.prefetch_wasted;
    used_share.push_back(settled ? static_cast<double>(c.prefetch_used) / settled : 1.0);
  }
  EXPECT_GT(issued[0], 0);
  EXPECT_LT(issued[1], issued[0]);
  EXPECT_LE(issued[2], issued[1]);
  EXPECT_GE(used_share[1], used_share[0]);
  // Out of range: the key and the value are named.
  auto engine = MakeEngine(false);
  CacheSection cs;
  cs.device_slots_per_layer = 2;
  cs.prefetch_min_prob = 1.5;
  auto bad = SetUpExpertCache(engine.get(), cs, PredictorSection{"lookahead", ""});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("cache.prefetch_min_prob must be in [0, 1], got 1.5"), std::string::npos)
      << bad.status().ToString();
}

TEST_F(ExpertCacheSetupTest, NoBudgetMeansNoCache) {
  auto engine = MakeEngine(true);
  auto cache = SetUpExpertCache(engine.get(), CacheSection{}, PredictorSection{});
  ASSERT_TRUE(cache.ok());
  EXPECT_EQ(*cache, nullptr);
  EXPECT_FALSE(WantsExpertCache(CacheSection{}));
}

TEST_F(ExpertCacheSetupTest, EngineWithoutExpertsRefusesToRun) {
  auto engine = MakeEngine(false);
  ASSERT_TRUE(engine->AddSequence(1).ok());
  runtime::SeqChunk chunk{1, kPrompt, false};
  runtime::ForwardResult r;
  Status st = engine->Forward({&chunk, 1}, &r);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("upload_experts = false"), std::string::npos) << st.ToString();
  // UploadExperts makes it run, with the resident results.
  ASSERT_TRUE(engine->UploadExperts().ok());
  engine->RemoveSequence(1);
  EXPECT_EQ(RunModel(*engine).logits, want_->logits);
}

Status TrySetUp(const std::string& budget, const std::string& policy = "lru", PredictorSection ps = {"none", ""},
                const placement::RoutingTrace* trace = nullptr) {
  auto engine = MakeEngine(false);
  CacheSection cs;
  EF_RETURN_IF_ERROR(ParseDeviceBudget(budget, &cs));
  cs.policy = policy;
  return SetUpExpertCache(engine.get(), cs, ps, trace).status();
}

TEST_F(ExpertCacheSetupTest, BudgetBelowTopKNamesBothNumbers) {
  Status s = TrySetUp("1 slots per layer");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("1 slots per layer"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("fewer than the model's top-k (2)"), std::string::npos) << s.ToString();
  // 15 slots over 8 MoE layers: 1 per layer; the smallest budget is 16.
  s = TrySetUp("15 slots");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("1 per MoE layer over 8 MoE layers"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("the smallest budget is 16 slots"), std::string::npos) << s.ToString();
  // In bytes: one expert of tiny-code-moe is 3 x 256 x 128 bf16 = 192 KiB.
  s = TrySetUp("1MiB");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("1.00 MiB holds 5 expert slots of 192.0 KiB"), std::string::npos) << s.ToString();
  EXPECT_TRUE(TrySetUp("3MiB").ok());  // 16 slots: 2 per layer
}

TEST_F(ExpertCacheSetupTest, BudgetCheckBeforeTheCacheGivesTheSameError) {
  auto engine = MakeEngine(false);
  CacheSection cs;
  EXPECT_TRUE(CheckExpertCacheBudget(*engine, cs, /*per_rank=*/true, 0).ok());  // no budget: no cache
  ASSERT_TRUE(ParseDeviceBudget("1 slots per layer", &cs).ok());
  Status s = CheckExpertCacheBudget(*engine, cs, /*per_rank=*/false, 0);
  ASSERT_FALSE(s.ok());
  auto first_line = [](const Status& st) { return st.message().substr(0, st.message().find('\n')); };
  EXPECT_EQ(first_line(s), first_line(TrySetUp("1 slots per layer")));
  s = CheckExpertCacheBudget(*engine, cs, /*per_rank=*/true, 1);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.message().rfind("rank 1 (cache.device_budget is per rank): cache.device_budget of 1 slots per layer", 0),
            0u)
      << s.ToString();
  EXPECT_NE(s.message().find("fewer than the model's top-k (2)"), std::string::npos) << s.ToString();
  ASSERT_TRUE(ParseDeviceBudget("2 slots per layer", &cs).ok());
  EXPECT_TRUE(CheckExpertCacheBudget(*engine, cs, /*per_rank=*/true, 1).ok());
  // An error that is not the budget's names the rank alone.
  cs.miss_precision = "int8";
  cs.low_precision_layers = "9";
  s = CheckExpertCacheBudget(*engine, cs, /*per_rank=*/true, 1);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.message().rfind("rank 1: cache.low_precision_layers", 0), 0u) << s.ToString();
}

TEST_F(ExpertCacheSetupTest, BudgetAboveTheDeviceNamesBothNumbers) {
  Status s = TrySetUp("1000TiB");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("1000.00 TiB"), std::string::npos) << s.ToString();
  EXPECT_TRUE(
      std::regex_search(s.message(), std::regex(R"(is larger than cpu \(.*\) \(host memory\) can give them: \d)")))
      << s.ToString();
}

TEST_F(ExpertCacheSetupTest, TraceOrPredictorOfAnotherShapeIsAnError) {
  placement::RoutingTrace wrong = *trace_;
  wrong.header.num_layers = 4;
  for (auto& t : wrong.tokens) t.experts.resize(8);
  Status s = TrySetUp("2 slots per layer", "lru", {"none", ""}, &wrong);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("routing trace for the expert cache"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("(4 layers x 8 experts, top-2) does not match the model (8 layers"), std::string::npos)
      << s.ToString();

  const std::string file = (*dir_ / "freq4.safetensors").string();
  placement::FrequencyPredictor f(4, 8, 2);
  placement::PredictorInfo info;
  info.kind = "frequency";
  info.num_layers = 4;
  info.num_experts = 8;
  info.top_k = 2;
  ASSERT_TRUE(placement::SavePredictor(f, info, file).ok());
  s = TrySetUp("2 slots per layer", "lru", {"frequency", file});
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("was trained for 4 MoE layers x 8 experts, top-2, the model has 8 MoE layers"),
            std::string::npos)
      << s.ToString();
  s = TrySetUp("2 slots per layer", "lru", {"path", (*dir_ / "freq.safetensors").string()});
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("holds a frequency predictor, the configured kind is path"), std::string::npos)
      << s.ToString();
  s = TrySetUp("2 slots per layer", "lru", {"path", ""});
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("needs a trained predictor file"), std::string::npos) << s.ToString();
}

TEST_F(ExpertCacheSetupTest, OfflineOrUnknownChoicesAreErrors) {
  Status s = TrySetUp("2 slots per layer", "belady");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("offline analysis"), std::string::npos) << s.ToString();
  s = TrySetUp("2 slots per layer", "static");  // no counts: no trace, no frequency file
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("needs routing counts up front"), std::string::npos) << s.ToString();
  EXPECT_TRUE(TrySetUp("2 slots per layer", "static", {"none", ""}, trace_).ok());
  s = TrySetUp("2 slots per layer", "lru", {"oracle", ""});
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("unknown predictor 'oracle'"), std::string::npos) << s.ToString();
}

TEST_F(ExpertCacheSetupTest, CpuComputeIsACudaOptionAndAKnownOne) {
  auto engine = MakeEngine(false);
  CacheSection cs;
  cs.device_slots_per_layer = 2;
  cs.policy = "lru";
  cs.cpu_compute = "auto";
  auto cache = SetUpExpertCache(engine.get(), cs, PredictorSection{"none", ""});
  ASSERT_FALSE(cache.ok());
  EXPECT_NE(cache.status().message().find("cache.cpu_compute auto applies to the cuda backend"), std::string::npos)
      << cache.status().ToString();
  cs.cpu_compute = "sometimes";
  cache = SetUpExpertCache(engine.get(), cs, PredictorSection{"none", ""});
  ASSERT_FALSE(cache.ok());
  EXPECT_NE(cache.status().message().find("cache.cpu_compute must be default, off, auto, whole or on, got 'sometimes'"),
            std::string::npos)
      << cache.status().ToString();
  cs.cpu_compute = "off";
  EXPECT_TRUE(SetUpExpertCache(engine.get(), cs, PredictorSection{"none", ""}).ok());
  // The default is auto where it applies (one CUDA process): off on the cpu backend, and given
  // values pass through to the cache's own checks.
  cs.cpu_compute = "default";
  EXPECT_EQ(CacheSection{}.cpu_compute, "default");
  const cache::ExpertCacheOptions o = ToExpertCacheOptions(cs, PredictorSection{"none", ""});
  EXPECT_EQ(cache::ExpertCache::DefaultCpuCompute(*engine, o), "off");
  cache::ExpertCacheOptions given = o;
  given.cpu_compute = "whole";
  EXPECT_EQ(cache::ExpertCache::DefaultCpuCompute(*engine, given), "whole");
  cache = SetUpExpertCache(engine.get(), cs, PredictorSection{"none", ""});
  ASSERT_TRUE(cache.ok()) << cache.status().ToString();
  EXPECT_EQ((*cache)->StatsJson().value("cpu_compute", std::string()), "off");
  EXPECT_EQ((*cache)->Describe().find("host CPU"), std::string::npos) << (*cache)->Describe();
}

TEST_F(ExpertCacheSetupTest, MetricsCarryTheCacheCountersPerLayerAndExpert) {
  auto engine = MakeEngine(false);
  CacheSection cs;
  cs.device_slots_per_layer = 3;
  cs.policy = "lru";
  auto cache = SetUpExpertCache(engine.get(), cs, PredictorSection{"lookahead", ""});
  ASSERT_TRUE(cache.ok()) << cache.status().ToString();
  RunModel(*engine);
  ServerMetrics metrics(engine->config().num_layers, engine->config().num_experts);
  EXPECT_EQ(metrics.Render().find("expertflow_expert_cache"), std::string::npos);
  metrics.SetExpertCache(cache->get());
  const std::string text = metrics.Render();
  EXPECT_NE(text.find("expertflow_expert_cache_slots_per_layer 3\n"), std::string::npos);
  const cache::ExpertStoreStats st = (*cache)->stats();
  // Sum each series over its labels and compare with the store's totals.
  auto sum = [&](const std::string& series, const std::string& extra = "") {
    const std::regex re(series + R"re(\{layer="(\d+)",expert="(\d+)")re" + extra + R"re(\} (\d+))re");
    int64_t total = 0, lines = 0;
    for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it) {
      total += std::stoll((*it)[3]);
      ++lines;
    }
    EXPECT_EQ(lines, 8 * 8) << series;
    return total;
  };
  EXPECT_EQ(sum("expertflow_expert_cache_hits_total"), st.total.hits);
  EXPECT_EQ(sum("expertflow_expert_cache_misses_total"), st.total.misses);
  EXPECT_EQ(sum("expertflow_expert_cache_bytes_total", R"re(,tier="host")re"), st.total.bytes_from_host);
  EXPECT_EQ(sum("expertflow_expert_cache_bytes_total", R"re(,tier="device")re"), st.total.bytes_from_device);
  EXPECT_GT(st.total.hits, 0);
  EXPECT_GT(st.total.misses, 0);
  metrics.SetExpertCache(nullptr);
  EXPECT_EQ(metrics.Render().find("expertflow_expert_cache"), std::string::npos);
}

}  // namespace
}  // namespace ef::launch
