#include "scheduler/rank_assigner.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__POPCNT__)
#pragma GCC target("popcnt")
#endif

namespace ef::scheduler {

namespace {

// Calls fn(expert) for each expert of `token` at `layer`, in increasing expert order.
template <typename Fn>
void ForEachExpert(const ExpertPathSet& paths, int token, int layer, Fn fn) {
  const int E = paths.num_experts();
  const uint64_t* row = paths.row(token);
  const int begin = layer * E, end = begin + E;
  for (int w = begin / 64; w <= (end - 1) / 64; ++w) {
    uint64_t x = row[w];
    if (w == begin / 64 && begin % 64) x &= ~uint64_t{0} << (begin % 64);
    if (w == (end - 1) / 64 && end % 64) x &= ~uint64_t{0} >> (64 - end % 64);
    for (; x; x &= x - 1) fn(w * 64 + std::countr_zero(x) - begin);
  }
}

// Calls fn(compute_rank) for each expert of `token` at `layer` under the replica rule in the header.
template <typename Fn>
void ForEachComputeRank(const ExpertPathSet& paths, int token, int layer, int rank, const placement::BatchPlan& plan,
                        uint64_t& targets, Fn fn) {
  ForEachExpert(paths, token, layer, [&](int e) {
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
  });
}

// Remote sends of `token` at one layer when it sits on `rank` (-1: a rank computing none of its experts).
int LayerSendsOnRank(const ExpertPathSet& paths, int token, int layer, int rank, const placement::BatchPlan& plan) {
  int sends = 0;
  uint64_t targets = 0, counted = 0;
  std::vector<int> seen;  // ranks >= 64 only
  ForEachComputeRank(paths, token, layer, rank, plan, targets, [&](int dest) {
    if (dest == rank) return;
    if (dest < 64) {
      if (!(counted >> dest & 1)) ++sends;
      counted |= uint64_t{1} << dest;
    } else if (std::find(seen.begin(), seen.end(), dest) == seen.end()) {
      seen.push_back(dest);
      ++sends;
    }
  });
  return sends;
}

// One (layer, expert) of a plan, as the sparse cost reads it.
struct PlacedExpert {
  const int* ranks = nullptr;  // distinct compute ranks, in plan order; the home rank alone when unplanned
  int num_ranks = 0;
  uint64_t low_ranks = 0;   // bit r for each compute rank r < 64: the ranks the replica rule can match
  bool everywhere = false;  // computed on every rank: free for a token wherever it sits
};

// PlacedExpert of every (layer, expert) of a plan, the rank lists copied into one array in (layer,
// expert) order (a token's walk over its layers reads it front to back). An unplanned expert lists
// its home rank; a rank listed twice is kept at its first place (the replica rule never reaches the
// second). Not copyable: the lists point into the index.
class PlanIndex {
 public:
  PlanIndex() = default;
  PlanIndex(const PlanIndex&) = delete;
  PlanIndex& operator=(const PlanIndex&) = delete;

  // Refuses ranks outside [0, num_ranks).
  Status Build(const placement::BatchPlan& plan) {
    const int L = plan.num_layers, E = plan.num_experts, R = plan.num_ranks;
    const size_t n = static_cast<size_t>(L) * E;
    if (plan.compute_ranks.size() != n)
      return InvalidArgument("plan lists compute ranks for " + std::to_string(plan.compute_ranks.size()) +
                             " experts, its shape has " + std::to_string(n));
    placed_.assign(n, {});
    std::vector<size_t> begin(n + 1, 0);
    std::vector<size_t> seen(R, SIZE_MAX);  // seen[r] == i: expert i already lists rank r
    for (size_t i = 0; i < n; ++i) {
      begin[i] = ranks_.size();
      const std::vector<int>& rs = plan.compute_ranks[i];
      if (rs.empty()) ranks_.push_back(static_cast<int>(static_cast<int64_t>(i % E) * R / E));
      for (int r : rs) {
        if (r < 0 || r >= R)
          return InvalidArgument("plan computes layer " + std::to_string(i / E) + " expert " + std::to_string(i % E) +
                                 " on rank " + std::to_string(r) + ", outside the plan's " + std::to_string(R) +
                                 " ranks");
        if (seen[r] != i) ranks_.push_back(r);
        seen[r] = i;
      }
    }
    begin[n] = ranks_.size();
    for (size_t i = 0; i < n; ++i) {
      PlacedExpert& p = placed_[i];
      p.ranks = ranks_.data() + begin[i];
      p.num_ranks = static_cast<int>(begin[i + 1] - begin[i]);
      for (int j = 0; j < p.num_ranks; ++j)
        if (p.ranks[j] < 64) p.low_ranks |= uint64_t{1} << p.ranks[j];
      p.everywhere = p.num_ranks == R;
    }
    return Status::Ok();
  }
  const PlacedExpert* layer(int l, int num_experts) const {
    return placed_.data() + static_cast<size_t>(l) * num_experts;
  }

 private:
  std::vector<PlacedExpert> placed_;
  std::vector<int> ranks_;
};

// The experts one token uses at one layer, in increasing expert order (the order the replica rule
// walks them). Bit j of a mask below stands for experts[j].
constexpr int kMaxMaskedExperts = 64;
struct TokenLayer {
  int num_experts = 0;  // may exceed kMaxMaskedExperts; then only the count is kept
  const PlacedExpert* experts[kMaxMaskedExperts];
};

// The replica of p the rule picks when `match` (= p.low_ranks & targets) is not empty: the first
// listed rank below 64 that already receives the token.
int FirstListedIn(const PlacedExpert& p, uint64_t match, uint64_t targets) {
  if (!(match & (match - 1))) return std::countr_zero(match);
  for (int i = 0;; ++i)
    if (p.ranks[i] < 64 && (targets >> p.ranks[i] & 1)) return p.ranks[i];
}

// Remote sends of a token at one layer from a rank computing exactly the experts in `own` (they
// cost nothing there). The other experts' compute ranks do not depend on which rank that is: the
// replica rule only consults the rank's own membership, and none of their lists includes it.
int LayerSends(const TokenLayer& x, uint64_t own) {
  uint64_t targets = 0;  // ranks < 64 already receiving the token at this layer
  int high[kMaxMaskedExperts];
  int num_high = 0, sends = 0;
  for (int j = 0; j < x.num_experts; ++j) {
    if (own >> j & 1) continue;
    const PlacedExpert& p = *x.experts[j];
    int dest = p.ranks[0];
    if (p.num_ranks > 1) {
      const uint64_t match = p.low_ranks & targets;
      if (match) dest = FirstListedIn(p, match, targets);
    }
    if (dest < 64) {
      sends += !(targets >> dest & 1);
      targets |= uint64_t{1} << dest;
    } else if (std::find(high, high + num_high, dest) == high + num_high) {
      high[num_high++] = dest;
      ++sends;
    }
  }
  return sends;
}

// The sparse cost: cost[u][r] = base[u] + delta of (u, r) when row u lists r, base[u] otherwise.
struct SparseCost {
  std::vector<long> base;
  std::vector<size_t> row_begin;  // row u: entries [row_begin[u], row_begin[u + 1])
  std::vector<int> rank;
  std::vector<long> delta;  // nonzero
};

// Builds SparseCost one unit at a time: AddToken for each token of the unit, then EndUnit.
class SparseCostBuilder {
 public:
  SparseCostBuilder(const ExpertPathSet& paths, const placement::BatchPlan& plan, const PlanIndex& index)
      : paths_(paths),
        plan_(plan),
        index_(index),
        layer_mask_(plan.num_ranks, 0),
        bit_of_(plan.num_ranks, -1),
        dest_seen_(plan.num_ranks, -1),
        dest_first_(plan.num_ranks, 0),
        receivers_at_(plan.num_ranks, -1),
        unit_delta_(plan.num_ranks, 0) {
    out_.row_begin.push_back(0);
  }

  void AddToken(int token) {
    for (int l = 0; l < paths_.num_layers(); ++l) unit_base_ += AddLayer(token, l);
  }
  // Moves the unit's nonzero deltas to its row (a scan of every rank: the greedy scans them all
  // per unit anyway) and clears them.
  void EndUnit() {
    for (int r = 0; r < static_cast<int>(unit_delta_.size()); ++r)
      if (unit_delta_[r] != 0) {
        out_.rank.push_back(r);
        out_.delta.push_back(unit_delta_[r]);
        unit_delta_[r] = 0;
      }
    out_.base.push_back(unit_base_);
    unit_base_ = 0;
    out_.row_begin.push_back(out_.rank.size());
  }
  SparseCost Take() { return std::move(out_); }

 private:
  // Returns the token's sends at `layer` from a rank computing none of its experts other than the
  // everywhere ones; adds the difference on every other rank to the unit.
  long AddLayer(int token, int layer) {
    TokenLayer x;
    const PlacedExpert* placed = index_.layer(layer, paths_.num_experts());
    ForEachExpert(paths_, token, layer, [&](int e) {
      if (x.num_experts < kMaxMaskedExperts) x.experts[x.num_experts] = placed + e;
      ++x.num_experts;
    });
    if (x.num_experts > kMaxMaskedExperts) return AddLayerUnmasked(token, layer, placed);
    BaseWalk walk;
    WalkFromBase(x, walk);
    if (!walk.consulted)
      AddFixedDestinationSavings(x, walk.everywhere, walk.shared, walk.dest);
    else if (!AddRunAtOnceDeltas(x, walk.everywhere, walk.dest))
      AddSimulatedDeltas(x, walk.everywhere, walk.sends);
    return walk.sends;
  }

  // The replica rule from a rank computing none of the token's experts but the everywhere ones.
  struct BaseWalk {
    int sends = 0;
    bool consulted = false;       // some replica choice found a rank already receiving the token
    uint64_t everywhere = 0;      // experts computed on every rank (free)
    uint64_t shared = 0;          // experts whose destination another expert shares
    int dest[kMaxMaskedExperts];  // where the others go
  };
  // Also leaves dest_seen_[d] == serial_ for each destination d, the first expert sent there in
  // dest_first_[d].
  void WalkFromBase(const TokenLayer& x, BaseWalk& walk) {
    ++serial_;
    uint64_t targets = 0;  // destinations below 64 so far
    for (int j = 0; j < x.num_experts; ++j) {
      const PlacedExpert& p = *x.experts[j];
      if (p.everywhere) {
        walk.everywhere |= uint64_t{1} << j;
        continue;
      }
      int d = p.ranks[0];
      if (p.num_ranks > 1) {
        const uint64_t match = p.low_ranks & targets;
        if (match) {
          walk.consulted = true;
          d = FirstListedIn(p, match, targets);
        }
      }
      walk.dest[j] = d;
      if (d < 64) targets |= uint64_t{1} << d;
      if (dest_seen_[d] != serial_) {
        dest_seen_[d] = serial_;
        dest_first_[d] = j;
        ++walk.sends;
      } else {
        walk.shared |= uint64_t{1} << j | uint64_t{1} << dest_first_[d];
      }
    }
  }

  // No replica choice consulted the ranks already receiving the token, so none does from any rank
  // (a rank's own experts only remove receivers): every expert goes to dest[j] whatever the rank,
  // and a rank saves one send per destination all of whose experts it computes itself.
  void AddFixedDestinationSavings(const TokenLayer& x, uint64_t everywhere, uint64_t shared, const int* dest) {
    for (int j = 0; j < x.num_experts; ++j) {
      if (everywhere >> j & 1) continue;
      if (!(shared >> j & 1)) {
        const PlacedExpert& p = *x.experts[j];
        for (int i = 0; i < p.num_ranks; ++i) AddDelta(p.ranks[i], -1);
      } else if (dest_first_[dest[j]] == j) {
        uint64_t group = 0;
        for (uint64_t m = shared; m; m &= m - 1)
          if (dest[std::countr_zero(m)] == dest[j]) group |= m & -m;
        AddSavingOnCommonRanks(x, group);
      }
    }
  }

  // -1 on each rank computing every expert of `group` (two or more).
  void AddSavingOnCommonRanks(const TokenLayer& x, uint64_t group) {
    int fewest = std::countr_zero(group);
    for (uint64_t m = group; m; m &= m - 1)
      if (x.experts[std::countr_zero(m)]->num_ranks < x.experts[fewest]->num_ranks) fewest = std::countr_zero(m);
    const uint64_t others = group & ~(uint64_t{1} << fewest);
    for (uint64_t m = others; m; m &= m - 1) {
      const PlacedExpert& p = *x.experts[std::countr_zero(m)];
      for (int i = 0; i < p.num_ranks; ++i) layer_mask_[p.ranks[i]] |= m & -m;
    }
    const PlacedExpert& f = *x.experts[fewest];
    for (int i = 0; i < f.num_ranks; ++i)
      if (layer_mask_[f.ranks[i]] == others) AddDelta(f.ranks[i], -1);
    for (uint64_t m = others; m; m &= m - 1) {
      const PlacedExpert& p = *x.experts[std::countr_zero(m)];
      for (int i = 0; i < p.num_ranks; ++i) layer_mask_[p.ranks[i]] = 0;
    }
  }

  // Some replica choice depends on the ranks already receiving the token, which differ from rank to
  // rank: the ranks are run all at once, one bit each. receivers[c] holds the ranks whose run sends
  // the token to rank c so far. For each expert in order, a rank not computing it that already sends
  // to one of its replicas (below 64) picks one of those and adds no receiver; the others go to the
  // first listed: the replica rule, rank by rank. A rank's sends are the number of receiver sets
  // holding it. Up to 64 ranks, bit r is rank r; beyond, the ranks computing one of the token's
  // experts get bits 0.. and the next bit stands for the base, and this returns false (having done
  // nothing) when more than 63 ranks are involved.
  bool AddRunAtOnceDeltas(const TokenLayer& x, uint64_t everywhere, const int* dest) {
    if (plan_.num_ranks <= 64) {
      AddRunAtOnceDeltasOnFewRanks(x, everywhere, dest);
      return true;
    }
    uint64_t own[kMaxMaskedExperts];  // own[j]: the bits of the ranks computing experts[j]
    int num_bits = 0;
    bool fits = true;
    for (int j = 0; j < x.num_experts; ++j) {
      own[j] = 0;
      if (everywhere >> j & 1) continue;
      const PlacedExpert& p = *x.experts[j];
      for (int i = 0; i < p.num_ranks && fits; ++i) {
        const int r = p.ranks[i];
        if (bit_of_[r] < 0) {
          fits = num_bits < 63;
          if (!fits) break;
          bit_of_[r] = num_bits;
          layer_ranks_.push_back(r);
          ++num_bits;
        }
        own[j] |= uint64_t{1} << bit_of_[r];
      }
    }
    if (fits) {
      const uint64_t all = (uint64_t{2} << num_bits) - 1;  // bit num_bits: the base
      for (int j = 0; j < x.num_experts; ++j) {
        if (everywhere >> j & 1) continue;
        const PlacedExpert& p = *x.experts[j];
        uint64_t deciding = all & ~own[j];
        for (int i = 1; i < p.num_ranks && deciding; ++i) {  // ranks already sending to ranks[0] stay too
          const int c = p.ranks[i];
          if (c < 64 && receivers_at_[c] >= 0) deciding &= ~receivers_[receivers_at_[c]];
        }
        // Whoever already sends to a listed replica keeps sending there (no new receiver); the rest
        // go to the first listed.
        Receivers(p.ranks[0]) |= deciding;
      }
      AddCountedDeltas(num_bits);
    }
    for (int r : layer_ranks_) bit_of_[r] = -1;
    layer_ranks_.clear();
    for (int c : receiver_ranks_) receivers_at_[c] = -1;
    receiver_ranks_.clear();
    receivers_.clear();
    return fits;
  }

  // The same with at most 64 ranks: bit r is rank r, an expert's ranks are its low_ranks, and the
  // receiver sets are indexed by rank. The base's sets are the destinations of the walk in AddLayer
  // (dest_seen_[c] == serial_).
  void AddRunAtOnceDeltasOnFewRanks(const TokenLayer& x, uint64_t everywhere, const int* dest) {
    const int R = plan_.num_ranks;
    const uint64_t ranks = R == 64 ? ~uint64_t{0} : (uint64_t{1} << R) - 1;
    uint64_t receivers[64];
    uint64_t used = 0;  // ranks c with a receiver set
    for (int j = 0; j < x.num_experts; ++j) {
      if (everywhere >> j & 1) continue;
      const PlacedExpert& p = *x.experts[j];
      uint64_t deciding = ranks & ~p.low_ranks;
      for (int i = 1; i < p.num_ranks && deciding; ++i)
        if (used >> p.ranks[i] & 1) deciding &= ~receivers[p.ranks[i]];
      const int front = p.ranks[0];
      if (!(used >> front & 1)) receivers[front] = 0;
      used |= uint64_t{1} << front;
      receivers[front] |= deciding;
    }
    int delta[64];
    std::fill(delta, delta + R, 0);
    uint64_t changed = 0;
    auto add = [&](uint64_t d, int v) {
      changed |= d;
      for (; d; d &= d - 1) delta[std::countr_zero(d)] += v;
    };
    for (int j = 0; j < x.num_experts; ++j) {  // the base's receiver sets, each once
      if ((everywhere >> j & 1) || dest_first_[dest[j]] != j) continue;
      const int c = dest[j];
      add(~((used >> c & 1) ? receivers[c] : 0) & ranks, -1);
    }
    for (uint64_t c = used; c; c &= c - 1)  // the others
      if (dest_seen_[std::countr_zero(c)] != serial_) add(receivers[std::countr_zero(c)], 1);
    for (; changed; changed &= changed - 1) {
      const int r = std::countr_zero(changed);
      if (delta[r] != 0) AddDelta(r, delta[r]);
    }
  }

  uint64_t& Receivers(int c) {
    if (receivers_at_[c] < 0) {
      receivers_at_[c] = static_cast<int>(receivers_.size());
      receiver_ranks_.push_back(c);
      receivers_.push_back(0);
    }
    return receivers_[receivers_at_[c]];
  }

  // A rank's sends minus the base's: +1 per receiver set holding the rank but not the base, -1 per
  // set holding the base but not the rank. Most ranks send where the base does, so these
  // differences are few; they are walked bit by bit.
  void AddCountedDeltas(int num_bits) {
    const uint64_t ranks = (uint64_t{1} << num_bits) - 1;
    int delta[64];
    std::fill(delta, delta + num_bits, 0);
    for (const uint64_t m : receivers_) {
      const bool base = m >> num_bits & 1;
      for (uint64_t d = (base ? ~m : m) & ranks; d; d &= d - 1) delta[std::countr_zero(d)] += base ? -1 : 1;
    }
    for (int b = 0; b < num_bits; ++b)
      if (delta[b] != 0) AddDelta(layer_ranks_[b], delta[b]);
  }

  // Some replica choice depends on the receivers so far: the sends from each rank are recomputed for
  // the set of experts that rank computes (ranks with the same set share the result).
  void AddSimulatedDeltas(const TokenLayer& x, uint64_t everywhere, int base) {
    for (int j = 0; j < x.num_experts; ++j) {
      if (everywhere >> j & 1) continue;
      const PlacedExpert& p = *x.experts[j];
      for (int i = 0; i < p.num_ranks; ++i) {
        const int r = p.ranks[i];
        if (!layer_mask_[r]) layer_ranks_.push_back(r);
        layer_mask_[r] |= uint64_t{1} << j;
      }
    }
    int one[kMaxMaskedExperts];  // sends from a rank computing experts[j] alone; -1 not yet known
    std::fill(one, one + x.num_experts, -1);
    memo_.clear();
    for (int r : layer_ranks_) {
      const uint64_t own = layer_mask_[r];
      layer_mask_[r] = 0;
      int sends;
      if (!(own & (own - 1))) {
        int& c = one[std::countr_zero(own)];
        if (c < 0) c = LayerSends(x, everywhere | own);
        sends = c;
      } else {
        auto it = std::find_if(memo_.begin(), memo_.end(), [own](const auto& m) { return m.first == own; });
        if (it == memo_.end()) {
          memo_.push_back({own, LayerSends(x, everywhere | own)});
          it = memo_.end() - 1;
        }
        sends = it->second;
      }
      if (sends != base) AddDelta(r, sends - base);
    }
    layer_ranks_.clear();
  }

  // A layer where the token uses more experts than a mask holds: each rank computing one of them,
  // walked on its own.
  long AddLayerUnmasked(int token, int layer, const PlacedExpert* placed) {
    const int base = LayerSendsOnRank(paths_, token, layer, -1, plan_);
    ForEachExpert(paths_, token, layer, [&](int e) {
      const PlacedExpert& p = placed[e];
      for (int i = 0; i < p.num_ranks; ++i) {
        if (!layer_mask_[p.ranks[i]]) layer_ranks_.push_back(p.ranks[i]);
        layer_mask_[p.ranks[i]] = 1;
      }
    });
    for (int r : layer_ranks_) {
      layer_mask_[r] = 0;
      const int sends = LayerSendsOnRank(paths_, token, layer, r, plan_);
      if (sends != base) AddDelta(r, sends - base);
    }
    layer_ranks_.clear();
    return base;
  }

  void AddDelta(int r, int d) { unit_delta_[r] += d; }

  const ExpertPathSet& paths_;
  const placement::BatchPlan& plan_;
  const PlanIndex& index_;
  std::vector<uint64_t> layer_mask_;  // [rank], zero between layers
  std::vector<int> bit_of_;           // [rank]: its bit in AddRunAtOnceDeltas, -1 between layers
  std::vector<int> dest_seen_;        // [rank]: serial_ of the last call it was a destination in
  std::vector<int> dest_first_;       // [rank]: the first expert sent there in that call
  int serial_ = 0;
  std::vector<int> receivers_at_;    // [rank c]: index of receivers_ for c, -1 between layers
  std::vector<int> receiver_ranks_;  // ranks with a receivers_at_ entry
  std::vector<uint64_t> receivers_;
  std::vector<int> layer_ranks_;  // ranks with a nonzero layer_mask_
  std::vector<std::pair<uint64_t, int>> memo_;
  std::vector<long> unit_delta_;  // [rank], zero between units
  long unit_base_ = 0;
  SparseCost out_;
};

std::vector<std::vector<int>> OneUnitPerToken(int num_tokens) {
  std::vector<std::vector<int>> units(num_tokens);
  for (int i = 0; i < num_tokens; ++i) units[i] = {i};
  return units;
}

// Checks that the plan fits the paths and that every token is in exactly one unit, then builds the
// sparse cost of every unit (all zero on one rank).
StatusOr<SparseCost> BuildSparseCost(const ExpertPathSet& paths, const placement::BatchPlan& plan,
                                     std::span<const std::vector<int>> units) {
  const int R = plan.num_ranks, n = paths.num_tokens();
  if (R < 1) return InvalidArgument("plan has no ranks");
  if (plan.num_layers != paths.num_layers() || plan.num_experts != paths.num_experts())
    return InvalidArgument("plan shape (" + std::to_string(plan.num_layers) + " layers x " +
                           std::to_string(plan.num_experts) + " experts) does not match the paths");
  PlanIndex index;
  EF_RETURN_IF_ERROR(index.Build(plan));
  std::vector<uint8_t> listed(n, 0);
  SparseCostBuilder builder(paths, plan, index);
  size_t covered = 0;
  for (size_t u = 0; u < units.size(); ++u) {
    for (int t : units[u]) {
      if (t < 0 || t >= n || listed[t])
        return InvalidArgument("unit " + std::to_string(u) + " lists token " + std::to_string(t) +
                               " out of range or twice");
      listed[t] = 1;
      ++covered;
      if (R > 1) builder.AddToken(t);
    }
    builder.EndUnit();
  }
  if (covered != static_cast<size_t>(n))
    return InvalidArgument("units cover " + std::to_string(covered) + " of " + std::to_string(n) + " tokens");
  return builder.Take();
}

// Second cheapest rank minus cheapest of unit u (0 on one rank). base[u] cancels, and every rank the
// row does not list costs exactly base[u] (delta 0).
long Regret(const SparseCost& cost, int u, int num_ranks) {
  if (num_ranks < 2) return 0;
  long b1 = 1L << 60, b2 = 1L << 60;
  auto consider = [&](long c) {
    if (c < b1) {
      b2 = b1;
      b1 = c;
    } else if (c < b2) {
      b2 = c;
    }
  };
  for (size_t i = cost.row_begin[u]; i < cost.row_begin[u + 1]; ++i) consider(cost.delta[i]);
  const long unlisted = num_ranks - static_cast<long>(cost.row_begin[u + 1] - cost.row_begin[u]);
  for (long i = 0; i < std::min(2L, unlisted); ++i) consider(0);
  return b2 - b1;
}

}  // namespace

int RankAssigner::TokenSends(const ExpertPathSet& paths, int token, int rank, const placement::BatchPlan& plan) {
  int sends = 0;
  for (int l = 0; l < paths.num_layers(); ++l) sends += LayerSendsOnRank(paths, token, l, rank, plan);
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

StatusOr<std::vector<long>> RankAssigner::UnitCosts(const ExpertPathSet& paths, const placement::BatchPlan& plan,
                                                    std::span<const std::vector<int>> units) {
  std::vector<std::vector<int>> own;
  if (units.empty()) units = own = OneUnitPerToken(paths.num_tokens());
  EF_ASSIGN_OR_RETURN(const SparseCost cost, BuildSparseCost(paths, plan, units));
  const int R = plan.num_ranks;
  std::vector<long> dense(units.size() * static_cast<size_t>(R));
  for (size_t u = 0; u < units.size(); ++u) {
    std::fill_n(dense.begin() + static_cast<long>(u * R), R, cost.base[u]);
    for (size_t i = cost.row_begin[u]; i < cost.row_begin[u + 1]; ++i) dense[u * R + cost.rank[i]] += cost.delta[i];
  }
  return dense;
}

StatusOr<std::vector<int>> RankAssigner::Assign(const ExpertPathSet& paths, const placement::BatchPlan& plan,
                                                std::span<const std::vector<int>> units) const {
  if (options_.max_imbalance < 1.0) return InvalidArgument("max_imbalance must be >= 1");
  std::vector<std::vector<int>> own;
  if (units.empty()) units = own = OneUnitPerToken(paths.num_tokens());
  EF_ASSIGN_OR_RETURN(const SparseCost cost, BuildSparseCost(paths, plan, units));
  const int R = plan.num_ranks, n = paths.num_tokens(), U = static_cast<int>(units.size());
  std::vector<int> size(U), rank_of(n, -1);
  for (int u = 0; u < U; ++u) size[u] = static_cast<int>(units[u].size());

  const int largest = U > 0 ? *std::max_element(size.begin(), size.end()) : 0;
  const long cap = std::max<long>(static_cast<long>(std::ceil(options_.max_imbalance * n / R - 1e-9)), largest);
  std::vector<long> regret(U);
  for (int u = 0; u < U; ++u) regret[u] = Regret(cost, u, R);
  std::vector<int> order(U);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return regret[a] != regret[b] ? regret[a] > regret[b] : size[a] > size[b]; });
  // The dense row of a unit lives in `delta` only while the unit is placed (O(ranks) per unit).
  std::vector<long> delta(R, 0);
  std::vector<long> tokens_on(R, 0);
  for (int u : order) {
    for (size_t i = cost.row_begin[u]; i < cost.row_begin[u + 1]; ++i) delta[cost.rank[i]] = cost.delta[i];
    int best = -1;
    for (int r = 0; r < R; ++r) {
      if (tokens_on[r] + size[u] > cap) continue;
      if (best < 0 || delta[r] < delta[best] || (delta[r] == delta[best] && tokens_on[r] < tokens_on[best])) best = r;
    }
    if (best < 0) best = static_cast<int>(std::min_element(tokens_on.begin(), tokens_on.end()) - tokens_on.begin());
    for (size_t i = cost.row_begin[u]; i < cost.row_begin[u + 1]; ++i) delta[cost.rank[i]] = 0;
    tokens_on[best] += size[u];
    for (int t : units[u]) rank_of[t] = best;
  }
  return rank_of;
}

}  // namespace ef::scheduler
