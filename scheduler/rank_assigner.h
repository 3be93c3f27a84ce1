// RankAssigner: data-parallel attention places each request (its tokens) on one rank; the MoE
// layers then send a token's hidden state to every other rank computing one of its experts. This
// assigns units (a request's tokens of the batch, or single tokens) to ranks so that few bytes
// cross the network, with at most `max_imbalance` x the mean tokens on any rank.
//
// Traffic model (also used by schedule-eval): at each layer a token on rank r sends its hidden
// state once to each distinct rank other than r that computes one of its experts, and gets it back
// once (dispatch + combine). For an expert with several replicas the token uses the copy on its own
// rank if any, otherwise one already receiving the token at that layer, otherwise the first listed.
//
// Algorithm: cost[unit][rank] from the model above; units in decreasing order of regret (second
// cheapest rank minus cheapest) go to their cheapest rank with room, ties to the least-loaded rank,
// then to the lowest rank. The cost is kept sparse: at one layer a token's sends are the same on
// every rank that computes none of its experts there, so cost[unit][rank] = baseline[unit] +
// delta[unit][rank], with delta nonzero only on ranks computing one of the unit's experts. Building
// it walks each token's experts and their compute ranks once, not once per rank (where a replica
// choice depends on the ranks already receiving the token, all ranks are run at once, one bit per
// rank); the decisions are those of the dense cost matrix (tests/scheduler/rank_assigner_test.cc
// checks it against one).
// Assign() is const and thread-safe. A plan naming a rank outside [0, num_ranks) is refused.
#pragma once

#include <span>
#include <vector>

#include "placement/batch_plan.h"
#include "runtime/core/status.h"
#include "scheduler/expert_path_set.h"

namespace ef::scheduler {

struct RankAssignerOptions {
  double max_imbalance = 1.25;  // max tokens per rank <= ceil(max_imbalance * tokens / ranks)
};

class RankAssigner {
 public:
  explicit RankAssigner(RankAssignerOptions options = {}) : options_(options) {}

  // units: each a list of token rows of `paths` (empty span: one unit per token). Returns the rank
  // of every token row.
  StatusOr<std::vector<int>> Assign(const ExpertPathSet& paths, const placement::BatchPlan& plan,
                                    std::span<const std::vector<int>> units = {}) const;

  // The cost Assign minimises, dense: remote sends (dispatch only) of unit u's tokens on rank r at
  // [u * num_ranks + r] (all 0 on one rank); units as in Assign. For tests and tools; Assign never
  // builds it.
  static StatusOr<std::vector<long>> UnitCosts(const ExpertPathSet& paths, const placement::BatchPlan& plan,
                                               std::span<const std::vector<int>> units = {});

  // Round-robin by token row (the FCFS baseline).
  static std::vector<int> RoundRobin(int num_tokens, int num_ranks);

  // Remote sends of one token on `rank` summed over layers (dispatch only; x2 for combine).
  static int TokenSends(const ExpertPathSet& paths, int token, int rank, const placement::BatchPlan& plan);
  // Token-expert pairs computed on each rank, under the same replica choice as TokenSends.
  static void AddExpertLoad(const ExpertPathSet& paths, int token, int rank, const placement::BatchPlan& plan,
                            std::vector<long>& load_per_rank);

 private:
  RankAssignerOptions options_;
};

}  // namespace ef::scheduler
