// PlacementOptimizer: balanced layouts, the all-to-all cost it is fitted for, and the target on the
// FLAME-MoE trace (fitted on sequences 0-23, scored on 24-31: at least 30% fewer remote ranks per
// token-layer than the contiguous placement at 4 and at 8 ranks).
#include "placement/placement_optimizer.h"

#include <gtest/gtest.h>

#include "tests/placement/predictor_test_util.h"

namespace ef::placement {
namespace {

RoutingTrace Flame() {
  auto t = ReadRoutingTrace(std::string(EF_TEST_DATA) + "/traces/flame_moe_290m_prefill.jsonl");
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return *t;
}

void ExpectBalanced(const ExpertLayout& l, int copies_per_layer) {
  for (int m = 0; m < l.num_layers; ++m) {
    const int lo = copies_per_layer / l.num_ranks, hi = (copies_per_layer + l.num_ranks - 1) / l.num_ranks;
    for (int r = 0; r < l.num_ranks; ++r) {
      EXPECT_GE(l.CopiesOn(m, r), lo) << "layer " << m << " rank " << r;
      EXPECT_LE(l.CopiesOn(m, r), hi) << "layer " << m << " rank " << r;
    }
  }
}

TEST(ExpertLayoutTest, CostCountsDistinctRanksBeyondTheFirst) {
  RoutingTrace t;
  t.header.num_layers = 1;
  t.header.num_experts = 4;
  t.header.top_k = 2;
  t.tokens.push_back({0, 0, -1, {0, 1}, {}});  // contiguous over 2 ranks: both on rank 0
  t.tokens.push_back({0, 1, -1, {0, 3}, {}});  // ranks 0 and 1
  EXPECT_DOUBLE_EQ(RemoteRanksPerTokenLayer(t, ExpertLayout::Contiguous(1, 4, 2)), 0.5);
  EXPECT_DOUBLE_EQ(RemoteRanksPerTokenLayer(t, ExpertLayout::RoundRobin(1, 4, 2)), 1.0);
  // A copy of expert 3 on rank 0 makes the second token local too.
  ExpertLayout r = ExpertLayout::Contiguous(1, 4, 2);
  r.ranks[3].push_back(0);
  EXPECT_DOUBLE_EQ(RemoteRanksPerTokenLayer(t, r), 0.0);
  EXPECT_EQ(r.ToJson()["replicas"][0]["expert"], 3);
}

TEST(PlacementOptimizerTest, BalancedAndBetterOnPlantedGroups) {
  // Tokens draw both experts from one of 4 planted groups {g, g+4, g+8, g+12}: a perfect
  // placement over 4 ranks keeps every token on one rank; contiguous does not.
  RoutingTrace t;
  t.header.num_layers = 2;
  t.header.num_experts = 16;
  t.header.top_k = 2;
  for (int i = 0; i < 400; ++i) {
    const int g = i % 4, a = (i / 4) % 4, b = (a + 1 + (i / 16) % 3) % 4;
    t.tokens.push_back({i / 50,
                        i % 50,
                        -1,
                        {static_cast<int16_t>(g + 4 * a), static_cast<int16_t>(g + 4 * b),
                         static_cast<int16_t>(g + 4 * b), static_cast<int16_t>(g + 4 * a)},
                        {}});
  }
  PlacementOptimizerOptions o;
  o.num_ranks = 4;
  auto l = PlacementOptimizer(o).Fit(t);
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  ExpectBalanced(*l, 16);
  EXPECT_DOUBLE_EQ(RemoteRanksPerTokenLayer(t, *l), 0.0);
  EXPECT_GT(RemoteRanksPerTokenLayer(t, ExpertLayout::Contiguous(2, 16, 4)), 0.5);
  // Consecutive layers share groups, so they are numbered onto the same ranks.
  for (int e = 0; e < 16; ++e) EXPECT_EQ(l->Home(0, e), l->Home(1, e));
}

TEST(PlacementOptimizerTest, RejectsImpossibleShapes) {
  RoutingTrace t = Flame();
  PlacementOptimizerOptions o;
  o.num_ranks = 65;
  EXPECT_FALSE(PlacementOptimizer(o).Fit(t).ok());
  o.num_ranks = 4;
  o.replicate = 65;
  EXPECT_FALSE(PlacementOptimizer(o).Fit(t).ok());
}

TEST(PlacementOptimizerTest, FlameHeldOutTarget) {
  RoutingTrace all = Flame();
  all.SortBySeqPos();
  const RoutingTrace train = all.Filter([](int64_t s) { return s <= 23; });
  const RoutingTrace test = all.Filter([](int64_t s) { return s >= 24; });
  ASSERT_EQ(test.tokens.size(), 512u);
  for (int ranks : {4, 8}) {
    PlacementOptimizerOptions o;
    o.num_ranks = ranks;
    auto placed = PlacementOptimizer(o).Fit(train);
    ASSERT_TRUE(placed.ok()) << placed.status().ToString();
    ExpectBalanced(*placed, 64);
    const double contiguous = RemoteRanksPerTokenLayer(test, ExpertLayout::Contiguous(8, 64, ranks));
    const double cost = RemoteRanksPerTokenLayer(test, *placed);
    EXPECT_LE(cost, 0.70 * contiguous) << ranks << " ranks: " << cost << " vs contiguous " << contiguous;
    // Replication keeps the balance over E + N copies and does not cost more.
    o.replicate = 4;
    auto rep = PlacementOptimizer(o).Fit(train);
    ASSERT_TRUE(rep.ok());
    ExpectBalanced(*rep, 68);
    EXPECT_LE(RemoteRanksPerTokenLayer(test, *rep), cost + 1e-9);
  }
}

}  // namespace
}  // namespace ef::placement
