#include "scheduler/token_regrouper.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <numeric>
#include <random>

#include "placement/routing_trace.h"
#include "scheduler/schedule_evaluator.h"

namespace ef::scheduler {
namespace {

ExpertPathSet RandomPaths(std::mt19937& rng, int n, int layers, int experts, int k) {
  ExpertPathSet p(n, layers, experts);
  std::uniform_int_distribution<int> pick(0, experts - 1);
  // A few "topics" so clustering has something to find.
  const int topics = 4;
  for (int t = 0; t < n; ++t) {
    const int topic = static_cast<int>(rng() % topics);
    for (int l = 0; l < layers; ++l)
      for (int j = 0; j < k; ++j)
        p.Set(t, l, (rng() % 3 == 0) ? pick(rng) : (topic * experts / topics + j + l) % experts);
  }
  return p;
}

std::vector<int> Capacities(int n, int b) {
  std::vector<int> caps;
  for (int s = 0; s < n; s += b) caps.push_back(std::min(b, n - s));
  return caps;
}

// Every token exactly once, each batch at its capacity, each sequence's tokens in order.
void ExpectValid(const RegroupResult& r, std::span<const int> caps, std::span<const int64_t> seq, int n) {
  ASSERT_EQ(r.batches.size(), caps.size());
  std::vector<int> seen(n, 0), batch_of(n, -1);
  for (size_t b = 0; b < r.batches.size(); ++b) {
    EXPECT_EQ(static_cast<int>(r.batches[b].size()), caps[b]);
    EXPECT_TRUE(std::is_sorted(r.batches[b].begin(), r.batches[b].end()));
    for (int t : r.batches[b]) {
      ASSERT_GE(t, 0);
      ASSERT_LT(t, n);
      ++seen[t];
      batch_of[t] = static_cast<int>(b);
    }
  }
  for (int t = 0; t < n; ++t) EXPECT_EQ(seen[t], 1) << "token " << t;
  if (seq.empty()) return;
  // Emission order: batches in order, index order within a batch. A sequence's tokens must appear
  // in index (= position) order.
  std::map<int64_t, int> last_emitted;
  for (const auto& b : r.batches)
    for (int t : b) {
      auto it = last_emitted.find(seq[t]);
      if (it != last_emitted.end()) {
        EXPECT_LT(it->second, t) << "sequence " << seq[t] << " reordered";
      }
      last_emitted[seq[t]] = t;
    }
}

TEST(TokenRegrouperTest, RandomInputsKeepEveryTokenOnceAndSequenceOrder) {
  std::mt19937 rng(7);
  TokenRegrouper rg;
  for (int trial = 0; trial < 200; ++trial) {
    const int b = 1 + static_cast<int>(rng() % 12);
    const int w = 1 + static_cast<int>(rng() % 5);
    const int n = std::max(1, b * w - static_cast<int>(rng() % b));
    const int experts = trial % 3 == 0 ? 256 : (trial % 3 == 1 ? 8 : 64);
    const int layers = 1 + static_cast<int>(rng() % 6);
    ExpertPathSet p = RandomPaths(rng, n, layers, experts, 2);
    std::vector<int64_t> seq(n);
    const int num_seqs = 1 + static_cast<int>(rng() % 6);
    for (auto& s : seq) s = static_cast<int64_t>(rng() % num_seqs);
    const auto caps = Capacities(n, b);
    auto r = rg.Regroup(p, caps, seq);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ExpectValid(*r, caps, seq, n);
    EXPECT_LE(r->objective, r->fcfs_objective);
    EXPECT_EQ(r->objective, TokenRegrouper::Objective(p, r->batches));
    // Independent tokens: no order constraint, same invariants otherwise.
    auto free = rg.Regroup(p, caps);
    ASSERT_TRUE(free.ok());
    ExpectValid(*free, caps, {}, n);
    EXPECT_LE(free->objective, free->fcfs_objective);
  }
}

TEST(TokenRegrouperTest, DeadlinesAreRespected) {
  std::mt19937 rng(11);
  TokenRegrouper rg;
  for (int trial = 0; trial < 100; ++trial) {
    const int b = 2 + static_cast<int>(rng() % 8), w = 2 + static_cast<int>(rng() % 3), n = b * w;
    ExpertPathSet p = RandomPaths(rng, n, 4, 64, 4);
    // FCFS-style deadlines: token i due by batch i / b (no slack at all) for a random prefix.
    std::vector<int> deadline(n, w - 1);
    const int tight = static_cast<int>(rng() % n);
    for (int i = 0; i < tight; ++i) deadline[i] = i / b;
    const auto caps = Capacities(n, b);
    auto r = rg.Regroup(p, caps, {}, deadline);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ExpectValid(*r, caps, {}, n);
    for (size_t k = 0; k < r->batches.size(); ++k)
      for (int t : r->batches[k]) EXPECT_LE(static_cast<int>(k), deadline[t]);
  }
}

// Deadlines not in index order, batches of unequal sizes: any feasible set is kept. The two small
// cases filled an early batch with tokens due later (the earliest token, then the greedy pick) and
// left a token due at batch 1 no room before batch 2.
TEST(TokenRegrouperTest, FeasibleDeadlinesOutOfIndexOrderAreRespected) {
  TokenRegrouper rg;
  auto expect_met = [](const RegroupResult& r, std::span<const int> deadline) {
    for (size_t k = 0; k < r.batches.size(); ++k)
      for (int t : r.batches[k]) EXPECT_LE(static_cast<int>(k), deadline[t]) << "token " << t;
  };
  {
    ExpertPathSet p(4, 1, 8);
    for (auto [t, e] : {std::pair{0, 0}, {0, 1}, {1, 2}, {1, 3}, {2, 4}, {2, 5}, {3, 0}, {3, 1}}) p.Set(t, 0, e);
    const int caps[] = {2, 1, 1}, deadline[] = {1, 1, 1, 2};
    auto r = rg.Regroup(p, caps, {}, deadline);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    expect_met(*r, deadline);
  }
  {
    ExpertPathSet p(3, 1, 8);
    for (int t = 0; t < 3; ++t) p.Set(t, 0, t);
    const int caps[] = {1, 1, 1}, deadline[] = {2, 1, 1};
    auto r = rg.Regroup(p, caps, {}, deadline);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    expect_met(*r, deadline);
  }
  std::mt19937 rng(5);
  for (int trial = 0; trial < 300; ++trial) {
    const int w = 2 + static_cast<int>(rng() % 5);
    std::vector<int> caps(w);
    for (int& c : caps) c = static_cast<int>(rng() % 6);
    const int n = std::accumulate(caps.begin(), caps.end(), 0);
    if (n == 0) continue;
    ExpertPathSet p = RandomPaths(rng, n, 3, 32, 2);
    // Feasible by construction: a random placement, each token due 0-2 batches after its place.
    std::vector<int> order(n), deadline(n);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int b = 0, i = 0; b < w; ++b)
      for (int c = 0; c < caps[b]; ++c, ++i) deadline[order[i]] = std::min(w - 1, b + static_cast<int>(rng() % 3));
    auto r = rg.Regroup(p, caps, {}, deadline);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ExpectValid(*r, caps, {}, n);
    expect_met(*r, deadline);
    // Never worse than FCFS where FCFS (index order) meets the deadlines too.
    bool fcfs_meets = true;
    for (int b = 0, i = 0; b < w; ++b)
      for (int c = 0; c < caps[b]; ++c, ++i) fcfs_meets = fcfs_meets && b <= deadline[i];
    if (fcfs_meets) {
      EXPECT_LE(r->objective, r->fcfs_objective);
    }
  }
}

TEST(TokenRegrouperTest, RejectsBadInput) {
  ExpertPathSet p(4, 2, 8);
  TokenRegrouper rg;
  EXPECT_FALSE(rg.Regroup(p, std::vector<int>{2, 1}).ok());  // capacities do not sum to n
  EXPECT_FALSE(rg.Regroup(p, std::vector<int>{2, 2}, std::vector<int64_t>{0, 0}).ok());
  EXPECT_FALSE(rg.Regroup(p, std::vector<int>{2, 2}, {}, std::vector<int>{0, 0, 0, 1}).ok());  // 3 due in batch 0
  EXPECT_FALSE(ExpertPathSet::FromForecast(placement::RoutingForecast(1, 1, 300), 2).ok());
  // A batch's per-expert counts are 16-bit: a larger batch is refused, not counted modulo 65536.
  ExpertPathSet big(65536, 1, 8);
  auto r = rg.Regroup(big, std::vector<int>{65536});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("65535"), std::string::npos) << r.status().ToString();
  EXPECT_TRUE(rg.Regroup(big, std::vector<int>{32768, 32768}).ok());
}

TEST(TokenRegrouperTest, ClustersObviousGroups) {
  // Two kinds of tokens interleaved: FCFS mixes them, regrouping separates them.
  ExpertPathSet p(8, 1, 64);
  for (int t = 0; t < 8; ++t)
    for (int j = 0; j < 4; ++j) p.Set(t, 0, (t % 2) * 32 + j);
  TokenRegrouper rg;
  auto r = rg.Regroup(p, std::vector<int>{4, 4});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->fcfs_objective, 16);
  EXPECT_EQ(r->objective, 8);
}

// The FLAME-MoE targets (oracle forecast, batch 16): >= 15% fewer distinct experts per batch than
// FCFS at window 2, >= 25% at window 4.
TEST(TokenRegrouperTest, FlameTargets) {
  const std::string path = std::string(EF_TEST_DATA) + "/traces/flame_moe_290m_prefill.jsonl";
  ASSERT_TRUE(std::filesystem::exists(path)) << path << " is missing (tests/data/traces)";
  auto trace = placement::ReadRoutingTrace(path);
  ASSERT_TRUE(trace.ok()) << trace.status().ToString();
  trace->SortBySeqPos();
  std::vector<size_t> all(trace->tokens.size());
  std::iota(all.begin(), all.end(), 0);
  auto oracle = ExpertPathSet::FromTrace(*trace, all);
  ASSERT_TRUE(oracle.ok());
  for (auto [window, target] : {std::pair{2, 0.15}, std::pair{4, 0.25}}) {
    ScheduleEvalOptions opt;
    opt.batch_size = 16;
    opt.window = window;
    auto r = ScheduleEvaluator(opt).Run(*trace, *oracle);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_GE(r->reduction, target) << "window " << window;
    EXPECT_LE(r->regrouped.max_delay_batches, window - 1);
    // Every token emitted once.
    std::vector<int> seen(trace->tokens.size(), 0);
    for (const auto& b : r->regrouped_batches)
      for (int t : b) ++seen[t];
    EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int s) { return s == 1; }));
  }
}

}  // namespace
}  // namespace ef::scheduler
