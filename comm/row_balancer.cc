#include "comm/row_balancer.h"

#include <algorithm>

namespace ef::comm {

RowPlan RowBalancer::Plan(std::span<const int64_t> rows, std::span<const int> static_compute, int num_ranks,
                          int num_experts, double max_imbalance) {
  const int N = num_ranks, E = num_experts;
  RowPlan p;
  p.compute.assign(static_compute.begin(), static_compute.end());
  std::vector<int64_t> load(N, 0);
  for (size_t i = 0; i < p.compute.size(); ++i) {
    load[p.compute[i]] += rows[i];
    p.total_rows += rows[i];
  }
  auto busiest = [&] { return static_cast<int>(std::max_element(load.begin(), load.end()) - load.begin()); };
  p.static_max_rows = load[busiest()];
  // max / mean <= bound  <=>  max * N <= bound * total (compared in doubles of exact integers).
  const double limit = max_imbalance * static_cast<double>(p.total_rows);
  for (;;) {
    const int r = busiest();
    if (static_cast<double>(load[r]) * N <= limit) break;
    int64_t best_peak = load[r];
    int best = -1;
    for (int e = 0; e < E; ++e) {
      for (int s = 0; s < N; ++s) {
        const size_t i = static_cast<size_t>(s) * E + e;
        if (s == r || p.compute[i] != r || rows[i] == 0) continue;
        const int64_t peak = std::max(load[r] - rows[i], load[s] + rows[i]);
        if (peak < best_peak) best_peak = peak, best = static_cast<int>(i);
      }
    }
    if (best < 0) break;  // no move lowers the maximum
    const int s = best / E;
    load[r] -= rows[best];
    load[s] += rows[best];
    p.compute[best] = s;
    p.rows_moved += rows[best];
  }
  p.max_rows = load[busiest()];
  return p;
}

}  // namespace ef::comm
