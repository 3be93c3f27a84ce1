// RecencyTable: last-use time per (layer, expert), the LRU tie-break every policy shares.
#pragma once

#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "cache/expert_key.h"

namespace ef::cache {

class RecencyTable {
 public:
  RecencyTable(int num_layers, int num_experts)
      : num_experts_(num_experts), last_(static_cast<size_t>(num_layers) * num_experts, -1) {}

  void Touch(const ExpertKey& k, int64_t time) { last_[k.Index(num_experts_)] = time; }
  int64_t LastUse(const ExpertKey& k) const { return last_[k.Index(num_experts_)]; }

  // Among candidates, the one maximising (score, -last use): highest score, then least recent.
  // Ties on both keep the first candidate (deterministic).
  template <typename Score>
  ExpertKey Pick(std::span<const ExpertKey> candidates, Score score) const {
    size_t best = 0;
    auto best_score = score(candidates[0]);
    for (size_t i = 1; i < candidates.size(); ++i) {
      auto s = score(candidates[i]);
      if (s > best_score || (s == best_score && LastUse(candidates[i]) < LastUse(candidates[best]))) {
        best = i;
        best_score = s;
      }
    }
    return candidates[best];
  }

 private:
  int num_experts_;
  std::vector<int64_t> last_;
};

}  // namespace ef::cache
