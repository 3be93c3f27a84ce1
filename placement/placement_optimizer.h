// PlacementOptimizer: an offline expert placement, fitted on a routing trace, that cuts the
// all-to-all traffic of expert parallelism (`expertflow place`).
//
// Objective: RemoteRanksPerTokenLayer (placement/expert_layout.h), i.e. per MoE layer a balanced
// partition of the experts into R groups of E/R (floor/ceil when R does not divide E) minimising,
// over the training tokens, the number of groups each token's top-k experts touch (hypergraph
// partitioning, connectivity - 1). Experts that are often chosen together by the same token
// (co-activation) end up on the same rank.
//
// Algorithm, per layer independently (the objective is separable by layer):
//   1. starts: contiguous, round robin and random balanced partitions (`restarts` in all);
//   2. from each, a swap local search (Kernighan-Lin style pairwise swaps, which keep the
//      balance exactly): the exact change of the objective of every swap is computed from per
//      (token, group) counts, the best improving swap is applied, until none improves;
//   3. iterated local search: `perturbations` times, a few random swaps then step 2 again, kept
//      when no worse; the best partition over all starts wins.
// Then consecutive-layer affinity (ExFlow, arXiv 2401.08383): which group becomes which rank does
// not change the per-layer objective, so each layer's groups are numbered (permutation of ranks)
// to maximise the training tokens whose experts at layer l and l + 1 sit on the same ranks. This
// is free under the per-layer cost and lowers PinnedRemoteRanks: a sequence whose experts follow
// one rank through the layers can live there (data-parallel attention with locality assignment).
// Replication (replicate = N): per layer the N most activated experts get a second copy, each on the
// rank (with room under a balance of ceil((E + N) / R) copies) that lowers the training cost most.
//
// Deterministic for a given seed. Thread-compatible.
#pragma once

#include <cstdint>
#include <vector>

#include "placement/expert_layout.h"
#include "placement/routing_trace.h"
#include "runtime/core/status.h"

namespace ef::placement {

struct PlacementOptimizerOptions {
  int num_ranks = 4;         // 1..64
  int replicate = 0;         // per MoE layer, the N hottest experts get one extra copy; 0..num_experts
  int restarts = 6;          // starts per layer (contiguous, round robin, then random)
  int perturbations = 60;    // iterated-local-search kicks per start
  int kick_swaps = 3;        // random swaps per kick
  bool align_layers = true;  // number groups for consecutive-layer affinity
  uint64_t seed = 1;
};

class PlacementOptimizer {
 public:
  explicit PlacementOptimizer(const PlacementOptimizerOptions& options) : options_(options) {}

  // A balanced layout for the trace's shape (MoE layers x experts) fitted on all its tokens.
  StatusOr<ExpertLayout> Fit(const RoutingTrace& train) const;

 private:
  // Group of every expert of one layer (tokens: top_k experts each, flattened); `layer` seeds it.
  std::vector<int> PartitionLayer(const std::vector<int32_t>& tokens, int top_k, int num_experts, int layer) const;
  // Renumbers the groups of layers 1.. so consecutive layers share ranks (see the file comment).
  void AlignLayers(const RoutingTrace& train, ExpertLayout* layout) const;
  void Replicate(const RoutingTrace& train, ExpertLayout* layout) const;

  PlacementOptimizerOptions options_;
};

}  // namespace ef::placement
