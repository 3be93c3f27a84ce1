#include "scheduler/token_regrouper.h"

#include <bit>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <unordered_map>

// The objective is all popcounts: use the instruction (every x86-64 server CPU since 2008 has it)
// rather than the generic libgcc fallback, without changing the project-wide flags.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__POPCNT__)
#pragma GCC target("popcnt")
#endif

namespace ef::scheduler {

std::vector<std::vector<int>> TokenRegrouper::FcfsBatches(std::span<const int> capacities) {
  std::vector<std::vector<int>> out(capacities.size());
  int next = 0;
  for (size_t b = 0; b < capacities.size(); ++b)
    for (int i = 0; i < capacities[b]; ++i) out[b].push_back(next++);
  return out;
}

int TokenRegrouper::Objective(const ExpertPathSet& paths, const std::vector<std::vector<int>>& batches) {
  int total = 0;
  for (const auto& b : batches) total += paths.CountDistinct(b);
  return total;
}

StatusOr<RegroupResult> TokenRegrouper::Regroup(const ExpertPathSet& paths, std::span<const int> capacities,
                                                std::span<const int64_t> seq, std::span<const int> deadline) {
  n_ = paths.num_tokens();
  num_batches_ = static_cast<int>(capacities.size());
  words_ = paths.num_words();
  bits_ = words_ * 64;
  long total = 0;
  for (int c : capacities) {
    if (c < 0) return InvalidArgument("batch capacity must be >= 0");
    // A batch's tokens per expert are counted in 16 bits (counts_).
    if (c > std::numeric_limits<uint16_t>::max())
      return InvalidArgument("batch capacity " + std::to_string(c) + " is over the 65535 tokens a batch can hold");
    total += c;
  }
  if (total != n_)
    return InvalidArgument("batch capacities sum to " + std::to_string(total) + " but there are " + std::to_string(n_) +
                           " candidate tokens");
  if (!seq.empty() && static_cast<int>(seq.size()) != n_)
    return InvalidArgument("seq has " + std::to_string(seq.size()) + " entries for " + std::to_string(n_) + " tokens");

  if (!deadline.empty() && static_cast<int>(deadline.size()) != n_)
    return InvalidArgument("deadline has " + std::to_string(deadline.size()) + " entries for " + std::to_string(n_) +
                           " tokens");
  deadline_.assign(n_, num_batches_ - 1);
  if (!deadline.empty()) {
    std::vector<int> due(num_batches_, 0);
    for (int i = 0; i < n_; ++i) {
      if (deadline[i] < 0) return InvalidArgument("token " + std::to_string(i) + " has a negative deadline");
      deadline_[i] = std::min(deadline[i], num_batches_ - 1);
      ++due[deadline_[i]];
    }
    long room = 0, need = 0;
    for (int b = 0; b < num_batches_; ++b) {
      room += capacities[b];
      need += due[b];
      if (need > room)
        return FailedPrecondition(std::to_string(need) + " tokens are due by batch " + std::to_string(b) +
                                  " but only " + std::to_string(room) + " fit");
    }
  }

  // Same-sequence neighbours (index order is the sequence order).
  prev_.assign(n_, -1);
  next_.assign(n_, -1);
  if (!seq.empty()) {
    std::unordered_map<int64_t, int> last;
    last.reserve(n_ * 2);
    for (int i = 0; i < n_; ++i) {
      auto [it, inserted] = last.try_emplace(seq[i], i);
      if (!inserted) {
        if (deadline_[i] < deadline_[it->second])
          return InvalidArgument("token " + std::to_string(i) + " is due before an earlier token of its sequence");
        prev_[i] = it->second;
        next_[it->second] = i;
        it->second = i;
      }
    }
  }

  RegroupResult result;
  result.fcfs_objective = Objective(paths, FcfsBatches(capacities));
  if (n_ == 0) {
    result.batches.assign(num_batches_, {});
    return result;
  }

  Seed(paths, capacities);
  counts_.assign(static_cast<size_t>(num_batches_) * bits_, 0);
  union_.assign(static_cast<size_t>(num_batches_) * words_, 0);
  ones_.assign(static_cast<size_t>(num_batches_) * words_, 0);
  add_cost_.assign(static_cast<size_t>(n_) * num_batches_, 0);
  rem_gain_.assign(n_, 0);
  for (int b = 0; b < num_batches_; ++b) RebuildBatch(paths, b);
  for (int b = 0; b < num_batches_; ++b) RefreshCaches(paths, b);
  for (int b = 0; b < num_batches_; ++b)
    for (int w = 0; w < words_; ++w) result.greedy_objective += std::popcount(union_[b * words_ + w]);

  result.swaps = options_.max_swap_passes > 0 ? LocalSearch(paths, &result.passes) : 0;
  if (options_.anneal_iters_per_token > 0 && num_batches_ > 1) {
    Anneal(paths);
    for (int b = 0; b < num_batches_; ++b) RefreshCaches(paths, b);
    int p2 = 0;
    result.swaps += LocalSearch(paths, &p2);
    result.passes += p2;
  }

  // Never worse than FCFS: when the search ends above the FCFS layout (possible, it is a
  // heuristic) and FCFS meets every deadline, descend from FCFS instead.
  int objective = 0;
  for (int b = 0; b < num_batches_; ++b)
    for (int w = 0; w < words_; ++w) objective += std::popcount(union_[b * words_ + w]);
  if (objective > result.fcfs_objective) {
    auto fcfs = FcfsBatches(capacities);
    bool feasible = true;
    for (int b = 0; b < num_batches_; ++b)
      for (int t : fcfs[b]) feasible = feasible && b <= deadline_[t];
    if (feasible) {
      members_ = std::move(fcfs);
      for (int b = 0; b < num_batches_; ++b)
        for (int t : members_[b]) batch_of_[t] = b;
      for (int b = 0; b < num_batches_; ++b) RebuildBatch(paths, b);
      for (int b = 0; b < num_batches_; ++b) RefreshCaches(paths, b);
      int p2 = 0;
      if (options_.max_swap_passes > 0) result.swaps += LocalSearch(paths, &p2);
      result.passes += p2;
    }
  }

  result.batches.assign(num_batches_, {});
  for (int i = 0; i < n_; ++i) result.batches[batch_of_[i]].push_back(i);  // increasing by construction
  for (int b = 0; b < num_batches_; ++b)
    for (int w = 0; w < words_; ++w) result.objective += std::popcount(union_[b * words_ + w]);
  return result;
}

void TokenRegrouper::Seed(const ExpertPathSet& paths, std::span<const int> capacities) {
  batch_of_.assign(n_, -1);
  members_.assign(num_batches_, {});
  std::vector<uint64_t> u(words_);
  // ready[i]: unassigned and its predecessor (if any) assigned. Kept as a flag array; n is small.
  std::vector<char> ready(n_);
  for (int i = 0; i < n_; ++i) ready[i] = prev_[i] < 0;
  int earliest = 0;  // first unassigned index
  std::vector<int> cand;
  cand.reserve(n_);
  std::vector<int> add_now(n_, 0), total_bits(n_, 0), due(num_batches_, 0);
  std::vector<long> slack(num_batches_, 0);
  for (int i = 0; i < n_; ++i)
    for (int w = 0; w < words_; ++w) total_bits[i] += std::popcount(paths.row(i)[w]);
  IndexBits(paths);
  for (int b = 0; b < num_batches_; ++b) {
    std::fill(u.begin(), u.end(), 0);
    // Tokens due in this batch go first, in index order (a due token's predecessor is due too).
    int filled = 0;
    for (int i = 0; i < n_ && filled < capacities[b]; ++i) {
      if (batch_of_[i] >= 0 || deadline_[i] > b) continue;
      batch_of_[i] = b;
      members_[b].push_back(i);
      ready[i] = 0;
      if (next_[i] >= 0) ready[next_[i]] = 1;
      for (int w = 0; w < words_; ++w) u[w] |= paths.row(i)[w];
      ++filled;
    }
    // Unassigned tokens, compacted once per batch (the scan below is the seeding's hot loop).
    cand.clear();
    for (int i = 0; i < n_; ++i)
      if (batch_of_[i] < 0) cand.push_back(i);
    for (int i : cand) {
      int a = 0;
      for (int w = 0; w < words_; ++w) a += std::popcount(paths.row(i)[w] & ~u[w]);
      add_now[i] = a;
    }
    const bool take_all = static_cast<int>(cand.size()) == capacities[b] - filled;
    // Room to spare for the deadlines: slack[c] = room in batches b..c - unassigned tokens due by
    // c. A token due at d taken here uses one place of every batch range b..c with c < d (for c >= d
    // it was counted as due), so it may be taken only while slack[c] >= 1 for all c in [b, d): d <=
    // tight, the first batch with no slack. Otherwise a token due later could take the place a token
    // due at c needs, and c's tokens would be placed after their deadline.
    std::fill(due.begin(), due.end(), 0);
    for (int i : cand) ++due[deadline_[i]];
    int tight = num_batches_;
    {
      long room = 0, need = 0;
      for (int c = 0; c < b; ++c) need += due[c];  // past due (did not fit): first in line
      for (int c = b; c < num_batches_; ++c) {
        room += c == b ? capacities[b] - filled : capacities[c];
        need += due[c];
        slack[c] = room - need;
      }
    }
    auto find_tight = [&] {
      tight = num_batches_;
      for (int c = b; c < num_batches_; ++c)
        if (slack[c] <= 0) {
          tight = c;
          break;
        }
    };
    find_tight();
    for (; filled < capacities[b]; ++filled) {
      int pick = -1;
      if (take_all) {
        // The last batch takes whatever is left, in index order (always ready in that order).
        for (int i : cand)
          if (batch_of_[i] < 0) {
            pick = i;
            break;
          }
      } else {
        if (filled == 0 && options_.seed_with_earliest) {
          while (earliest < n_ && batch_of_[earliest] >= 0) ++earliest;
          // Its predecessor has a smaller index, so it is assigned: ready.
          if (deadline_[earliest] <= tight) pick = earliest;
        }
        if (pick < 0) {
          // add_now[i] = |row_i \ u|, kept current as u grows; ties: most bits shared, then earliest.
          int best_add = 1 << 30, best_share = -1;
          for (int i : cand) {
            if (!ready[i] || batch_of_[i] >= 0 || deadline_[i] > tight) continue;
            const int add = add_now[i], share = total_bits[i] - add;
            if (add < best_add || (add == best_add && share > best_share)) {
              best_add = add;
              best_share = share;
              pick = i;
            }
          }
        }
      }
      for (int c = b; c < deadline_[pick]; ++c) --slack[c];
      if (deadline_[pick] > b) find_tight();
      batch_of_[pick] = b;
      members_[b].push_back(pick);
      ready[pick] = 0;
      if (next_[pick] >= 0) ready[next_[pick]] = 1;
      // Each bit new to the batch costs one less to every token holding it (assigned ones too:
      // their add_now is not read again before the next batch recomputes it).
      const uint64_t* r = paths.row(pick);
      for (int w = 0; w < words_; ++w) {
        const uint64_t fresh = r[w] & ~u[w];
        u[w] |= fresh;
        for (uint64_t x = fresh; x; x &= x - 1) {
          const int bit = w * 64 + std::countr_zero(x);
          for (int k = bit_begin_[bit]; k < bit_begin_[bit + 1]; ++k) --add_now[bit_tokens_[k]];
        }
      }
    }
  }
}

void TokenRegrouper::IndexBits(const ExpertPathSet& paths) {
  bit_begin_.assign(bits_ + 1, 0);
  for (int i = 0; i < n_; ++i)
    for (int w = 0; w < words_; ++w)
      for (uint64_t x = paths.row(i)[w]; x; x &= x - 1) ++bit_begin_[w * 64 + std::countr_zero(x) + 1];
  for (int b = 0; b < bits_; ++b) bit_begin_[b + 1] += bit_begin_[b];
  bit_tokens_.resize(bit_begin_[bits_]);
  std::vector<int> next(bit_begin_.begin(), bit_begin_.end() - 1);
  for (int i = 0; i < n_; ++i)
    for (int w = 0; w < words_; ++w)
      for (uint64_t x = paths.row(i)[w]; x; x &= x - 1) bit_tokens_[next[w * 64 + std::countr_zero(x)]++] = i;
}

void TokenRegrouper::RebuildBatch(const ExpertPathSet& paths, int b) {
  uint16_t* c = counts_.data() + static_cast<size_t>(b) * bits_;
  std::fill(c, c + bits_, 0);
  for (int t : members_[b]) {
    const uint64_t* r = paths.row(t);
    for (int w = 0; w < words_; ++w)
      for (uint64_t x = r[w]; x; x &= x - 1) ++c[w * 64 + std::countr_zero(x)];
  }
  for (int w = 0; w < words_; ++w) {
    uint64_t un = 0, on = 0;
    for (int k = 0; k < 64; ++k) {
      un |= uint64_t{c[w * 64 + k] >= 1} << k;
      on |= uint64_t{c[w * 64 + k] == 1} << k;
    }
    union_[b * words_ + w] = un;
    ones_[b * words_ + w] = on;
  }
}

// add_cost_[t][b] for every token, rem_gain_ for b's members.
void TokenRegrouper::RefreshCaches(const ExpertPathSet& paths, int b) {
  const uint64_t* u = union_.data() + static_cast<size_t>(b) * words_;
  const uint64_t* o = ones_.data() + static_cast<size_t>(b) * words_;
  for (int t = 0; t < n_; ++t) {
    const uint64_t* r = paths.row(t);
    int add = 0;
    for (int w = 0; w < words_; ++w) add += std::popcount(r[w] & ~u[w]);
    add_cost_[static_cast<size_t>(t) * num_batches_ + b] = add;
  }
  for (int t : members_[b]) {
    const uint64_t* r = paths.row(t);
    int rem = 0;
    for (int w = 0; w < words_; ++w) rem += std::popcount(r[w] & o[w]);
    rem_gain_[t] = rem;
  }
}

void TokenRegrouper::MoveToken(const ExpertPathSet& paths, int t, int from, int to) {
  const uint64_t* r = paths.row(t);
  uint16_t* cf = counts_.data() + static_cast<size_t>(from) * bits_;
  uint16_t* ct = counts_.data() + static_cast<size_t>(to) * bits_;
  uint64_t* uf = union_.data() + static_cast<size_t>(from) * words_;
  uint64_t* of = ones_.data() + static_cast<size_t>(from) * words_;
  uint64_t* ut = union_.data() + static_cast<size_t>(to) * words_;
  uint64_t* ot = ones_.data() + static_cast<size_t>(to) * words_;
  for (int w = 0; w < words_; ++w) {
    for (uint64_t x = r[w]; x; x &= x - 1) {
      const int k = std::countr_zero(x);
      const uint64_t m = uint64_t{1} << k;
      const int cfv = --cf[w * 64 + k];
      if (cfv == 0) {
        uf[w] &= ~m;
        of[w] &= ~m;
      } else if (cfv == 1) {
        of[w] |= m;
      }
      const int ctv = ++ct[w * 64 + k];
      if (ctv == 1) {
        ut[w] |= m;
        ot[w] |= m;
      } else if (ctv == 2) {
        ot[w] &= ~m;
      }
    }
  }
  batch_of_[t] = to;
}

int TokenRegrouper::SwapDelta(const ExpertPathSet& paths, int a, int b) const {
  const int bi = batch_of_[a], bj = batch_of_[b];
  const uint64_t* ra = paths.row(a);
  const uint64_t* rb = paths.row(b);
  const uint64_t* ui = union_.data() + static_cast<size_t>(bi) * words_;
  const uint64_t* oi = ones_.data() + static_cast<size_t>(bi) * words_;
  const uint64_t* uj = union_.data() + static_cast<size_t>(bj) * words_;
  const uint64_t* oj = ones_.data() + static_cast<size_t>(bj) * words_;
  int d = 0;
  for (int w = 0; w < words_; ++w) {
    d += std::popcount(rb[w] & ~ui[w]) - std::popcount(ra[w] & oi[w] & ~rb[w]);
    d += std::popcount(ra[w] & ~uj[w]) - std::popcount(rb[w] & oj[w] & ~ra[w]);
  }
  return d;
}

// Simulated annealing over random cross-batch swaps (fixed seed: deterministic), keeping the best
// assignment seen. Escapes the 2-swap local optima that greedy + descent stops in.
void TokenRegrouper::Anneal(const ExpertPathSet& paths) {
  uint64_t rng = 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(n_);
  auto next = [&rng]() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
  };
  int cur = 0;
  for (int b = 0; b < num_batches_; ++b)
    for (int w = 0; w < words_; ++w) cur += std::popcount(union_[b * words_ + w]);
  int best = cur;
  std::vector<int> best_batch = batch_of_;
  const long iters = static_cast<long>(options_.anneal_iters_per_token) * n_;
  const double t0 = options_.anneal_t0, t1 = options_.anneal_t1;
  // Acceptance thresholds for delta = 1..8 per temperature step, precomputed per 1/64th of the run.
  for (long it = 0; it < iters; ++it) {
    const int a = static_cast<int>(next() % n_);
    const int b = static_cast<int>(next() % n_);
    if (batch_of_[a] == batch_of_[b]) continue;
    const int d = SwapDelta(paths, a, b);
    if (d > 0) {
      const double temp = t0 * std::pow(t1 / t0, static_cast<double>(it) / iters);
      const double p = std::exp(-d / temp);
      if (static_cast<double>(next() >> 11) * 0x1.0p-53 >= p) continue;
    }
    if (!SwapFeasible(a, b)) continue;
    const int bi = batch_of_[a], bj = batch_of_[b];
    MoveToken(paths, a, bi, bj);
    MoveToken(paths, b, bj, bi);
    cur += d;
    if (cur < best) {
      best = cur;
      best_batch = batch_of_;
    }
  }
  batch_of_ = best_batch;
  for (auto& m : members_) m.clear();
  for (int i = 0; i < n_; ++i) members_[batch_of_[i]].push_back(i);
  for (int b = 0; b < num_batches_; ++b) RebuildBatch(paths, b);
}

// add_cost_[t][b] after batch b's union changed from `before`: only the words that changed count.
void TokenRegrouper::UpdateAddCosts(const ExpertPathSet& paths, int b, const std::vector<uint64_t>& before) {
  const uint64_t* u = union_.data() + static_cast<size_t>(b) * words_;
  for (int w = 0; w < words_; ++w) {
    if (u[w] == before[w]) continue;
    const uint64_t now_out = ~u[w], was_out = ~before[w];
    for (int t = 0; t < n_; ++t) {
      const uint64_t r = paths.row(t)[w];
      add_cost_[static_cast<size_t>(t) * num_batches_ + b] += std::popcount(r & now_out) - std::popcount(r & was_out);
    }
  }
}

void TokenRegrouper::RefreshRemGains(const ExpertPathSet& paths, int b) {
  const uint64_t* o = ones_.data() + static_cast<size_t>(b) * words_;
  for (int t : members_[b]) {
    const uint64_t* r = paths.row(t);
    int rem = 0;
    for (int w = 0; w < words_; ++w) rem += std::popcount(r[w] & o[w]);
    rem_gain_[t] = rem;
  }
}

bool TokenRegrouper::SwapFeasible(int a, int b) const {
  const int ba = batch_of_[a], bb = batch_of_[b];
  // a goes to bb, b goes to ba. Sequence neighbours must stay ordered (same sequence: never).
  for (int x = prev_[a]; x >= 0; x = prev_[x])
    if (x == b) return false;
  for (int x = next_[a]; x >= 0; x = next_[x])
    if (x == b) return false;
  if (bb > deadline_[a] || ba > deadline_[b]) return false;
  if (prev_[a] >= 0 && batch_of_[prev_[a]] > bb) return false;
  if (next_[a] >= 0 && batch_of_[next_[a]] < bb) return false;
  if (prev_[b] >= 0 && batch_of_[prev_[b]] > ba) return false;
  if (next_[b] >= 0 && batch_of_[next_[b]] < ba) return false;
  return true;
}

int TokenRegrouper::LocalSearch(const ExpertPathSet& paths, int* passes) {
  int swaps = 0;
  *passes = 0;
  const int nb = num_batches_;
  std::vector<uint64_t> old_i(words_), old_j(words_);
  for (int pass = 0; pass < options_.max_swap_passes; ++pass) {
    ++*passes;
    int improved = 0;
    for (int bi = 0; bi < nb; ++bi) {
      for (int bj = bi + 1; bj < nb; ++bj) {
        // Index loops so members_ may change under us (we restart the pair scan after a swap).
        for (size_t ia = 0; ia < members_[bi].size(); ++ia) {
          for (size_t ib = 0; ib < members_[bj].size(); ++ib) {
            const int a = members_[bi][ia], b = members_[bj][ib];
            const int bound = add_cost_[static_cast<size_t>(b) * nb + bi] +
                              add_cost_[static_cast<size_t>(a) * nb + bj] - rem_gain_[a] - rem_gain_[b];
            if (bound >= 0) continue;
            const uint64_t* ra = paths.row(a);
            const uint64_t* rb = paths.row(b);
            const uint64_t* oi = ones_.data() + static_cast<size_t>(bi) * words_;
            const uint64_t* oj = ones_.data() + static_cast<size_t>(bj) * words_;
            int lost = 0;  // bits that stay because the incoming token also has them
            for (int w = 0; w < words_; ++w)
              lost += std::popcount(ra[w] & oi[w] & rb[w]) + std::popcount(rb[w] & oj[w] & ra[w]);
            // exact delta = bound + lost (see header)
            if (bound + lost >= 0) continue;
            if (!SwapFeasible(a, b)) continue;
            members_[bi][ia] = b;
            members_[bj][ib] = a;
            std::copy(union_.begin() + static_cast<size_t>(bi) * words_,
                      union_.begin() + static_cast<size_t>(bi + 1) * words_, old_i.begin());
            std::copy(union_.begin() + static_cast<size_t>(bj) * words_,
                      union_.begin() + static_cast<size_t>(bj + 1) * words_, old_j.begin());
            MoveToken(paths, a, bi, bj);
            MoveToken(paths, b, bj, bi);
            UpdateAddCosts(paths, bi, old_i);
            UpdateAddCosts(paths, bj, old_j);
            RefreshRemGains(paths, bi);
            RefreshRemGains(paths, bj);
            ++swaps;
            ++improved;
          }
        }
      }
    }
    if (improved == 0) break;
  }
  return swaps;
}

}  // namespace ef::scheduler
