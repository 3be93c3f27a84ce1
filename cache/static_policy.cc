#include "cache/static_policy.h"

namespace ef::cache {

void StaticPolicy::OnHit(const ExpertKey& key, int64_t time) { recency_.Touch(key, time); }
void StaticPolicy::OnInsert(const ExpertKey& key, int64_t time, bool demand) { recency_.Touch(key, time); }

std::optional<ExpertKey> StaticPolicy::ChooseVictim(std::span<const ExpertKey> candidates, int64_t time) {
  return recency_.Pick(candidates, [this](const ExpertKey& k) { return -count_[k.Index(num_experts_)]; });
}

}  // namespace ef::cache
