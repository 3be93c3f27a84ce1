// BeladyPolicy: offline optimal replacement (MIN); see cache_policy.h for the hook contract.
// Needs the whole future access sequence; `time` must index it.
#pragma once

#include <vector>

#include "cache/cache_policy.h"
#include "cache/recency_table.h"

namespace ef::cache {

class BeladyPolicy final : public CachePolicy {
 public:
  explicit BeladyPolicy(const PolicyConfig& c);
  std::string_view name() const override { return "belady"; }
  void OnHit(const ExpertKey& key, int64_t time) override { recency_.Touch(key, time); }
  void OnInsert(const ExpertKey& key, int64_t time, bool demand) override { recency_.Touch(key, time); }
  void OnEvict(const ExpertKey& key) override {}
  std::optional<ExpertKey> ChooseVictim(std::span<const ExpertKey> candidates, int64_t time) override;

  // Index of the next access to `key` strictly after `time`, or INT64_MAX when there is none.
  int64_t NextUse(const ExpertKey& key, int64_t time);

 private:
  int num_experts_;
  RecencyTable recency_;
  std::vector<std::vector<int64_t>> uses_;  // per (layer, expert): access indices, increasing
  std::vector<size_t> cursor_;              // per (layer, expert): first use not yet known to be past
};

}  // namespace ef::cache
