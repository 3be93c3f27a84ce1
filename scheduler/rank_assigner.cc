#include "scheduler/rank_assigner.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__POPCNT__)
#pragma GCC target("popcnt")
#endif

namespace ef::scheduler {

namespace {

// Calls fn(compute_rank) for each expert of `token` at `layer` under the replica rule in the header.
template <typename Fn>
void ForEachComputeRank(const ExpertPathSet& paths, int token, int layer, int rank, const placement::BatchPlan& plan,
                        uint64_t& targets, Fn fn) {
  const int E = paths.num_experts();
  const uint64_t* row = paths.row(token);
  const int begin = layer * E, end = begin + E;
  for (int w = begin / 64; w <= (end - 1) / 64; ++w) {
    uint64_t x = row[w];
    if (w == begin / 64 && begin % 64) x &= ~uint64_t{0} << (begin % 64);
    if (w == (end - 1) / 64 && end % 64) x &= ~uint64_t{0} >> (64 - end % 64);
    for (; x; x &= x - 1) {
      const int e = w * 64 + std::countr_zero(x) - begin;
      const auto& rs = plan.ranks(layer, e);
      int dest;
      if (rs.empty()) {
        dest = static_cast<int>(static_cast<int64_t>(e) * plan.num_ranks / plan.num_experts);  // unplanned: home block
      } else if (std::find(rs.begin(), rs.end(), rank) != rs.end()) {
        dest = rank;
      } else {
        dest = rs.front();
        for (int r : rs)
          if (r < 64 && (targets >> r & 1)) {
            dest = r;
            break;
          }
      }
      if (dest < 64) targets |= uint64_t{1} << dest;
      fn(dest);
    }
  }
}

}  // namespace

int RankAssigner::TokenSends(const ExpertPathSet& paths, int token, int rank, const placement::BatchPlan& plan) {
  int sends = 0;
  std::vector<int> seen;  // ranks >= 64 only
  for (int l = 0; l < paths.num_layers(); ++l) {
    uint64_t targets = 0, counted = 0;
    seen.clear();
    ForEachComputeRank(paths, token, l, rank, plan, targets, [&](int dest) {
      if (dest == rank) return;
      if (dest < 64) {
        if (!(counted >> dest & 1)) ++sends;
        counted |= uint64_t{1} << dest;
      } else if (std::find(seen.begin(), seen.end(), dest) == seen.end()) {
        seen.push_back(dest);
        ++sends;
      }
    });
  }
  return sends;
}

void RankAssigner::AddExpertLoad(const ExpertPathSet& paths, int token, int rank, const placement::BatchPlan& plan,
                                 std::vector<long>& load_per_rank) {
  for (int l = 0; l < paths.num_layers(); ++l) {
    uint64_t targets = 0;
    ForEachComputeRank(paths, token, l, rank, plan, targets, [&](int dest) { ++load_per_rank[dest]; });
  }
}

std::vector<int> RankAssigner::RoundRobin(int num_tokens, int num_ranks) {
  std::vector<int> out(num_tokens);
  for (int i = 0; i < num_tokens; ++i) out[i] = i % num_ranks;
  return out;
}

StatusOr<std::vector<int>> RankAssigner::Assign(const ExpertPathSet& paths, const placement::BatchPlan& plan,
                                                std::span<const std::vector<int>> units) const {
  const int R = plan.num_ranks, n = paths.num_tokens();
  if (R < 1) return InvalidArgument("plan has no ranks");
  if (plan.num_layers != paths.num_layers() || plan.num_experts != paths.num_experts())
    return InvalidArgument("plan shape (" + std::to_string(plan.num_layers) + " layers x " +
                           std::to_string(plan.num_experts) + " experts) does not match the paths");
  if (options_.max_imbalance < 1.0) return InvalidArgument("max_imbalance must be >= 1");
  std::vector<std::vector<int>> own;
  if (units.empty()) {
    own.resize(n);
    for (int i = 0; i < n; ++i) own[i] = {i};
    units = own;
  }
  std::vector<int> rank_of(n, -1);
  const int U = static_cast<int>(units.size());
  std::vector<long> cost(static_cast<size_t>(U) * R, 0);
  std::vector<int> size(U, 0);
  int covered = 0;
  for (int u = 0; u < U; ++u) {
    for (int t : units[u]) {
      if (t < 0 || t >= n || rank_of[t] != -1)
        return InvalidArgument("unit " + std::to_string(u) + " lists token " + std::to_string(t) +
                               " out of range or twice");
      rank_of[t] = -2;
      ++covered;
    }
    size[u] = static_cast<int>(units[u].size());
    if (R > 1)
      for (int r = 0; r < R; ++r)
        for (int t : units[u]) cost[static_cast<size_t>(u) * R + r] += TokenSends(paths, t, r, plan);
  }
  if (covered != n)
    return InvalidArgument("units cover " + std::to_string(covered) + " of " + std::to_string(n) + " tokens");

  const int largest = U > 0 ? *std::max_element(size.begin(), size.end()) : 0;
  const long cap = std::max<long>(static_cast<long>(std::ceil(options_.max_imbalance * n / R - 1e-9)), largest);
  std::vector<long> regret(U, 0);
  for (int u = 0; u < U; ++u) {
    long b1 = 1L << 60, b2 = 1L << 60;
    for (int r = 0; r < R; ++r) {
      const long c = cost[static_cast<size_t>(u) * R + r];
      if (c < b1) {
        b2 = b1;
        b1 = c;
      } else if (c < b2) {
        b2 = c;
      }
    }
    regret[u] = R > 1 ? b2 - b1 : 0;
  }
  std::vector<int> order(U);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return regret[a] != regret[b] ? regret[a] > regret[b] : size[a] > size[b]; });
  std::vector<long> tokens_on(R, 0);
  for (int u : order) {
    int best = -1;
    for (int r = 0; r < R; ++r) {
      if (tokens_on[r] + size[u] > cap) continue;
      const long c = cost[static_cast<size_t>(u) * R + r];
      if (best < 0 || c < cost[static_cast<size_t>(u) * R + best] ||
          (c == cost[static_cast<size_t>(u) * R + best] && tokens_on[r] < tokens_on[best]))
        best = r;
    }
    if (best < 0) best = static_cast<int>(std::min_element(tokens_on.begin(), tokens_on.end()) - tokens_on.begin());
    tokens_on[best] += size[u];
    for (int t : units[u]) rank_of[t] = best;
  }
  return rank_of;
}

}  // namespace ef::scheduler
