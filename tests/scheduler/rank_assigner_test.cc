// RankAssigner against a dense reference: the cost of every (unit, rank) computed by walking the
// unit's tokens on that rank (RankAssigner::TokenSends), then the same regret-ordered greedy. The
// sparse cost must equal the dense one entry by entry, and the assigner must take exactly the same
// decisions, ties included, on random plans with replicas, unplanned experts, experts on every rank
// and ranks past 64 (where the replica rule's "already receiving" test does not look).
#include "scheduler/rank_assigner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>

namespace ef::scheduler {
namespace {

std::vector<int> DenseAssign(const ExpertPathSet& paths, const placement::BatchPlan& plan,
                             std::vector<std::vector<int>> units, double max_imbalance) {
  const int R = plan.num_ranks, n = paths.num_tokens();
  if (units.empty())
    for (int i = 0; i < n; ++i) units.push_back({i});
  const int U = static_cast<int>(units.size());
  std::vector<long> cost(static_cast<size_t>(U) * R, 0);
  std::vector<int> size(U);
  for (int u = 0; u < U; ++u) {
    size[u] = static_cast<int>(units[u].size());
    if (R > 1)
      for (int r = 0; r < R; ++r)
        for (int t : units[u]) cost[static_cast<size_t>(u) * R + r] += RankAssigner::TokenSends(paths, t, r, plan);
  }
  const int largest = U > 0 ? *std::max_element(size.begin(), size.end()) : 0;
  const long cap = std::max<long>(static_cast<long>(std::ceil(max_imbalance * n / R - 1e-9)), largest);
  std::vector<long> regret(U, 0);
  for (int u = 0; u < U; ++u) {
    std::vector<long> row(cost.begin() + static_cast<long>(u) * R, cost.begin() + static_cast<long>(u + 1) * R);
    std::sort(row.begin(), row.end());
    regret[u] = R > 1 ? row[1] - row[0] : 0;
  }
  std::vector<int> order(U);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return regret[a] != regret[b] ? regret[a] > regret[b] : size[a] > size[b]; });
  std::vector<long> tokens_on(R, 0);
  std::vector<int> rank_of(n, -1);
  for (int u : order) {
    int best = -1;
    for (int r = 0; r < R; ++r) {
      if (tokens_on[r] + size[u] > cap) continue;
      const long c = cost[static_cast<size_t>(u) * R + r];
      if (best < 0 || c < cost[static_cast<size_t>(u) * R + best] ||
          (c == cost[static_cast<size_t>(u) * R + best] && tokens_on[r] < tokens_on[best]))
        best = r;
    }
    if (best < 0) best = static_cast<int>(std::min_element(tokens_on.begin(), tokens_on.end()) - tokens_on.begin());
    tokens_on[best] += size[u];
    for (int t : units[u]) rank_of[t] = best;
  }
  return rank_of;
}

struct Case {
  ExpertPathSet paths;
  placement::BatchPlan plan;
  std::vector<std::vector<int>> units;
  double max_imbalance = 1.25;
  std::string name;
};

// A random plan: per expert nothing (unplanned), one rank, a few replicas in random order (sometimes
// with a duplicate), a third of the ranks, or every rank. Ranks are drawn from a small pool so that experts share
// ranks.
placement::BatchPlan RandomPlan(std::mt19937& rng, int layers, int experts, int ranks) {
  placement::BatchPlan plan;
  plan.num_layers = layers;
  plan.num_experts = experts;
  plan.num_ranks = ranks;
  plan.compute_ranks.resize(static_cast<size_t>(layers) * experts);
  std::vector<int> pool(ranks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  pool.resize(std::min(ranks, 1 + static_cast<int>(rng() % 12)));
  if (ranks > 64 && rng() % 2) pool.push_back(64 + static_cast<int>(rng() % (ranks - 64)));
  if (pool[0] + 64 < ranks) pool.push_back(pool[0] + 64);  // a rank past 64 aliasing one below it
  for (auto& rs : plan.compute_ranks) {
    const int kind = static_cast<int>(rng() % 20);
    if (kind < 3) continue;  // unplanned: home block
    if (kind == 3) {         // everywhere, in a random order
      rs.resize(ranks);
      std::iota(rs.begin(), rs.end(), 0);
      std::shuffle(rs.begin(), rs.end(), rng);
      continue;
    }
    if (kind == 4) {  // many copies: a token's experts may then involve more than 63 ranks
      for (int r = 0; r < ranks; ++r)
        if (rng() % 3 == 0) rs.push_back(r);
      std::shuffle(rs.begin(), rs.end(), rng);
      continue;
    }
    const int copies = kind < 12 ? 1 : 2 + static_cast<int>(rng() % 5);
    for (int c = 0; c < copies; ++c) {
      const int r = rng() % 4 ? pool[rng() % pool.size()] : static_cast<int>(rng() % ranks);
      if (std::find(rs.begin(), rs.end(), r) == rs.end() || kind == 19) rs.push_back(r);
    }
  }
  return plan;
}

Case RandomCase(std::mt19937& rng, int ranks, int layers, int experts, int max_k) {
  Case c;
  const int tokens = 1 + static_cast<int>(rng() % 40);
  c.paths = ExpertPathSet(tokens, layers, experts);
  for (int t = 0; t < tokens; ++t)
    for (int l = 0; l < layers; ++l) {
      const int k = 1 + static_cast<int>(rng() % std::min(max_k, experts));
      // Few distinct paths: identical tokens tie on every rank.
      std::mt19937 path_rng(static_cast<unsigned>(rng() % 3 == 0 ? 7 * l : rng()));
      for (int j = 0; j < k; ++j) c.paths.Set(t, l, static_cast<int>(path_rng() % experts));
    }
  c.plan = RandomPlan(rng, layers, experts, ranks);
  c.plan.num_tokens = tokens;
  if (rng() % 2) {  // units of 1-4 tokens, in a shuffled order
    std::vector<int> ids(tokens);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    for (size_t i = 0; i < ids.size();) {
      const size_t len = std::min<size_t>(1 + rng() % 4, ids.size() - i);
      c.units.emplace_back(ids.begin() + static_cast<long>(i), ids.begin() + static_cast<long>(i + len));
      i += len;
    }
  }
  const double bounds[] = {1.0, 1.25, 2.0, 100.0};
  c.max_imbalance = bounds[rng() % 4];
  c.name = std::to_string(ranks) + " ranks, " + std::to_string(layers) + " layers x " + std::to_string(experts) +
           " experts, " + std::to_string(tokens) + " tokens, " + std::to_string(c.units.size()) + " units, bound " +
           std::to_string(c.max_imbalance);
  return c;
}

void ExpectSameAsDense(const Case& c) {
  auto costs = RankAssigner::UnitCosts(c.paths, c.plan, c.units);
  ASSERT_TRUE(costs.ok()) << c.name << ": " << costs.status().ToString();
  const int R = c.plan.num_ranks;
  std::vector<std::vector<int>> units = c.units;
  if (units.empty())
    for (int t = 0; t < c.paths.num_tokens(); ++t) units.push_back({t});
  ASSERT_EQ(costs->size(), units.size() * R) << c.name;
  for (size_t u = 0; u < units.size(); ++u)
    for (int r = 0; r < R; ++r) {
      long sends = 0;
      for (int t : units[u]) sends += RankAssigner::TokenSends(c.paths, t, r, c.plan);
      ASSERT_EQ((*costs)[u * R + r], R > 1 ? sends : 0) << c.name << ": unit " << u << " rank " << r;
    }
  RankAssigner assigner(RankAssignerOptions{c.max_imbalance});
  auto got = assigner.Assign(c.paths, c.plan, c.units);
  ASSERT_TRUE(got.ok()) << c.name << ": " << got.status().ToString();
  EXPECT_EQ(*got, DenseAssign(c.paths, c.plan, c.units, c.max_imbalance)) << c.name;
}

TEST(RankAssignerTest, MatchesDenseReferenceOnRandomPlans) {
  std::mt19937 rng(11);
  for (int ranks : {1, 2, 3, 5, 8, 16, 63, 64, 65, 100, 130})
    for (int i = 0; i < 25; ++i) {
      const int layers = 1 + static_cast<int>(rng() % 4);
      const int experts = std::vector<int>{4, 8, 13, 64, 70}[rng() % 5];
      ExpectSameAsDense(RandomCase(rng, ranks, layers, experts, 8));
    }
}

TEST(RankAssignerTest, MatchesDenseReferenceWithManyExpertsPerToken) {
  // More than 64 experts of one token at one layer: the per-rank walk instead of the masks.
  std::mt19937 rng(12);
  for (int ranks : {4, 70})
    for (int i = 0; i < 6; ++i) ExpectSameAsDense(RandomCase(rng, ranks, 2, 100, 90));
}

TEST(RankAssignerTest, MatchesDenseReferenceWhenEverythingTies) {
  // One expert per layer on its home rank, identical tokens: every rank but the home ties.
  for (int ranks : {2, 7, 64, 80}) {
    Case c;
    c.paths = ExpertPathSet(3 * ranks, 2, 4);
    for (int t = 0; t < c.paths.num_tokens(); ++t) c.paths.Set(t, 1, 2);
    c.plan.num_layers = 2;
    c.plan.num_experts = 4;
    c.plan.num_ranks = ranks;
    c.plan.compute_ranks.assign(8, {});  // unplanned: home blocks
    c.name = "ties at " + std::to_string(ranks) + " ranks";
    ExpectSameAsDense(c);
  }
}

TEST(RankAssignerTest, TokenGoesToTheRankComputingItsExperts) {
  placement::BatchPlan plan;
  plan.num_layers = 2;
  plan.num_experts = 4;
  plan.num_ranks = 4;
  plan.compute_ranks = {{0}, {1}, {2}, {3}, {3}, {2}, {1}, {0}};
  ExpertPathSet paths(4, 2, 4);
  for (int t = 0; t < 4; ++t) {
    paths.Set(t, 0, t);
    paths.Set(t, 1, 3 - t);  // both layers' experts of token t on rank t
  }
  auto got = RankAssigner().Assign(paths, plan);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(*got, (std::vector<int>{0, 1, 2, 3}));
  for (int t = 0; t < 4; ++t) EXPECT_EQ(RankAssigner::TokenSends(paths, t, t, plan), 0);
}

TEST(RankAssignerTest, RejectsPlanRanksOutOfRange) {
  placement::BatchPlan plan;
  plan.num_layers = 1;
  plan.num_experts = 2;
  plan.num_ranks = 2;
  plan.compute_ranks = {{0}, {2}};
  ExpertPathSet paths(2, 1, 2);
  paths.Set(0, 0, 1);
  auto got = RankAssigner().Assign(paths, plan);
  ASSERT_FALSE(got.ok());
  EXPECT_NE(got.status().message().find("rank 2"), std::string::npos) << got.status().ToString();
  plan.compute_ranks.pop_back();
  EXPECT_FALSE(RankAssigner().Assign(paths, plan).ok());
}

}  // namespace
}  // namespace ef::scheduler
