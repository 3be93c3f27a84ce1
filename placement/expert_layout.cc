#include "placement/expert_layout.h"

#include <algorithm>
#include <bit>
#include <map>
#include <tuple>

namespace ef::placement {
namespace {

ExpertLayout Make(int num_layers, int num_experts, int num_ranks, bool contiguous) {
  ExpertLayout l;
  l.num_layers = num_layers;
  l.num_experts = num_experts;
  l.num_ranks = num_ranks;
  l.ranks.resize(static_cast<size_t>(num_layers) * num_experts);
  for (int m = 0; m < num_layers; ++m)
    for (int e = 0; e < num_experts; ++e)
      l.ranks[static_cast<size_t>(m) * num_experts + e] = {
          contiguous ? static_cast<int>(static_cast<int64_t>(e) * num_ranks / num_experts) : e % num_ranks};
  return l;
}

// Number of ranks a token reaches at `layer`: `start` (a rank, or -1) plus, for each expert, its
// only rank, or for a replicated expert none when a copy is on a rank already reached, else the
// rank covering the most of the still-uncovered replicated experts (greedy set cover).
int RanksReached(const ExpertLayout& layout, const RoutingTrace& trace, size_t token, int layer, int start) {
  uint64_t reached = start >= 0 ? uint64_t{1} << start : 0;
  std::vector<const std::vector<int>*> replicated;
  for (int j = 0; j < trace.top_k(); ++j) {
    const std::vector<int>& r = layout.RanksOf(layer, trace.expert(token, layer, j));
    if (r.size() == 1)
      reached |= uint64_t{1} << r[0];
    else
      replicated.push_back(&r);
  }
  for (;;) {
    std::vector<int> votes(layout.num_ranks, 0);
    bool open = false;
    for (const auto* r : replicated) {
      bool covered = false;
      for (int x : *r) covered |= (reached >> x & 1) != 0;
      if (covered) continue;
      open = true;
      for (int x : *r) ++votes[x];
    }
    if (!open) break;
    reached |= uint64_t{1} << (std::max_element(votes.begin(), votes.end()) - votes.begin());
  }
  return std::popcount(reached);
}

}  // namespace

ExpertLayout ExpertLayout::Contiguous(int num_layers, int num_experts, int num_ranks) {
  return Make(num_layers, num_experts, num_ranks, true);
}

ExpertLayout ExpertLayout::RoundRobin(int num_layers, int num_experts, int num_ranks) {
  return Make(num_layers, num_experts, num_ranks, false);
}

int ExpertLayout::CopiesOn(int layer, int rank) const {
  int n = 0;
  for (int e = 0; e < num_experts; ++e)
    for (int r : RanksOf(layer, e)) n += r == rank;
  return n;
}

nlohmann::json ExpertLayout::ToJson() const {
  nlohmann::json home = nlohmann::json::array(), replicas = nlohmann::json::array();
  for (int m = 0; m < num_layers; ++m) {
    nlohmann::json row = nlohmann::json::array();
    for (int e = 0; e < num_experts; ++e) {
      const std::vector<int>& r = RanksOf(m, e);
      row.push_back(r[0]);
      if (r.size() > 1)
        replicas.push_back({{"layer", m}, {"expert", e}, {"ranks", std::vector<int>(r.begin() + 1, r.end())}});
    }
    home.push_back(std::move(row));
  }
  nlohmann::json j = {{"num_ranks", num_ranks}, {"layers", "moe"}, {"home", home}};
  if (!replicas.empty()) j["replicas"] = replicas;
  return j;
}

double RemoteRanksPerTokenLayer(const RoutingTrace& trace, const ExpertLayout& layout) {
  int64_t remote = 0, n = 0;
  for (size_t t = 0; t < trace.tokens.size(); ++t)
    for (int m = 0; m < trace.num_layers(); ++m, ++n) remote += RanksReached(layout, trace, t, m, -1) - 1;
  return n ? static_cast<double>(remote) / static_cast<double>(n) : 0;
}

double PinnedRemoteRanks(const RoutingTrace& trace, const ExpertLayout& layout) {
  const int R = layout.num_ranks;
  std::map<int64_t, std::vector<int64_t>> affinity;  // seq -> activations held per rank
  for (size_t t = 0; t < trace.tokens.size(); ++t) {
    auto& a = affinity.try_emplace(trace.tokens[t].seq, std::vector<int64_t>(R, 0)).first->second;
    for (int m = 0; m < trace.num_layers(); ++m)
      for (int j = 0; j < trace.top_k(); ++j)
        for (int r : layout.RanksOf(m, trace.expert(t, m, j))) ++a[r];
  }
  // Greedy: the strongest (sequence, rank) affinities first, a rank full at ceil(S / R).
  std::vector<std::tuple<int64_t, int64_t, int>> pairs;  // (-affinity, seq, rank)
  for (const auto& [s, a] : affinity)
    for (int r = 0; r < R; ++r) pairs.emplace_back(-a[r], s, r);
  std::sort(pairs.begin(), pairs.end());
  const int cap = static_cast<int>((affinity.size() + R - 1) / R);
  std::map<int64_t, int> home;
  std::vector<int> used(R, 0);
  for (const auto& [neg, s, r] : pairs) {
    if (home.count(s) || used[r] >= cap) continue;
    home[s] = r;
    ++used[r];
  }
  int64_t remote = 0, n = 0;
  for (size_t t = 0; t < trace.tokens.size(); ++t)
    for (int m = 0; m < trace.num_layers(); ++m, ++n)
      remote += RanksReached(layout, trace, t, m, home[trace.tokens[t].seq]) - 1;
  return n ? static_cast<double>(remote) / static_cast<double>(n) : 0;
}

}  // namespace ef::placement
