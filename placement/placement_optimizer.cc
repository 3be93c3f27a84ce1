#include "placement/placement_optimizer.h"

#include <algorithm>
#include <numeric>
#include <random>

namespace ef::placement {
namespace {

// Swap local search on one layer's tokens. cnt_[t * R + g] is how many of token t's experts are in
// group g; the objective is the number of (token, group) pairs with cnt > 0.
class LayerSearch {
 public:
  LayerSearch(const std::vector<int32_t>& tokens, int k, int num_experts, int num_groups)
      : tokens_(tokens), k_(k), E_(num_experts), R_(num_groups), num_tokens_(tokens.size() / k) {
    of_expert_.resize(E_);
    for (size_t t = 0; t < num_tokens_; ++t)
      for (int j = 0; j < k_; ++j) of_expert_[tokens_[t * k_ + j]].push_back(static_cast<int32_t>(t));
  }

  void Set(const std::vector<int>& part) {
    part_ = part;
    cnt_.assign(num_tokens_ * R_, 0);
    for (size_t t = 0; t < num_tokens_; ++t)
      for (int j = 0; j < k_; ++j) ++cnt_[t * R_ + part_[tokens_[t * k_ + j]]];
  }
  const std::vector<int>& part() const { return part_; }

  int64_t Cost() const {
    int64_t c = 0;
    for (int32_t v : cnt_) c += v > 0;
    return c;
  }

  // Applies the best improving swap until none improves.
  void Converge() {
    std::vector<int64_t> move(static_cast<size_t>(E_) * R_), corr(static_cast<size_t>(E_) * E_);
    for (;;) {
      // move[a * R + g]: objective decrease if a alone moved to group g.
      std::fill(move.begin(), move.end(), 0);
      std::fill(corr.begin(), corr.end(), 0);
      for (size_t t = 0; t < num_tokens_; ++t) {
        const int32_t* c = &cnt_[t * R_];
        for (int j = 0; j < k_; ++j) {
          const int a = tokens_[t * k_ + j], A = part_[a];
          const int64_t leave = c[A] == 1;
          for (int g = 0; g < R_; ++g)
            if (g != A) move[static_cast<size_t>(a) * R_ + g] += leave - (c[g] == 0);
          // A token holding both a and b: swapping them leaves its counts unchanged, so remove what
          // the two single moves counted for it (their "enter" terms were 0: both groups were hit).
          for (int i = j + 1; i < k_; ++i) {
            const int b = tokens_[t * k_ + i], B = part_[b];
            if (A == B) continue;
            const int64_t x = leave + (c[B] == 1);
            corr[static_cast<size_t>(a) * E_ + b] += x;
            corr[static_cast<size_t>(b) * E_ + a] += x;
          }
        }
      }
      int64_t best = 0;
      int ba = -1, bb = -1;
      for (int a = 0; a < E_; ++a)
        for (int b = a + 1; b < E_; ++b) {
          if (part_[a] == part_[b]) continue;
          const int64_t gain = move[static_cast<size_t>(a) * R_ + part_[b]] +
                               move[static_cast<size_t>(b) * R_ + part_[a]] - corr[static_cast<size_t>(a) * E_ + b];
          if (gain > best) best = gain, ba = a, bb = b;
        }
      if (ba < 0) return;
      Swap(ba, bb);
    }
  }

  void Swap(int a, int b) {
    const int A = part_[a], B = part_[b];
    for (int32_t t : of_expert_[a]) --cnt_[t * R_ + A], ++cnt_[t * R_ + B];
    for (int32_t t : of_expert_[b]) --cnt_[t * R_ + B], ++cnt_[t * R_ + A];
    std::swap(part_[a], part_[b]);
  }

  void Kick(std::mt19937_64& rng, int swaps) {
    std::uniform_int_distribution<int> pick(0, E_ - 1);
    for (int s = 0; s < swaps; ++s) {
      const int a = pick(rng), b = pick(rng);
      if (part_[a] != part_[b]) Swap(a, b);
    }
  }

 private:
  const std::vector<int32_t>& tokens_;
  const int k_, E_, R_;
  const size_t num_tokens_;
  std::vector<std::vector<int32_t>> of_expert_;  // tokens that chose each expert
  std::vector<int> part_;
  std::vector<int32_t> cnt_;
};

// Balanced group sizes: floor / ceil of E / R, the larger groups first (as contiguous does).
std::vector<int> Contiguous(int E, int R) {
  std::vector<int> p(E);
  for (int e = 0; e < E; ++e) p[e] = static_cast<int>(static_cast<int64_t>(e) * R / E);
  return p;
}

// One layer's tokens: top_k experts each, flattened.
std::vector<int32_t> LayerTokens(const RoutingTrace& trace, int layer) {
  const int k = trace.top_k();
  std::vector<int32_t> out(trace.tokens.size() * k);
  for (size_t t = 0; t < trace.tokens.size(); ++t)
    for (int j = 0; j < k; ++j) out[t * k + j] = trace.expert(t, layer, j);
  return out;
}

}  // namespace

std::vector<int> PlacementOptimizer::PartitionLayer(const std::vector<int32_t>& tokens, int top_k, int num_experts,
                                                    int layer) const {
  const int E = num_experts, R = options_.num_ranks;
  LayerSearch search(tokens, top_k, E, R);
  std::mt19937_64 rng(options_.seed * 1000003 + layer);
  std::vector<int> best;
  int64_t best_cost = -1;
  for (int s = 0; s < std::max(1, options_.restarts); ++s) {
    std::vector<int> start = Contiguous(E, R);
    if (s == 1) {
      for (int e = 0; e < E; ++e) start[e] = e % R;
    } else if (s > 1) {
      std::shuffle(start.begin(), start.end(), rng);
    }
    search.Set(start);
    search.Converge();
    std::vector<int> cur = search.part();
    int64_t cur_cost = search.Cost();
    for (int p = 0; p < options_.perturbations; ++p) {
      search.Kick(rng, options_.kick_swaps);
      search.Converge();
      const int64_t c = search.Cost();
      if (c <= cur_cost) {  // sideways moves too: plateaus are wide
        cur_cost = c;
        cur = search.part();
      } else {
        search.Set(cur);
      }
    }
    if (best_cost < 0 || cur_cost < best_cost) best_cost = cur_cost, best = cur;
  }
  return best;
}

StatusOr<ExpertLayout> PlacementOptimizer::Fit(const RoutingTrace& train) const {
  const int L = train.num_layers(), E = train.num_experts(), K = train.top_k(), R = options_.num_ranks;
  if (R < 1 || R > 64) return InvalidArgument("--ranks must be in [1, 64], got " + std::to_string(R));
  if (R > E)
    return InvalidArgument("--ranks " + std::to_string(R) + " exceeds the trace's " + std::to_string(E) +
                           " experts per layer (every rank must hold at least one)");
  if (options_.replicate < 0 || options_.replicate > E)
    return InvalidArgument("--replicate must be in [0, " + std::to_string(E) + "], got " +
                           std::to_string(options_.replicate));
  if (train.tokens.empty()) return InvalidArgument("no training tokens to fit a placement on");
  ExpertLayout layout = ExpertLayout::Contiguous(L, E, R);
  for (int m = 0; m < L; ++m) {
    const std::vector<int> part = PartitionLayer(LayerTokens(train, m), K, E, m);
    for (int e = 0; e < E; ++e) layout.ranks[static_cast<size_t>(m) * E + e] = {part[e]};
  }
  if (options_.align_layers) AlignLayers(train, &layout);
  if (options_.replicate > 0) Replicate(train, &layout);
  return layout;
}

void PlacementOptimizer::AlignLayers(const RoutingTrace& train, ExpertLayout* layout) const {
  const int L = layout->num_layers, E = layout->num_experts, R = layout->num_ranks, K = train.top_k();
  for (int m = 1; m < L; ++m) {
    // shared[p * R + q]: pairs (an expert at layer m - 1 on rank p, one at layer m in group q) of
    // the same token: renumbering group q as rank p keeps those transfers on one rank.
    std::vector<int64_t> shared(static_cast<size_t>(R) * R, 0);
    for (size_t t = 0; t < train.tokens.size(); ++t)
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j)
          ++shared[static_cast<size_t>(layout->Home(m - 1, train.expert(t, m - 1, i))) * R +
                   layout->Home(m, train.expert(t, m, j))];
    std::vector<int> to_rank(R);  // group q -> rank
    std::iota(to_rank.begin(), to_rank.end(), 0);
    if (R <= 8) {
      std::vector<int> perm = to_rank;
      int64_t best = -1;
      do {
        int64_t s = 0;
        for (int q = 0; q < R; ++q) s += shared[static_cast<size_t>(perm[q]) * R + q];
        if (s > best) best = s, to_rank = perm;
      } while (std::next_permutation(perm.begin(), perm.end()));
    } else {
      // Greedy: the largest remaining (rank, group) overlap first.
      std::vector<bool> rank_used(R), group_used(R);
      for (int n = 0; n < R; ++n) {
        int64_t best = -1;
        int bp = 0, bq = 0;
        for (int p = 0; p < R; ++p)
          for (int q = 0; q < R; ++q)
            if (!rank_used[p] && !group_used[q] && shared[static_cast<size_t>(p) * R + q] > best)
              best = shared[static_cast<size_t>(p) * R + q], bp = p, bq = q;
        rank_used[bp] = group_used[bq] = true;
        to_rank[bq] = bp;
      }
    }
    for (int e = 0; e < E; ++e) {
      auto& r = layout->ranks[static_cast<size_t>(m) * E + e];
      r[0] = to_rank[r[0]];
    }
  }
}

void PlacementOptimizer::Replicate(const RoutingTrace& train, ExpertLayout* layout) const {
  const int L = layout->num_layers, E = layout->num_experts, R = layout->num_ranks, K = train.top_k();
  // Copies per rank per layer stay within [floor, cap] of (E + N) / R.
  const int cap = (E + options_.replicate + R - 1) / R, floor = (E + options_.replicate) / R;
  for (int m = 0; m < L; ++m) {
    std::vector<int64_t> hits(E, 0);
    for (size_t t = 0; t < train.tokens.size(); ++t)
      for (int j = 0; j < K; ++j) ++hits[train.expert(t, m, j)];
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return hits[a] > hits[b]; });
    // The layer alone, to score candidate copies on it.
    RoutingTrace one;
    one.header = train.header;
    one.header.num_layers = 1;
    one.tokens.reserve(train.tokens.size());
    for (const auto& tok : train.tokens) {
      TraceToken x;
      x.seq = tok.seq;
      x.experts.assign(tok.experts.begin() + static_cast<size_t>(m) * K, tok.experts.begin() + (m + 1) * K);
      one.tokens.push_back(std::move(x));
    }
    ExpertLayout slice;
    slice.num_layers = 1;
    slice.num_experts = E;
    slice.num_ranks = R;
    slice.ranks.assign(layout->ranks.begin() + static_cast<size_t>(m) * E,
                       layout->ranks.begin() + static_cast<size_t>(m + 1) * E);
    // The hottest experts first; one that fits nowhere (its only open rank holds it) passes its
    // turn to the next.
    for (int n = 0, i = 0; n < options_.replicate && i < E; ++i) {
      const int e = order[i];
      // Copies below floor((E + N) / R) that the remaining replicas must still fill.
      int deficit = 0;
      for (int r = 0; r < R; ++r) deficit += std::max(0, floor - slice.CopiesOn(0, r));
      const int remaining = options_.replicate - n - 1;
      double best = 0;
      int best_rank = -1;
      for (int r = 0; r < R; ++r) {
        auto& copies = slice.ranks[e];
        const int on_r = slice.CopiesOn(0, r);
        if (std::find(copies.begin(), copies.end(), r) != copies.end() || on_r >= cap ||
            deficit - (on_r < floor ? 1 : 0) > remaining)
          continue;
        copies.push_back(r);
        const double c = RemoteRanksPerTokenLayer(one, slice);
        copies.pop_back();
        if (best_rank < 0 || c < best) best = c, best_rank = r;
      }
      if (best_rank < 0) continue;
      slice.ranks[e].push_back(best_rank);
      ++n;
    }
    std::copy(slice.ranks.begin(), slice.ranks.end(), layout->ranks.begin() + static_cast<size_t>(m) * E);
  }
}

}  // namespace ef::placement
