#include "placement/planner.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <string>

namespace ef::placement {

namespace {

// The ranks of one layer ordered by expected load, as two tournament trees: the busiest rank in
// O(1), the least-loaded visible rank in O(1) or, skipping the ranks a predicate excludes, in
// O(log R) plus O(log R) per excluded rank lighter than the answer; a load change or a hide/show in
// O(log R). Ties go to the lower rank. A hidden rank keeps its load on the busiest side but is never
// the least loaded (it has no room, or is being given a copy). Hides nest: a rank is visible when
// shown as often as hidden. Each node keeps the winner's load next to its rank, so a comparison
// reads one node.
class LoadTree {
 public:
  explicit LoadTree(int num_ranks) : num_ranks_(num_ranks) {
    while (leaves_ < num_ranks) leaves_ *= 2;
    max_.resize(2 * leaves_);
    min_.resize(2 * leaves_);
    hidden_.assign(num_ranks, 0);
  }
  // Every rank visible, with load[r].
  void Build(const std::vector<double>& load) {
    std::fill(hidden_.begin(), hidden_.end(), 0);
    for (int i = 0; i < leaves_; ++i) {
      const bool real = i < num_ranks_;
      max_[leaves_ + i] = {real ? load[i] : -kInf, real ? i : kNone};
      min_[leaves_ + i] = {real ? load[i] : kInf, real ? i : kNone};
    }
    for (int n = leaves_ - 1; n >= 1; --n) {
      max_[n] = max_[2 * n + !Heavier(max_[2 * n], max_[2 * n + 1])];
      min_[n] = min_[2 * n + !Lighter(min_[2 * n], min_[2 * n + 1])];
    }
  }
  void Set(int r, double load) {
    max_[leaves_ + r].load = load;
    RaiseMax(r);
    if (!hidden_[r]) {
      min_[leaves_ + r].load = load;
      RaiseMin(r);
    }
  }
  void Hide(int r) {
    if (hidden_[r]++ == 0) {
      min_[leaves_ + r].load = kInf;
      RaiseMin(r);
    }
  }
  void Show(int r) {
    if (--hidden_[r] == 0) {
      min_[leaves_ + r].load = max_[leaves_ + r].load;
      RaiseMin(r);
    }
  }
  // Show(r) and Set(r, load) in one walk per side.
  void ShowWith(int r, double load) {
    --hidden_[r];
    Set(r, load);
  }
  bool visible(int r) const { return hidden_[r] == 0; }
  int Busiest() const { return max_[1].rank; }
  // The least-loaded visible rank; -1 if none.
  int Lightest() const { return min_[1].load == kInf ? -1 : min_[1].rank; }
  // The least-loaded visible rank r with !excluded(r); -1 if none.
  template <typename Excluded>
  int LeastLoaded(Excluded excluded) const {
    Node best{kInf, kNone};
    Descend(1, excluded, best);
    return best.rank == kNone ? -1 : best.rank;
  }

 private:
  static constexpr double kInf = std::numeric_limits<double>::infinity();
  static constexpr int kNone = std::numeric_limits<int>::max();  // padding leaves: last on ties
  struct Node {
    double load;
    int rank;
  };
  // Branch-free comparisons: which child wins is data, not control flow.
  static bool Lighter(const Node& a, const Node& b) {
    return (a.load < b.load) | ((a.load == b.load) & (a.rank < b.rank));
  }
  static bool Heavier(const Node& a, const Node& b) {
    return (a.load > b.load) | ((a.load == b.load) & (a.rank < b.rank));
  }
  static bool Same(const Node& a, const Node& b) { return (a.load == b.load) & (a.rank == b.rank); }
  // Each side's walk up from a leaf stops at the first node whose winner did not change (its
  // ancestors' did not either): a lighter rank rarely changes the busiest, a heavier one rarely the
  // least loaded.
  void RaiseMax(int r) {
    for (int n = (leaves_ + r) / 2; n >= 1; n /= 2) {
      const Node& w = max_[2 * n + !Heavier(max_[2 * n], max_[2 * n + 1])];
      if (Same(w, max_[n])) break;
      max_[n] = w;
    }
  }
  void RaiseMin(int r) {
    for (int n = (leaves_ + r) / 2; n >= 1; n /= 2) {
      const Node& w = min_[2 * n + !Lighter(min_[2 * n], min_[2 * n + 1])];
      if (Same(w, min_[n])) break;
      min_[n] = w;
    }
  }
  template <typename Excluded>
  void Descend(int n, Excluded& excluded, Node& best) const {
    if (min_[n].rank == kNone || min_[n].load == kInf || !Lighter(min_[n], best)) return;  // nothing better below
    if (n >= leaves_) {
      if (!excluded(min_[n].rank)) best = min_[n];
      return;
    }
    const bool left_first = Lighter(min_[2 * n], min_[2 * n + 1]);
    Descend(left_first ? 2 * n : 2 * n + 1, excluded, best);
    Descend(left_first ? 2 * n + 1 : 2 * n, excluded, best);
  }

  const int num_ranks_;
  int leaves_ = 1;
  std::vector<Node> max_, min_;  // per node: the busiest / least-loaded rank below it
  std::vector<int> hidden_;      // [rank]: hides not yet shown
};

// Plans one layer at a time (steps 1-4 of the header); the buffers are reused across layers.
class LayerPlanner {
 public:
  LayerPlanner(const PlannerOptions& options, const RoutingForecast& forecast, const CacheResidency& cache,
               const Topology& topology, BatchPlan& plan)
      : options_(options),
        forecast_(forecast),
        cache_(cache),
        topology_(topology),
        plan_(plan),
        R_(topology.num_ranks),
        E_(forecast.num_experts),
        max_copies_(options.max_replicas_per_expert > 0 ? std::min(options.max_replicas_per_expert, R_) : R_),
        hot_copies_(options.hot_replicas_per_expert > 0 ? std::min(options.hot_replicas_per_expert, max_copies_)
                                                        : max_copies_),
        load_(R_),
        tree_(R_),
        hosted_(R_),
        copies_(E_),
        on_(static_cast<size_t>(E_) * R_, 0),
        cached_by_(E_) {
    for (const auto& row : cache.resident) any_cache_ |= !row.empty();
  }

  // Expected tokens and the largest probability of every (layer, expert), in one pass over the
  // forecast in memory order (it is the planner's largest input: tokens x layers x experts).
  void ScanForecast() {
    const int L = forecast_.num_layers;
    max_prob_.assign(static_cast<size_t>(L) * E_, 0.f);
    for (int t = 0; t < forecast_.num_tokens; ++t)
      for (int l = 0; l < L; ++l) {
        const float* p = forecast_.row(t, l);
        float* expected = plan_.expected_tokens.data() + static_cast<size_t>(l) * E_;
        float* max_prob = max_prob_.data() + static_cast<size_t>(l) * E_;
        for (int e = 0; e < E_; ++e) {
          expected[e] += p[e];
          max_prob[e] = std::max(max_prob[e], p[e]);
        }
      }
  }

  void Plan(int layer) {
    l_ = layer;
    expected_ = plan_.expected_tokens.data() + static_cast<size_t>(layer) * E_;
    ComputeLoads();
    IndexCache();
    PlaceOnHomes();
    if (!needed_.empty()) {
      mean_ = std::accumulate(load_.begin(), load_.end(), 0.0) / R_;
      const double bound = options_.max_imbalance * mean_ + 1e-9;
      SortHeavy(bound);
      tree_.Build(load_);
      if (options_.extra_replicas_per_rank > 0 && R_ > 1) AddHotReplicas();
      FitHeavyExperts(bound);
      Balance(bound);
    }
    Emit();
  }

 private:
  std::vector<int>& ranks_of(int e) { return copies_[e]; }
  bool is_on(int e, int r) const { return on_[static_cast<size_t>(e) * R_ + r] != 0; }
  bool cached(int r, int e) const { return any_cache_ && cache_.has(r, l_, e, E_); }
  double per_copy(int e) { return expected_[e] / ranks_of(e).size(); }

  // 1. Expected load of each expert (sum of probabilities) and which experts are needed.
  void ComputeLoads() {
    const float* max_prob = max_prob_.data() + static_cast<size_t>(l_) * E_;
    needed_.clear();
    for (int e = 0; e < E_; ++e)
      if (max_prob[e] >= options_.min_prob && max_prob[e] > 0.f) needed_.push_back(e);
  }

  // cached_by_[e]: the ranks whose cache holds expert e of this layer, in rank order.
  void IndexCache() {
    if (!any_cache_) return;
    for (auto& list : cached_by_) list.clear();
    for (int r = 0; r < static_cast<int>(cache_.resident.size()) && r < R_; ++r)
      if (!cache_.resident[r].empty())
        for (int e = 0; e < E_; ++e)
          if (cache_.has(r, l_, e, E_)) cached_by_[e].push_back(r);
  }

  // 2. Each needed expert on its home rank, or on the first rank caching it when the home does not.
  void PlaceOnHomes() {
    std::fill(load_.begin(), load_.end(), 0.0);
    for (auto& list : hosted_) list.clear();
    for (int e : needed_) {
      int r = topology_.home(l_, e, E_);
      if (!cached(r, e) && any_cache_ && !cached_by_[e].empty()) r = cached_by_[e].front();
      Host(e, r);
      load_[r] += expected_[e];
    }
  }

  // by_load_: the experts steps 3 and 4a look at (hot or heavier than the bound), hottest first.
  void SortHeavy(double bound) {
    const bool replicate_hot = options_.extra_replicas_per_rank > 0 && R_ > 1;
    hot_threshold_ = options_.hot_factor * mean_ * R_ / needed_.size();
    by_load_.clear();
    for (int e : needed_)
      if (expected_[e] > bound || (replicate_hot && expected_[e] >= hot_threshold_)) by_load_.push_back(e);
    std::sort(by_load_.begin(), by_load_.end(), [&](int a, int b) { return expected_[a] > expected_[b]; });
  }

  // 3. Hot experts, hottest first, get copies on the least-loaded ranks with a free slot, up to
  // hot_copies_ each. A rank whose slots are used up stays hidden until step 4.
  void AddHotReplicas() {
    slots_.assign(R_, options_.extra_replicas_per_rank);
    for (int e : by_load_) {
      if (expected_[e] < hot_threshold_) break;
      const int have = static_cast<int>(ranks_of(e).size());
      if (have >= hot_copies_) continue;
      picked_.clear();
      HideRanksOf(e);
      while (have + static_cast<int>(picked_.size()) < hot_copies_) {
        const int r = PickLightest(e);
        if (r < 0) break;
        picked_.push_back(r);
        tree_.Hide(r);
        if (--slots_[r] == 0) tree_.Hide(r);
      }
      for (int r : picked_) Host(e, r);
      Share(e, have, /*hidden=*/true);
    }
    for (int r = 0; r < R_; ++r)
      if (slots_[r] == 0) tree_.Show(r);
  }

  // 4a. Experts heavier than the bound, hottest first, get at once the fewest copies on the
  // least-loaded ranks without them after which no rank computing them exceeds the bound, when up to
  // twice the minimum ceil(load / bound) (plus a few) suffice; otherwise that minimum. Step 4b alone
  // would copy them one at a time, reloading every rank computing them at each step.
  void FitHeavyExperts(double bound) {
    for (int e : by_load_) {
      const double w = expected_[e];
      if (w <= bound) break;
      const int have = static_cast<int>(ranks_of(e).size());
      const int least = std::min(max_copies_, static_cast<int>(std::ceil(w / bound)));
      const int most = std::min(max_copies_, 2 * least + 4);
      double hosts = 0, heaviest = 0;  // the heaviest rank computing e, without e and with it
      for (int r : ranks_of(e)) {
        hosts = std::max(hosts, load_[r] - w / have);
        heaviest = std::max(heaviest, load_[r]);
      }
      if (have >= least && heaviest <= bound) continue;
      // Candidates come lightest first; each is hidden once taken so that the next is the lightest.
      picked_.clear();
      HideRanksOf(e);
      int fit = 0;
      while (have + static_cast<int>(picked_.size()) < most) {
        const int r = PickLightest(e);
        if (r < 0) break;
        picked_.push_back(r);
        tree_.Hide(r);
        const int copies = have + static_cast<int>(picked_.size());
        if (copies >= least && std::max(hosts, load_[r]) + w / copies <= bound) {
          fit = static_cast<int>(picked_.size());
          break;
        }
      }
      const size_t take = fit > 0 ? fit : std::min<size_t>(picked_.size(), std::max(0, least - have));
      for (size_t i = take; i < picked_.size(); ++i) tree_.Show(picked_[i]);
      picked_.resize(take);
      for (int r : picked_) Host(e, r);
      Share(e, have, /*hidden=*/true);
    }
  }

  // 4b. While the busiest rank exceeds max_imbalance x the mean, its expert with the largest load per
  // copy gets a copy on the least-loaded rank without one, up to max_copies_ copies.
  void Balance(double bound) {
    for (long guard = 0; guard < static_cast<long>(E_) * R_; ++guard) {
      const int busiest = tree_.Busiest();
      if (load_[busiest] <= bound) break;
      int best_e = -1;
      for (int e : hosted_[busiest]) {
        if (static_cast<int>(ranks_of(e).size()) >= max_copies_) continue;
        if (best_e < 0 || per_copy(e) > per_copy(best_e) || (per_copy(e) == per_copy(best_e) && e < best_e)) best_e = e;
      }
      if (best_e < 0) break;
      const int target = PickTarget(best_e);
      if (target < 0) break;
      Host(best_e, target);
      Share(best_e, static_cast<int>(ranks_of(best_e).size()) - 1, /*hidden=*/false);
    }
  }

  // The least-loaded rank without e (the busiest's expert in step 4b), preferring among equally
  // loaded ones (within 1e-9) one whose cache holds e; -1 if none.
  int PickTarget(int e) {
    return PreferCached(e, tree_.LeastLoaded([&](int r) { return is_on(e, r); }));
  }
  // The same when e's ranks are hidden (steps 3 and 4a): the lightest visible rank.
  int PickLightest(int e) { return PreferCached(e, tree_.Lightest()); }
  int PreferCached(int e, int lightest) {
    if (lightest < 0 || !any_cache_ || cached(lightest, e)) return lightest;
    for (int r : cached_by_[e])
      if (!is_on(e, r) && tree_.visible(r) && load_[r] <= load_[lightest] + 1e-9) return r;
    return lightest;
  }
  void HideRanksOf(int e) {
    for (int r : ranks_of(e)) tree_.Hide(r);
  }

  void Host(int e, int r) {
    ranks_of(e).push_back(r);
    on_[static_cast<size_t>(e) * R_ + r] = 1;
    hosted_[r].push_back(e);
  }

  // e went from old_copies to its current copies: its load is split evenly over all of them again.
  // hidden: every rank of e is hidden once (steps 3 and 4a), and shown here.
  void Share(int e, int old_copies, bool hidden) {
    const std::vector<int>& ranks = ranks_of(e);
    const double old_share = expected_[e] / old_copies, share = per_copy(e);
    for (int i = 0; i < static_cast<int>(ranks.size()); ++i) {
      const int r = ranks[i];
      load_[r] += i < old_copies ? share - old_share : share;
      if (hidden)
        tree_.ShowWith(r, load_[r]);
      else
        tree_.Set(r, load_[r]);
    }
    plan_.num_replicas += static_cast<int>(ranks.size()) - old_copies;
  }

  // Compute ranks, loads and prefetch lists of the layer; clears the working state for the next one.
  void Emit() {
    for (int r = 0; r < R_; ++r) plan_.rank_load[static_cast<size_t>(l_) * R_ + r] = static_cast<float>(load_[r]);
    for (int e : needed_) {
      for (int r : copies_[e]) {
        if (!cached(r, e)) plan_.prefetch[r].push_back({l_, e, expected_[e]});
        on_[static_cast<size_t>(e) * R_ + r] = 0;
      }
      plan_.compute_ranks[static_cast<size_t>(l_) * E_ + e] = copies_[e];
      copies_[e].clear();
    }
  }

  const PlannerOptions& options_;
  const RoutingForecast& forecast_;
  const CacheResidency& cache_;
  const Topology& topology_;
  BatchPlan& plan_;
  const int R_, E_;
  const int max_copies_;  // copies of one expert, home included
  const int hot_copies_;  // copies of one expert step 3 may reach
  bool any_cache_ = false;
  int l_ = 0;
  float* expected_ = nullptr;                           // plan_.expected_tokens of layer l_
  double mean_ = 0;                                     // mean expected load per rank
  double hot_threshold_ = 0;                            // hot_factor x the mean load per needed expert
  std::vector<float> max_prob_;                         // [layer * E + expert]
  std::vector<int> needed_, by_load_, slots_, picked_;  // by_load_: needed_, hottest first
  std::vector<double> load_;
  LoadTree tree_;                         // over load_, kept in step
  std::vector<std::vector<int>> hosted_;  // [rank]: experts it computes, in the order they came
  std::vector<std::vector<int>> copies_;  // [expert]: ranks computing it, home first (empty between layers)
  std::vector<uint8_t> on_;               // [expert * R + rank]: rank computes expert (zero between layers)
  std::vector<std::vector<int>> cached_by_;
};

}  // namespace

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

  BatchPlan plan;
  plan.num_layers = L;
  plan.num_experts = E;
  plan.num_ranks = R;
  plan.num_tokens = forecast.num_tokens;
  plan.compute_ranks.assign(static_cast<size_t>(L) * E, {});
  plan.expected_tokens.assign(static_cast<size_t>(L) * E, 0.f);
  plan.rank_load.assign(static_cast<size_t>(L) * R, 0.f);
  plan.prefetch.assign(R, {});
  LayerPlanner layers(options_, forecast, cache, topology, plan);
  layers.ScanForecast();
  for (int l = 0; l < L; ++l) layers.Plan(l);
  for (auto& list : plan.prefetch)
    std::stable_sort(list.begin(), list.end(), [](const PrefetchEntry& a, const PrefetchEntry& b) {
      return a.layer != b.layer ? a.layer < b.layer : a.expected_tokens > b.expected_tokens;
    });
  return plan;
}

}  // namespace ef::placement
