// Planner: turns a batch's RoutingForecast, the GPU cache residency of every rank and the cluster
// topology into a BatchPlan (who computes which expert, what each rank prefetches).
//
// Per layer:
//   1. expected load of each expert = sum over tokens of its probability; an expert is needed when
//      some token's probability reaches `min_prob`.
//   2. each needed expert is computed on its home rank, or on a rank that already caches it when
//      the home rank does not (saves a fetch).
//   3. hot experts (load >= `hot_factor` x the layer's mean per needed expert), hottest first, get
//      copies on the least-loaded ranks with a free slot (`extra_replicas_per_rank` per rank and
//      layer), up to `hot_replicas_per_expert` copies each: with data-parallel attention a token
//      whose expert has a copy on its own rank sends nothing.
//   4. load balance (EPLB spirit: copies follow load, and replicas split the expert's load evenly):
//      a. an expert heavier than the bound (`max_imbalance` x the mean rank load), hottest first,
//         gets at once the fewest copies on the least-loaded ranks without it after which no rank
//         computing it exceeds the bound (or at least ceil(load / bound) copies);
//      b. then, while the busiest rank exceeds the bound, its expert with the largest load per copy
//         gets a copy on the least-loaded rank without one.
//      Both stop at `max_replicas_per_expert` copies. Ranks are kept in a tournament tree by load,
//      so each copy costs O(log ranks) per rank whose load it changes, not a scan of every rank.
// Ties go to the lower rank, and among (nearly) equally loaded ranks to one caching the expert.
// Prefetch list of a rank: every expert it computes that its cache lacks, lowest layer first, then
// the most expected tokens first.
//
// Plan() is const and thread-safe.
#pragma once

#include <cstdint>
#include <vector>

#include "placement/batch_plan.h"
#include "placement/routing_forecast.h"
#include "runtime/core/status.h"

namespace ef::placement {

struct Topology {
  int num_ranks = 1;
  // home_rank[layer * num_experts + expert]: the rank whose host memory holds it. Empty: experts of
  // each layer split into contiguous blocks, expert e on rank e * num_ranks / num_experts.
  std::vector<int> home_rank;

  int home(int layer, int expert, int num_experts) const {
    if (home_rank.empty()) return static_cast<int>(static_cast<int64_t>(expert) * num_ranks / num_experts);
    return home_rank[static_cast<size_t>(layer) * num_experts + expert];
  }
};

// resident[rank][layer * num_experts + expert] != 0 when that rank's GPU cache holds the expert.
// Empty (or an empty rank row): nothing resident.
struct CacheResidency {
  std::vector<std::vector<uint8_t>> resident;
  bool has(int rank, int layer, int expert, int num_experts) const {
    if (rank >= static_cast<int>(resident.size()) || resident[rank].empty()) return false;
    return resident[rank][static_cast<size_t>(layer) * num_experts + expert] != 0;
  }
};

struct PlannerOptions {
  float min_prob = 0.05f;           // an expert is needed when some token's probability reaches this
  double max_imbalance = 1.25;      // bound on max/mean expected load per rank and layer
  int max_replicas_per_expert = 0;  // copies of one expert, home included, in all steps; 0: num_ranks
  double hot_factor = 2.0;          // replicate experts this many times hotter than the mean
  int extra_replicas_per_rank = 1;  // hot-expert replica slots per rank and layer (0: none)
  // Copies step 3 gives one hot expert, home included (0: up to max_replicas_per_expert). A copy
  // made for locality saves sends only for the tokens on its own rank (about tokens / ranks of them,
  // 14 KB of hidden state each for DeepSeek-V3) but holds a whole expert in that rank's memory and,
  // unless cached, costs a fetch (44 MB for a DeepSeek-V3 expert in FP8). EPLB likewise spends a
  // small budget of redundant experts, by load. Uncapped, the hottest expert of each layer takes a
  // slot on every rank; with four copies, the DeepSeek-V3 shape's token traffic is at most 2% higher
  // at 8-64 ranks and 12% higher at 256 (docs/results/control_plane_scale.md). The copies the load bound needs (step 4)
  // are not limited by this: a hard cap of 4 on all copies leaves the busiest rank at 6.7x the mean on the DeepSeek-V3
  // shape at 256 ranks (its hottest expert carries ~214 of 2048 token-expert pairs).
  int hot_replicas_per_expert = 4;
};

class Planner {
 public:
  explicit Planner(PlannerOptions options = {}) : options_(options) {}
  StatusOr<BatchPlan> Plan(const RoutingForecast& forecast, const CacheResidency& cache,
                           const Topology& topology) const;
  const PlannerOptions& options() const { return options_; }

 private:
  PlannerOptions options_;
};

}  // namespace ef::placement
