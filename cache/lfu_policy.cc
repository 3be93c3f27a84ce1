#include "cache/lfu_policy.h"

namespace ef::cache {

void LfuPolicy::OnHit(const ExpertKey& key, int64_t time) {
  recency_.Touch(key, time);
  ++count_[key.Index(num_experts_)];
}

void LfuPolicy::OnInsert(const ExpertKey& key, int64_t time, bool demand) {
  recency_.Touch(key, time);
  if (demand) ++count_[key.Index(num_experts_)];
}

std::optional<ExpertKey> LfuPolicy::ChooseVictim(std::span<const ExpertKey> candidates, int64_t time) {
  // Highest score = lowest count.
  return recency_.Pick(candidates, [this](const ExpertKey& k) { return -count_[k.Index(num_experts_)]; });
}

}  // namespace ef::cache
