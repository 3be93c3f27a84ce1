#include "cache/belady_policy.h"

#include <limits>

namespace ef::cache {

BeladyPolicy::BeladyPolicy(const PolicyConfig& c)
    : num_experts_(c.num_experts),
      recency_(c.num_layers, c.num_experts),
      uses_(static_cast<size_t>(c.num_layers) * c.num_experts),
      cursor_(uses_.size(), 0) {
  for (size_t t = 0; t < c.future.size(); ++t)
    uses_[c.future[t].Index(num_experts_)].push_back(static_cast<int64_t>(t));
}

int64_t BeladyPolicy::NextUse(const ExpertKey& key, int64_t time) {
  // `time` never decreases, so each cursor only moves forward: amortised O(1) per access.
  const size_t i = key.Index(num_experts_);
  const auto& uses = uses_[i];
  size_t& c = cursor_[i];
  while (c < uses.size() && uses[c] <= time) ++c;
  return c < uses.size() ? uses[c] : std::numeric_limits<int64_t>::max();
}

std::optional<ExpertKey> BeladyPolicy::ChooseVictim(std::span<const ExpertKey> candidates, int64_t time) {
  return recency_.Pick(candidates, [&](const ExpertKey& k) { return NextUse(k, time); });
}

}  // namespace ef::cache
