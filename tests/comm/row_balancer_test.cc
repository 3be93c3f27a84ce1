// RowBalancer: planned per-layer placement of rows. Moves only send an overloaded rank's blocks
// home to their source rank (so no row travels that did not before), stop at the bound, never
// raise the maximum, and give the same plan for the same counts.
#include "comm/row_balancer.h"

#include <gtest/gtest.h>

#include <algorithm>

namespace ef::comm {
namespace {

TEST(RowBalancerTest, MovesOverloadedBlocksToTheirSourceUntilTheBound) {
  // 2 ranks, 2 experts, both computed on rank 0 by the static plan; each rank has 10 rows of each.
  const std::vector<int64_t> rows = {10, 10, 10, 10};  // [source * E + e]
  const std::vector<int> stat = {0, 0, 0, 0};
  RowPlan p = RowBalancer::Plan(rows, stat, 2, 2, 1.15);
  EXPECT_EQ(p.total_rows, 40);
  EXPECT_EQ(p.static_max_rows, 40);
  EXPECT_EQ(p.max_rows, 20);  // rank 1's rows computed on rank 1
  EXPECT_EQ(p.rows_moved, 20);
  EXPECT_EQ(p.compute, (std::vector<int>{0, 0, 1, 1}));
}

TEST(RowBalancerTest, NeverMovesRowsAwayFromTheirSourceAndStopsWhenNoMoveHelps) {
  // Rank 0's own rows overload it: nothing may leave rank 0 (they would travel).
  const std::vector<int64_t> rows = {50, 50, 1, 1};
  const std::vector<int> stat = {0, 1, 0, 1};
  RowPlan p = RowBalancer::Plan(rows, stat, 2, 2, 1.15);
  EXPECT_EQ(p.compute[0], 0);
  EXPECT_EQ(p.compute[1], 1);  // rank 0's rows of expert 1 stay where the static plan sends them
  EXPECT_LE(p.max_rows, p.static_max_rows);
}

TEST(RowBalancerTest, RandomCountsNeverWorseAndDeterministic) {
  uint64_t x = 12345;
  auto next = [&] { return (x = x * 6364136223846793005ull + 1442695040888963407ull) >> 33; };
  for (int trial = 0; trial < 200; ++trial) {
    const int N = 2 + static_cast<int>(next() % 7), E = 4 + static_cast<int>(next() % 60);
    std::vector<int64_t> rows(static_cast<size_t>(N) * E);
    std::vector<int> stat(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) {
      rows[i] = (next() % 4 == 0) ? static_cast<int64_t>(next() % 50) : 0;
      stat[i] = static_cast<int>((i % E) * N / E);
    }
    const RowPlan p = RowBalancer::Plan(rows, stat, N, E, 1.15);
    EXPECT_LE(p.max_rows, p.static_max_rows);
    for (size_t i = 0; i < rows.size(); ++i) {
      const int source = static_cast<int>(i / E);
      EXPECT_TRUE(p.compute[i] == stat[i] || p.compute[i] == source);
    }
    EXPECT_EQ(RowBalancer::Plan(rows, stat, N, E, 1.15).compute, p.compute);
  }
}

}  // namespace
}  // namespace ef::comm
