// LruPolicy: see cache_policy.h for the policy's rule and the hook contract.
#pragma once

#include "cache/cache_policy.h"
#include "cache/recency_table.h"

namespace ef::cache {

class LruPolicy final : public CachePolicy {
 public:
  explicit LruPolicy(const PolicyConfig& c) : recency_(c.num_layers, c.num_experts) {}
  std::string_view name() const override { return "lru"; }
  void OnHit(const ExpertKey& key, int64_t time) override;
  void OnInsert(const ExpertKey& key, int64_t time, bool demand) override;
  void OnEvict(const ExpertKey& key) override {}
  std::optional<ExpertKey> ChooseVictim(std::span<const ExpertKey> candidates, int64_t time) override;

 private:
  RecencyTable recency_;
};

}  // namespace ef::cache
