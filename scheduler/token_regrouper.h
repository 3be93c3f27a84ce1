// TokenRegrouper: ExpertFlow's cross-batch token regrouping.
//
// Given the candidate tokens of a window of W upcoming batches (in arrival, i.e. FCFS, order) and
// each token's predicted expert path, it assigns the tokens to W batches of given capacities so
// that the sum over batches and layers of distinct activated experts is small: fewer distinct
// experts per batch means fewer expert weights to fetch and fewer, fuller expert GEMMs.
//
// Algorithm (deterministic):
//   1. Greedy seeding: batches are filled in order. Each batch starts with the earliest
//      unassigned token (so every batch makes FCFS progress), then repeatedly takes the token that
//      adds the fewest new (layer, expert) bits to the batch's union, ties to the one that shares
//      the most bits with it, then to the earliest. Each token's count of new bits is kept current
//      through an index from each bit to the tokens holding it (work per pick: the tokens sharing
//      one of its new bits, not every candidate). With deadlines, tokens due at the batch go first,
//      and a pick due later is taken only while every batch up to its deadline keeps room for the
//      tokens due by then (so any feasible set of deadlines is met, in any index order); the
//      earliest unassigned token opens a batch only where its own deadline allows that.
//   2. Local search: pairwise swaps between batches, accepted when they lower the objective
//      (first improvement; `max_swap_passes` passes over all pairs, 2 get nearly all of the gain).
//      Per-batch per-(layer, expert) counts give each batch's union U and its "held by exactly one
//      token" set O, so a swap's exact delta is a few popcounts:
//        delta_i = |b \ U_i| - |a & O_i \ b|   (a leaves batch i, b joins it), same for j.
//      A cheap lower bound (cached per token and batch) skips most pairs without touching words.
//
// Sequence order: when `seq` is given, tokens of one sequence must be emitted in index order (a
// prefill chunk or decode step may not overtake an earlier one of its sequence, so KV-cache order
// stays correct). Seeding only takes tokens whose predecessor is already placed, and swaps that
// would put a token in an earlier batch than its predecessor (or a later one than its successor)
// are rejected. Within a batch, tokens are returned in index order.
//
// Starvation: all tokens of the window are placed in the window's batches, so a token waits at most
// W - 1 batches beyond FCFS. Queue-level bounds across windows live in ContinuousBatcher.
//
// Thread-compatible: Regroup() reuses scratch buffers, so one instance per thread.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "runtime/core/status.h"
#include "scheduler/expert_path_set.h"

namespace ef::scheduler {

struct RegroupOptions {
  // Upper bound on local-search passes over all cross-batch pairs (0: greedy only).
  int max_swap_passes = 2;
  // Seed each batch with the earliest unassigned token (bounds reordering inside the window).
  bool seed_with_earliest = true;
  // Simulated-annealing swaps after the descent, per candidate token (0: off), and its
  // temperature schedule (geometric from t0 to t1, in units of distinct experts).
  int anneal_iters_per_token = 0;
  double anneal_t0 = 2.0;
  double anneal_t1 = 0.2;
};

struct RegroupResult {
  // batches[k]: candidate indices of batch k, increasing.
  std::vector<std::vector<int>> batches;
  int fcfs_objective = 0;    // sum over FCFS chunks of distinct (layer, expert) bits
  int greedy_objective = 0;  // after seeding
  int objective = 0;         // after local search
  int swaps = 0;
  int passes = 0;
};

class TokenRegrouper {
 public:
  explicit TokenRegrouper(RegroupOptions options = {}) : options_(options) {}

  // paths: rows 0..n-1 are the candidates in arrival order. capacities: size of each batch, summing
  // to n (FCFS would fill them in order). seq: empty (all tokens independent) or n sequence ids.
  // deadline: empty (any batch of the window) or n latest batch indices; a token is never placed
  // after its deadline. Deadlines must be feasible (at most capacities[0..b] tokens due by b) and
  // non-decreasing along a sequence.
  StatusOr<RegroupResult> Regroup(const ExpertPathSet& paths, std::span<const int> capacities,
                                  std::span<const int64_t> seq = {}, std::span<const int> deadline = {});

  // Sum over batches of distinct (layer, expert) bits: the objective.
  static int Objective(const ExpertPathSet& paths, const std::vector<std::vector<int>>& batches);

  // FCFS chunks: capacities filled in index order.
  static std::vector<std::vector<int>> FcfsBatches(std::span<const int> capacities);

 private:
  void Seed(const ExpertPathSet& paths, std::span<const int> capacities);
  void IndexBits(const ExpertPathSet& paths);
  int LocalSearch(const ExpertPathSet& paths, int* passes);
  void RebuildBatch(const ExpertPathSet& paths, int b);
  void RefreshCaches(const ExpertPathSet& paths, int b);
  void UpdateAddCosts(const ExpertPathSet& paths, int b, const std::vector<uint64_t>& before);
  void RefreshRemGains(const ExpertPathSet& paths, int b);
  bool SwapFeasible(int a, int b) const;
  int SwapDelta(const ExpertPathSet& paths, int a, int b) const;
  void MoveToken(const ExpertPathSet& paths, int t, int from, int to);
  void Anneal(const ExpertPathSet& paths);

  RegroupOptions options_;
  // Scratch, sized per call.
  int n_ = 0, num_batches_ = 0, words_ = 0, bits_ = 0;
  std::vector<int> batch_of_;              // [token]
  std::vector<std::vector<int>> members_;  // [batch]
  std::vector<uint16_t> counts_;           // [batch][bit]
  std::vector<uint64_t> union_;            // [batch][word]
  std::vector<uint64_t> ones_;             // [batch][word]
  std::vector<int> add_cost_;              // [token][batch]: |row \ U_batch|
  std::vector<int> rem_gain_;              // [token]: |row & O_own|
  std::vector<int> deadline_;              // [token], batch index
  std::vector<int> prev_, next_;           // same-sequence neighbours in the window, -1 if none
  std::vector<int> bit_begin_;             // [bit]: bit_tokens_[bit_begin_[bit], bit_begin_[bit + 1])
  std::vector<int> bit_tokens_;            // the tokens holding each (layer, expert) bit, in order
};

}  // namespace ef::scheduler
