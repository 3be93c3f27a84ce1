// RowBalancer: the planned placement of one MoE layer's rows (cluster.placement_mode: planned).
//
// Input: rows[s * E + e], the (token, expert) rows of expert e whose tokens live on rank s (every
// rank all-gathers them at the layer), and the static plan: which rank computes expert e for
// source rank s (ExpertPlacement::ComputeRank). Output: the rank that computes each (s, e).
//
// Starting from the static plan, while the busiest rank's rows exceed `max_imbalance` x the mean,
// the (s, e) block computed on the busiest rank whose move lowers the maximum most is moved to its
// source rank s: those rows then stay where their tokens are, so all-to-all bytes never grow (a
// block already on its source is never moved). A move must leave both ranks below the old maximum;
// when no move does, planning stops above the bound. Moves are whole (s, e) blocks, so a rank
// computes an expert for its own tokens with weights from its expert source (its cache's peer tier
// or comm::PeerExpertSource when it is not home for the expert).
//
// Deterministic: integers only, ties broken by (expert, source) order, so every rank computes the
// same plan from the same gathered counts without exchanging it. Stateless and thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace ef::comm {

struct RowPlan {
  std::vector<int> compute;  // [s * E + e] -> rank
  int64_t total_rows = 0;
  int64_t static_max_rows = 0;  // the busiest rank under the static plan
  int64_t max_rows = 0;         // ... under this plan
  int64_t rows_moved = 0;       // rows computed on their source rank instead of their static rank
};

class RowBalancer {
 public:
  // rows and static_compute have num_ranks * num_experts entries; max_imbalance >= 1.
  static RowPlan Plan(std::span<const int64_t> rows, std::span<const int> static_compute, int num_ranks,
                      int num_experts, double max_imbalance);
};

}  // namespace ef::comm
