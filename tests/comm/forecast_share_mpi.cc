// Under `mpirun -np 2` (ctest mpi_forecast_share): rank 0 runs a prompt and forecasts a known
// pattern for every later MoE layer; rank 1 only follows (as under generate/serve). Rank 1's cache
// side must be handed, for every MoE layer after the first, exactly the experts it computes (4-7 of
// tiny-code-moe's 8 under the contiguous placement) with rank 0's need, and nothing of rank 0's
// experts; rank 0 keeps its own forecast (handed nothing). The tokens match one process.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>

#include "comm/expert_parallel_executor.h"
#include "comm/expert_placement.h"
#include "comm/mpi_context.h"
#include "comm/mpi_exchange.h"
#include "runtime/engine/engine.h"
#include "tests/runtime/prompt_run.h"

namespace ef::comm {
namespace {

// Rank 0's forecast of decoder layer l: need (l * 8 + e) / 128 for expert e, listed experts
// {l % 4, 4 + l % 4} (one of each rank's).
float PatternNeed(int layer, int e) { return static_cast<float>(layer * 8 + e) / 128.f; }
std::vector<int32_t> PatternListed(int layer) { return {layer % 4, 4 + layer % 4}; }

class PatternShare final : public runtime::ForecastShare {
 public:
  explicit PatternShare(bool forecasts) : forecasts_(forecasts) {}
  bool OwnForecast(int layer, std::span<float> need, std::vector<int32_t>* listed) const override {
    if (!forecasts_) return false;
    ++asked;
    for (size_t e = 0; e < need.size(); ++e) need[e] = PatternNeed(layer, static_cast<int>(e));
    *listed = PatternListed(layer);
    return true;
  }
  void SharedForecast(int layer, std::span<const float> need, std::span<const int32_t> listed) override {
    handed[layer] = {std::vector<float>(need.begin(), need.end()), std::vector<int32_t>(listed.begin(), listed.end())};
    ++times;
  }
  void ComputesNothing(int) override {}
  bool forecasts_;
  mutable int asked = 0;
  int times = 0;
  std::map<int, std::pair<std::vector<float>, std::vector<int32_t>>> handed;
};

void FollowerIsHandedTheForecastOfTheExpertsItComputes(MpiContext* ctx) {
  const int me = ctx->rank();
  runtime::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = runtime::Engine::Create(std::string(EF_MODELS_DIR) + "/tiny-code-moe", eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const auto& c = (*engine)->config();
  ASSERT_EQ(c.num_experts, 8);
  const std::vector<int32_t> prompt = {1, 17, 42, 7, 99, 3, 150, 2};
  ef::testing::PromptRun want;
  if (me == 0) want = ef::testing::RunPrompt(**engine, prompt, 4);

  auto placement = ExpertPlacement::Create(PlacementOptions{}, 2, c.num_layers, c.num_experts);
  ASSERT_TRUE(placement.ok()) << placement.status().ToString();
  MpiExchange exchange(ctx);
  ExpertParallelExecutor executor(ctx, &exchange, &*placement, engine->get());
  PatternShare share(/*forecasts=*/me == 0);
  executor.SetForecastShare(&share, 2);
  ASSERT_TRUE(executor.ForecastDepthsAgree().ok());
  (*engine)->SetMoeExecutor(&executor);
  if (me == 0) {
    const auto got = ef::testing::RunPrompt(**engine, prompt, 4);
    ASSERT_TRUE(executor.Stop().ok());
    EXPECT_EQ(got.tokens, want.tokens);
    EXPECT_GT(share.asked, 0);
    EXPECT_EQ(share.times, 0);  // its own forecast stands
  } else {
    ASSERT_TRUE(executor.Follow().ok());
    const std::vector<int> moe = c.MoeLayers();
    std::set<int> targets(moe.begin() + 1, moe.end());
    std::set<int> got;
    for (const auto& [layer, f] : share.handed) got.insert(layer);
    EXPECT_EQ(got, targets);
    for (const auto& [layer, f] : share.handed) {
      const auto& [need, listed] = f;
      ASSERT_EQ(need.size(), 8u);
      for (int e = 0; e < 8; ++e) {
        // Rank 0's rows for experts 0-3 stay on rank 0: their need is not this rank's.
        const float expect = e >= 4 ? PatternNeed(layer, e) : 0.f;
        EXPECT_NEAR(need[e], expect, 1e-6) << "layer " << layer << " expert " << e;
      }
      EXPECT_EQ(listed, std::vector<int32_t>{4 + layer % 4}) << "layer " << layer;
    }
    EXPECT_EQ(executor.forecasts_received(), share.times);
  }
  (*engine)->SetMoeExecutor(nullptr);
}

TEST(ForecastShareMpiTest, TheFollowerIsHandedTheForecastOfTheExpertsItComputes) {
  auto ctx = MpiContext::Init();
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  ASSERT_EQ((*ctx)->size(), 2) << "run under mpirun -np 2";
  FollowerIsHandedTheForecastOfTheExpertsItComputes(*ctx);  // its MPI users are gone after it
  (*ctx)->Finalize();
}

}  // namespace
}  // namespace ef::comm
