// ExpertParallelExecutor in one process (a world of one rank, no launcher): the dispatch, the
// per-expert compute on received rows and the combine give bitwise the logits of the local MoE
// executor on every MoE layer, and the per-layer byte counters stay zero (nothing leaves the rank).
// The multi-rank paths run under mpirun in tests/comm/*.sh.
#include "comm/expert_parallel_executor.h"

#include <gtest/gtest.h>

#include <cmath>

#include "comm/expert_placement.h"
#include "comm/mpi_context.h"
#include "comm/mpi_exchange.h"
#include "runtime/engine/engine.h"
#include "tests/runtime/prompt_run.h"

namespace ef::comm {
namespace {

std::unique_ptr<runtime::Engine> Engine(const std::string& dir) {
  runtime::EngineOptions o;
  o.backend = "cpu";
  auto e = runtime::Engine::Create(dir, o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return std::move(e).value();
}

class ExpertParallelExecutorTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ExpertParallelExecutorTest, OneRankEqualsTheLocalExecutorBitwise) {
  const std::string dir = GetParam() == "tiny-code-moe" ? std::string(EF_MODELS_DIR) + "/tiny-code-moe"
                                                        : std::string(EF_TEST_DATA) + "/" + GetParam();
  auto engine = Engine(dir);
  const std::vector<int32_t> prompt = {1, 17, 42, 7, 99, 3, 150, 2};
  const auto want = ef::testing::RunPrompt(*engine, prompt, 5);

  auto ctx = MpiContext::Init();
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  ASSERT_EQ((*ctx)->size(), 1);
  const auto& c = engine->config();
  PlacementOptions po;
  auto placement = ExpertPlacement::Create(po, 1, c.num_layers, c.num_experts);
  ASSERT_TRUE(placement.ok()) << placement.status().ToString();
  MpiExchange exchange(*ctx);
  ExpertParallelExecutor executor(*ctx, &exchange, &*placement, engine.get());
  engine->SetMoeExecutor(&executor);
  const auto got = ef::testing::RunPrompt(*engine, prompt, 5);
  engine->SetMoeExecutor(nullptr);

  EXPECT_EQ(got.tokens, want.tokens);
  ASSERT_EQ(got.logits.size(), want.logits.size());
  for (size_t i = 0; i < want.logits.size(); ++i) ASSERT_EQ(got.logits[i], want.logits[i]) << "logit " << i;
  EXPECT_GT(executor.steps(), 0);
  EXPECT_GT(executor.rows_computed(), 0);
  EXPECT_EQ(executor.rows_dispatched(), 0);  // every row stays on the only rank
  for (int l = 0; l < executor.num_layers(); ++l) EXPECT_EQ(executor.layer_bytes_sent(l), 0) << "layer " << l;
}

INSTANTIATE_TEST_SUITE_P(Families, ExpertParallelExecutorTest,
                         ::testing::Values("mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss", "tiny-code-moe"));

// Shared forecasts: rank 0 forecasts experts {0: 0.5 listed, 1: 0.25, 2: 1 listed}, rank 1 none,
// rank 2 {0: 0.5 listed, 1: 0.75 listed, 2: 0}.
std::vector<int64_t> ThreeRanks() {
  return {PackForecast(0.5f, true),
          PackForecast(0.25f, false),
          PackForecast(1.f, true),
          kNoForecast,
          kNoForecast,
          kNoForecast,
          PackForecast(0.5f, true),
          PackForecast(0.75f, true),
          PackForecast(0.f, false)};
}

TEST(CombineForecastsTest, NeedIsTheChanceSomeRanksBatchRoutesThereAndListsMergeMostNeededFirst) {
  auto f = CombineForecasts(ThreeRanks(), 3, 1);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->senders, 2);
  EXPECT_FALSE(f->mine);  // rank 1 sent none
  ASSERT_EQ(f->need.size(), 3u);
  EXPECT_NEAR(f->need[0], 0.75, 1e-6);             // 1 - 0.5 * 0.5
  EXPECT_NEAR(f->need[1], 1 - 0.75 * 0.25, 1e-6);  // 0.8125
  EXPECT_NEAR(f->need[2], 1.0, 1e-6);
  EXPECT_EQ(f->listed, (std::vector<int32_t>{2, 1, 0}));
  auto g = CombineForecasts(ThreeRanks(), 3, 2);
  ASSERT_TRUE(g.ok());
  EXPECT_TRUE(g->mine);
}

// Replicas: a sender's forecast counts only for the experts whose rows it sends here.
TEST(CombineForecastsTest, LeavesOutExpertsWhoseRowsGoElsewhere) {
  // Rank 0's rows for expert 1 and rank 2's for expert 0 go to another rank.
  auto f =
      CombineForecasts(ThreeRanks(), 3, 1, [](int r, int e) { return !(r == 0 && e == 1) && !(r == 2 && e == 0); });
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->senders, 2);
  EXPECT_NEAR(f->need[0], 0.5, 1e-6);   // rank 0's only
  EXPECT_NEAR(f->need[1], 0.75, 1e-6);  // rank 2's only
  EXPECT_NEAR(f->need[2], 1.0, 1e-6);
  EXPECT_EQ(f->listed, (std::vector<int32_t>{2, 1, 0}));
  // No sender's rows come here: nothing is needed or listed.
  auto none = CombineForecasts(ThreeRanks(), 3, 1, [](int, int) { return false; });
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->need, (std::vector<float>{0.f, 0.f, 0.f}));
  EXPECT_TRUE(none->listed.empty());
}

TEST(CombineForecastsTest, PacksOutOfRangeNeedsAsValidEntries) {
  // A predictor's NaN or overflow must not abort the step on every rank: it packs as 0 or 1.
  const std::vector<int64_t> v = {PackForecast(std::nanf(""), true), PackForecast(7.f, false),
                                  PackForecast(-1.f, false)};
  auto f = CombineForecasts(v, 1, 0);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->need, (std::vector<float>{0.f, 1.f, 0.f}));
}

TEST(CombineForecastsTest, NoSenderAndMalformedEntries) {
  const std::vector<int64_t> none(6, kNoForecast);
  auto f = CombineForecasts(none, 2, 0);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->senders, 0);
  EXPECT_TRUE(f->need.empty());
  // A need above 1, a negative entry after a forecast's first, stray high bits: each names the rank.
  for (int64_t bad : {PackForecast(1.f, false) + 1, int64_t{-5}, int64_t{1} << 40}) {
    std::vector<int64_t> v = ThreeRanks();
    v[7] = bad;
    auto b = CombineForecasts(v, 3, 0);
    ASSERT_FALSE(b.ok()) << bad;
    EXPECT_NE(b.status().message().find("rank 2"), std::string::npos) << b.status().ToString();
  }
  EXPECT_FALSE(CombineForecasts(std::vector<int64_t>(5, 0), 3, 0).ok());  // not a block per rank
}

// A ForecastShare that forecasts every later layer and records what it is handed.
class RecordingShare final : public runtime::ForecastShare {
 public:
  bool OwnForecast(int layer, std::span<float> need, std::vector<int32_t>* listed) const override {
    ++asked;
    std::fill(need.begin(), need.end(), 0.5f);
    *listed = {0};
    return true;
  }
  void SharedForecast(int, std::span<const float>, std::span<const int32_t>) override { ++shared; }
  void ComputesNothing(int) override { ++idle; }
  mutable int asked = 0;
  int shared = 0, idle = 0;
};

// One rank: its own forecast travels with the counts and comes back as its own, so the cache is
// not handed it again; the logits do not change.
TEST(ExpertParallelExecutorShareTest, OneRankKeepsItsOwnForecastAndItsLogits) {
  auto engine = Engine(std::string(EF_MODELS_DIR) + "/tiny-code-moe");
  const std::vector<int32_t> prompt = {1, 17, 42, 7, 99, 3, 150, 2};
  const auto want = ef::testing::RunPrompt(*engine, prompt, 3);
  auto ctx = MpiContext::Init();
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  const auto& c = engine->config();
  auto placement = ExpertPlacement::Create(PlacementOptions{}, 1, c.num_layers, c.num_experts);
  ASSERT_TRUE(placement.ok());
  MpiExchange exchange(*ctx);
  ExpertParallelExecutor executor(*ctx, &exchange, &*placement, engine.get());
  RecordingShare share;
  executor.SetForecastShare(&share, 2);
  engine->SetMoeExecutor(&executor);
  const auto got = ef::testing::RunPrompt(*engine, prompt, 3);
  engine->SetMoeExecutor(nullptr);
  EXPECT_EQ(got.tokens, want.tokens);
  for (size_t i = 0; i < want.logits.size(); ++i) ASSERT_EQ(got.logits[i], want.logits[i]) << "logit " << i;
  EXPECT_GT(share.asked, 0);
  EXPECT_EQ(share.shared, 0);
  EXPECT_EQ(executor.forecasts_received(), 0);
}

}  // namespace
}  // namespace ef::comm
