// BatchPlan: the placement decisions for one batch, made by Planner from a RoutingForecast.
//
// For each MoE layer and expert: the ranks that compute it (empty when no token is expected to
// use it; several when a hot expert is replicated), the expected number of tokens it gets, and
// for each rank the experts it must have in GPU memory but does not, in the order to fetch them
// (lowest layer first, then most probable first). Plain data: copyable, no invariants beyond the
// sizes stated per field.
#pragma once

#include <algorithm>
#include <vector>

namespace ef::placement {

struct PrefetchEntry {
  int layer = 0;
  int expert = 0;
  float expected_tokens = 0.f;  // forecast load of the expert in this batch (priority within a layer)
};

struct BatchPlan {
  int num_layers = 0;
  int num_experts = 0;
  int num_ranks = 0;
  int num_tokens = 0;
  // compute_ranks[layer * num_experts + expert]: ranks computing the expert, the home (or first
  // chosen) rank first. Empty: not expected to be needed.
  std::vector<std::vector<int>> compute_ranks;
  // expected_tokens[layer * num_experts + expert]: sum over tokens of the forecast probability.
  std::vector<float> expected_tokens;
  // rank_load[layer * num_ranks + rank]: expected token-expert pairs computed there (replicas
  // share their expert's load evenly).
  std::vector<float> rank_load;
  // prefetch[rank]: experts to bring into that rank's GPU cache, in priority order.
  std::vector<std::vector<PrefetchEntry>> prefetch;
  int num_replicas = 0;  // extra copies beyond one per needed expert, summed over layers

  const std::vector<int>& ranks(int layer, int expert) const {
    return compute_ranks[static_cast<size_t>(layer) * num_experts + expert];
  }
  // max over layers of (max rank load / mean rank load); 1 when a layer has no load.
  double MaxLoadImbalance() const {
    double worst = 1.0;
    for (int l = 0; l < num_layers; ++l) {
      double sum = 0, mx = 0;
      for (int r = 0; r < num_ranks; ++r) {
        const double v = rank_load[static_cast<size_t>(l) * num_ranks + r];
        sum += v;
        mx = std::max(mx, v);
      }
      if (sum > 0) worst = std::max(worst, mx / (sum / num_ranks));
    }
    return worst;
  }
};

}  // namespace ef::placement
