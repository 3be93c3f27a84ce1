// Planner: turns a batch's RoutingForecast, the GPU cache residency of every rank and the cluster
// topology into a BatchPlan (who computes which expert, what each rank prefetches).
//
// Per layer:
//   1. expected load of each expert = sum over tokens of its probability; an expert is needed when
//      some token's probability reaches `min_prob`.
//   2. each needed expert is computed on its home rank, or on a rank that already caches it when
//      the home rank does not (saves a fetch).
//   3. load balance (EPLB spirit): while the busiest rank exceeds `max_imbalance` x the mean, the
//      busiest rank's hottest expert is replicated on the least-loaded rank without it (replicas
//      split the expert's load evenly), up to `max_replicas_per_expert` copies.
//   4. hot experts (load >= `hot_factor` x the layer's mean per needed expert) get extra replicas on
//      the least-loaded ranks, `extra_replicas_per_rank` per rank and layer at most: with
//      data-parallel attention a token whose expert has a copy on its own rank sends nothing.
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
  int max_replicas_per_expert = 0;  // 0: up to num_ranks copies
  double hot_factor = 2.0;          // replicate experts this many times hotter than the mean
  int extra_replicas_per_rank = 1;  // hot-expert replica slots per rank and layer (0: none)
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
