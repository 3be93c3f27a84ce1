#include "cache/lru_policy.h"

namespace ef::cache {

void LruPolicy::OnHit(const ExpertKey& key, int64_t time) { recency_.Touch(key, time); }
void LruPolicy::OnInsert(const ExpertKey& key, int64_t time, bool demand) { recency_.Touch(key, time); }

std::optional<ExpertKey> LruPolicy::ChooseVictim(std::span<const ExpertKey> candidates, int64_t time) {
  return recency_.Pick(candidates, [](const ExpertKey&) { return 0; });
}

}  // namespace ef::cache
