// StaticPolicy: see cache_policy.h for the policy's rule and the hook contract.
#pragma once

#include "cache/cache_policy.h"
#include "cache/recency_table.h"

namespace ef::cache {

class StaticPolicy final : public CachePolicy {
 public:
  // config.counts must hold num_layers * num_experts entries (checked by MakeCachePolicy).
  explicit StaticPolicy(const PolicyConfig& c)
      : num_experts_(c.num_experts), recency_(c.num_layers, c.num_experts), count_(c.counts) {}
  std::string_view name() const override { return "static"; }
  void OnHit(const ExpertKey& key, int64_t time) override;
  void OnInsert(const ExpertKey& key, int64_t time, bool demand) override;
  void OnEvict(const ExpertKey& key) override {}
  std::optional<ExpertKey> ChooseVictim(std::span<const ExpertKey> candidates, int64_t time) override;

 private:
  int num_experts_;
  RecencyTable recency_;
  std::vector<int64_t> count_;  // given up front, never updated
};

}  // namespace ef::cache
