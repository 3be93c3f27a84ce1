#include "placement/planner.h"

#include <gtest/gtest.h>

#include <random>

namespace ef::placement {
namespace {

RoutingForecast SkewedForecast(std::mt19937& rng, int tokens, int layers, int experts, int k) {
  RoutingForecast f(tokens, layers, experts);
  // Zipf-like popularity: expert 0 is by far the hottest.
  std::vector<double> weights(experts);
  for (int e = 0; e < experts; ++e) weights[e] = 1.0 / (1 + e);
  std::discrete_distribution<int> pop(weights.begin(), weights.end());
  for (int t = 0; t < tokens; ++t)
    for (int l = 0; l < layers; ++l)
      for (int j = 0; j < k; ++j) f.row(t, l)[pop(rng)] += 1.f / k;
  return f;
}

TEST(PlannerTest, EveryNeededExpertIsPlacedAndLoadIsBounded) {
  std::mt19937 rng(5);
  for (int ranks : {1, 2, 4, 8}) {
    for (double bound : {1.1, 1.25, 1.5}) {
      RoutingForecast f = SkewedForecast(rng, 64, 4, 32, 4);
      PlannerOptions opt;
      opt.max_imbalance = bound;
      Topology topo;
      topo.num_ranks = ranks;
      auto plan = Planner(opt).Plan(f, {}, topo);
      ASSERT_TRUE(plan.ok()) << plan.status().ToString();
      EXPECT_LE(plan->MaxLoadImbalance(), bound + 1e-6) << ranks << " ranks";
      for (int t = 0; t < f.num_tokens; ++t)
        for (int l = 0; l < f.num_layers; ++l)
          for (int e = 0; e < f.num_experts; ++e)
            if (f.row(t, l)[e] >= opt.min_prob) {
              ASSERT_FALSE(plan->ranks(l, e).empty()) << "layer " << l << " expert " << e;
              for (int r : plan->ranks(l, e)) {
                EXPECT_GE(r, 0);
                EXPECT_LT(r, ranks);
              }
            }
    }
  }
}

TEST(PlannerTest, PrefetchListsSkipResidentExpertsAndAreOrdered) {
  std::mt19937 rng(9);
  RoutingForecast f = SkewedForecast(rng, 32, 3, 16, 2);
  Topology topo;
  topo.num_ranks = 2;
  CacheResidency cache;
  cache.resident.assign(2, std::vector<uint8_t>(3 * 16, 0));
  cache.resident[0][0 * 16 + 0] = 1;  // rank 0 holds layer 0 expert 0 (its home)
  auto plan = Planner().Plan(f, cache, topo);
  ASSERT_TRUE(plan.ok());
  for (int r = 0; r < 2; ++r) {
    const auto& list = plan->prefetch[r];
    for (size_t i = 0; i < list.size(); ++i) {
      EXPECT_FALSE(cache.has(r, list[i].layer, list[i].expert, 16));
      const auto& rs = plan->ranks(list[i].layer, list[i].expert);
      EXPECT_NE(std::find(rs.begin(), rs.end(), r), rs.end());
      if (i > 0) {
        EXPECT_LE(list[i - 1].layer, list[i].layer);
        if (list[i - 1].layer == list[i].layer) {
          EXPECT_GE(list[i - 1].expected_tokens, list[i].expected_tokens);
        }
      }
    }
  }
}

TEST(PlannerTest, RejectsBadTopology) {
  RoutingForecast f(2, 1, 4);
  Topology topo;
  topo.num_ranks = 0;
  EXPECT_FALSE(Planner().Plan(f, {}, topo).ok());
  topo.num_ranks = 2;
  topo.home_rank = {0, 1, 2, 0};  // rank 2 does not exist
  EXPECT_FALSE(Planner().Plan(f, {}, topo).ok());
}

}  // namespace
}  // namespace ef::placement
