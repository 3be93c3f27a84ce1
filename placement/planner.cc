#include "placement/planner.h"

#include <algorithm>
#include <numeric>
#include <string>

namespace ef::placement {

StatusOr<BatchPlan> Planner::Plan(const RoutingForecast& forecast, const CacheResidency& cache,
                                  const Topology& topology) const {
  const int L = forecast.num_layers, E = forecast.num_experts, R = topology.num_ranks;
  if (R < 1) return InvalidArgument("topology needs at least one rank, got " + std::to_string(R));
  if (L < 1 || E < 1) return InvalidArgument("forecast has no layers or experts");
  if (forecast.prob.size() != static_cast<size_t>(forecast.num_tokens) * L * E)
    return InvalidArgument("forecast probabilities do not match its shape");
  if (!topology.home_rank.empty()) {
    if (topology.home_rank.size() != static_cast<size_t>(L) * E)
      return InvalidArgument("topology lists " + std::to_string(topology.home_rank.size()) + " home ranks for " +
                             std::to_string(L * E) + " experts");
    for (int h : topology.home_rank)
      if (h < 0 || h >= R) return InvalidArgument("home rank " + std::to_string(h) + " out of range");
  }
  if (options_.max_imbalance < 1.0) return InvalidArgument("max_imbalance must be >= 1");
  const int max_copies = options_.max_replicas_per_expert > 0 ? std::min(options_.max_replicas_per_expert, R) : R;

  BatchPlan plan;
  plan.num_layers = L;
  plan.num_experts = E;
  plan.num_ranks = R;
  plan.num_tokens = forecast.num_tokens;
  plan.compute_ranks.assign(static_cast<size_t>(L) * E, {});
  plan.expected_tokens.assign(static_cast<size_t>(L) * E, 0.f);
  plan.rank_load.assign(static_cast<size_t>(L) * R, 0.f);
  plan.prefetch.assign(R, {});

  std::vector<float> max_prob(E);
  std::vector<double> load(R);
  for (int l = 0; l < L; ++l) {
    float* expected = plan.expected_tokens.data() + static_cast<size_t>(l) * E;
    std::fill(max_prob.begin(), max_prob.end(), 0.f);
    for (int t = 0; t < forecast.num_tokens; ++t) {
      const float* p = forecast.row(t, l);
      for (int e = 0; e < E; ++e) {
        expected[e] += p[e];
        max_prob[e] = std::max(max_prob[e], p[e]);
      }
    }
    auto ranks_of = [&](int e) -> std::vector<int>& { return plan.compute_ranks[static_cast<size_t>(l) * E + e]; };
    std::fill(load.begin(), load.end(), 0.0);
    // on[e * R + r]: rank r computes expert e (membership in O(1); ranks_of(e) keeps the order).
    std::vector<uint8_t> on(static_cast<size_t>(E) * R, 0);
    auto is_on = [&](int e, int r) { return on[static_cast<size_t>(e) * R + r] != 0; };
    std::vector<int> needed;
    for (int e = 0; e < E; ++e) {
      if (max_prob[e] < options_.min_prob || max_prob[e] <= 0.f) continue;
      needed.push_back(e);
      int r = topology.home(l, e, E);
      if (!cache.has(r, l, e, E)) {
        for (int c = 0; c < R; ++c)
          if (cache.has(c, l, e, E)) {
            r = c;
            break;
          }
      }
      ranks_of(e).push_back(r);
      on[static_cast<size_t>(e) * R + r] = 1;
      load[r] += expected[e];
    }
    if (needed.empty()) continue;
    auto per_copy = [&](int e) { return expected[e] / ranks_of(e).size(); };
    // Least-loaded rank lacking e, preferring one whose cache already holds it; -1 if none.
    auto pick_target = [&](int e) {
      int best = -1;
      for (int r = 0; r < R; ++r) {
        if (is_on(e, r)) continue;
        if (best < 0 || load[r] < load[best] - 1e-9 ||
            (load[r] <= load[best] + 1e-9 && cache.has(r, l, e, E) && !cache.has(best, l, e, E)))
          best = r;
      }
      return best;
    };
    auto add_replica = [&](int e, int target) {
      const double old_share = per_copy(e);
      for (int r : ranks_of(e)) load[r] -= old_share;
      ranks_of(e).push_back(target);
      on[static_cast<size_t>(e) * R + target] = 1;
      const double share = per_copy(e);
      for (int r : ranks_of(e)) load[r] += share;
      ++plan.num_replicas;
    };

    const double total = std::accumulate(load.begin(), load.end(), 0.0);
    const double mean = total / R;
    // Hot experts: extra replicas where slots remain, hottest first.
    if (options_.extra_replicas_per_rank > 0 && R > 1) {
      std::vector<int> slots(R, options_.extra_replicas_per_rank);
      const double mean_expert = total / needed.size();
      std::vector<int> hot = needed;
      std::sort(hot.begin(), hot.end(), [&](int a, int b) { return expected[a] > expected[b]; });
      for (int e : hot) {
        if (expected[e] < options_.hot_factor * mean_expert) break;
        while (static_cast<int>(ranks_of(e).size()) < max_copies) {
          int target = -1;
          for (int r = 0; r < R; ++r) {
            if (slots[r] <= 0 || is_on(e, r)) continue;
            if (target < 0 || load[r] < load[target]) target = r;
          }
          if (target < 0) break;
          --slots[target];
          add_replica(e, target);
        }
      }
    }
    // Balance.
    for (int guard = 0; guard < E * R; ++guard) {
      const int busiest = static_cast<int>(std::max_element(load.begin(), load.end()) - load.begin());
      if (load[busiest] <= options_.max_imbalance * mean + 1e-9) break;
      int best_e = -1;
      for (int e : needed) {
        if (!is_on(e, busiest) || static_cast<int>(ranks_of(e).size()) >= max_copies) continue;
        if (best_e < 0 || per_copy(e) > per_copy(best_e)) best_e = e;
      }
      if (best_e < 0) break;
      const int target = pick_target(best_e);
      if (target < 0) break;
      add_replica(best_e, target);
    }

    for (int r = 0; r < R; ++r) plan.rank_load[static_cast<size_t>(l) * R + r] = static_cast<float>(load[r]);
    for (int e : needed)
      for (int r : ranks_of(e))
        if (!cache.has(r, l, e, E)) plan.prefetch[r].push_back({l, e, expected[e]});
  }
  for (auto& list : plan.prefetch)
    std::stable_sort(list.begin(), list.end(), [](const PrefetchEntry& a, const PrefetchEntry& b) {
      return a.layer != b.layer ? a.layer < b.layer : a.expected_tokens > b.expected_tokens;
    });
  return plan;
}

}  // namespace ef::placement
