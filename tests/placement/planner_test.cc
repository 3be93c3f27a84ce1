#include "placement/planner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>

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

// Plan invariants on random skewed forecasts: every needed expert placed on distinct valid ranks,
// the load bound met, rank loads equal to the experts' loads split evenly over their copies, and
// num_replicas counting the copies beyond one.
TEST(PlannerTest, PlansAreConsistentAndBalanced) {
  std::mt19937 rng(21);
  for (int ranks : {1, 3, 8, 16, 64, 256})
    for (int hot : {0, 1, 4})
      for (double bound : {1.1, 1.25, 2.0}) {
        RoutingForecast f = SkewedForecast(rng, 96, 3, 64, 4);
        PlannerOptions opt;
        opt.max_imbalance = bound;
        opt.hot_replicas_per_expert = hot;
        Topology topo;
        topo.num_ranks = ranks;
        auto plan = Planner(opt).Plan(f, {}, topo);
        ASSERT_TRUE(plan.ok()) << plan.status().ToString();
        const std::string where =
            std::to_string(ranks) + " ranks, hot " + std::to_string(hot) + ", bound " + std::to_string(bound);
        EXPECT_LE(plan->MaxLoadImbalance(), bound + 1e-6) << where;
        int replicas = 0;
        std::vector<double> load(static_cast<size_t>(f.num_layers) * ranks, 0.0);
        for (int l = 0; l < f.num_layers; ++l)
          for (int e = 0; e < f.num_experts; ++e) {
            const auto& rs = plan->ranks(l, e);
            std::vector<int> sorted = rs;
            std::sort(sorted.begin(), sorted.end());
            EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end()) << where << " expert " << e;
            if (rs.empty()) continue;
            replicas += static_cast<int>(rs.size()) - 1;
            for (int r : rs) {
              ASSERT_GE(r, 0);
              ASSERT_LT(r, ranks);
              load[static_cast<size_t>(l) * ranks + r] += plan->expected_tokens[l * f.num_experts + e] / rs.size();
            }
          }
        EXPECT_EQ(plan->num_replicas, replicas) << where;
        for (size_t i = 0; i < load.size(); ++i) EXPECT_NEAR(plan->rank_load[i], load[i], 1e-3) << where;
      }
}

// Step 3 alone (a bound loose enough that step 4 adds nothing): a hot expert gets at most
// hot_replicas_per_expert copies, and without the cap the hottest one takes a slot on every rank.
TEST(PlannerTest, HotCopiesAreCapped) {
  std::mt19937 rng(22);
  RoutingForecast f = SkewedForecast(rng, 256, 2, 32, 4);
  Topology topo;
  topo.num_ranks = 16;
  PlannerOptions opt;
  opt.max_imbalance = 100;
  auto capped = Planner(opt).Plan(f, {}, topo);
  ASSERT_TRUE(capped.ok());
  size_t most = 0;
  for (const auto& rs : capped->compute_ranks) most = std::max(most, rs.size());
  EXPECT_EQ(most, 4u);
  opt.hot_replicas_per_expert = 0;
  auto uncapped = Planner(opt).Plan(f, {}, topo);
  ASSERT_TRUE(uncapped.ok());
  for (int l = 0; l < f.num_layers; ++l) EXPECT_EQ(uncapped->ranks(l, 0).size(), 16u) << "layer " << l;
}

// Among equally loaded ranks, a copy goes to one whose cache already holds the expert.
TEST(PlannerTest, CopiesPreferRanksCachingTheExpert) {
  RoutingForecast f(10, 1, 4);
  for (int t = 0; t < 10; ++t) f.row(t, 0)[0] = 1.f;  // expert 0: 10 tokens
  for (int e = 1; e < 4; ++e) f.row(e, 0)[e] = 1.f;   // experts 1-3: one token each
  Topology topo;
  topo.num_ranks = 4;  // expert e at home on rank e
  CacheResidency cache;
  cache.resident.assign(4, std::vector<uint8_t>(4, 0));
  cache.resident[0][0] = 1;  // at home, so step 2 keeps it there
  cache.resident[3][0] = 1;
  PlannerOptions opt;
  opt.hot_replicas_per_expert = 2;  // step 3: one copy of expert 0, on rank 1, 2 or 3 (all load 1)
  opt.max_imbalance = 100;
  auto plan = Planner(opt).Plan(f, cache, topo);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->ranks(0, 0), (std::vector<int>{0, 3}));
  for (const PrefetchEntry& p : plan->prefetch[3]) EXPECT_NE(p.expert, 0) << "rank 3 already caches expert 0";
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
