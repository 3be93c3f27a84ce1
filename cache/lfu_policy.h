// LfuPolicy: see cache_policy.h for the policy's rule and the hook contract.
#pragma once

#include "cache/cache_policy.h"
#include "cache/recency_table.h"

namespace ef::cache {

class LfuPolicy final : public CachePolicy {
 public:
  explicit LfuPolicy(const PolicyConfig& c)
      : num_experts_(c.num_experts),
        recency_(c.num_layers, c.num_experts),
        count_(static_cast<size_t>(c.num_layers) * c.num_experts, 0) {}
  std::string_view name() const override { return "lfu"; }
  void OnHit(const ExpertKey& key, int64_t time) override;
  void OnInsert(const ExpertKey& key, int64_t time, bool demand) override;
  void OnEvict(const ExpertKey& key) override {}
  std::optional<ExpertKey> ChooseVictim(std::span<const ExpertKey> candidates, int64_t time) override;

 private:
  int num_experts_;
  RecencyTable recency_;
  std::vector<int64_t> count_;  // demand accesses seen so far, per (layer, expert)
};

}  // namespace ef::cache
