#include "cache/expertflow_policy.h"

#include <tuple>

namespace ef::cache {

ExpertflowPolicy::ExpertflowPolicy(const PolicyConfig& c)
    : num_layers_(c.num_layers),
      num_experts_(c.num_experts),
      threshold_(c.need_threshold),
      recency_(c.num_layers, c.num_experts),
      count_(static_cast<size_t>(c.num_layers) * c.num_experts, 0) {}

void ExpertflowPolicy::OnHit(const ExpertKey& key, int64_t time) {
  recency_.Touch(key, time);
  ++count_[key.Index(num_experts_)];
}

void ExpertflowPolicy::OnInsert(const ExpertKey& key, int64_t time, bool demand) {
  recency_.Touch(key, time);
  if (demand) ++count_[key.Index(num_experts_)];
}

void ExpertflowPolicy::SetForecast(const placement::RoutingForecast& forecast) {
  // A forecast of another shape is ignored (the policy degrades to LRU) rather than misread.
  if (forecast.num_layers != num_layers_ || forecast.num_experts != num_experts_) {
    forecast_ = placement::RoutingForecast();
    return;
  }
  forecast_ = forecast;
}

int64_t ExpertflowPolicy::NeedDistance(const ExpertKey& key) const {
  for (int t = 0; t < forecast_.num_tokens; ++t) {
    if (t == 0 && key.layer < current_layer_) continue;
    if (forecast_.row(t, key.layer)[key.expert] >= threshold_)
      return static_cast<int64_t>(t) * num_layers_ + key.layer - current_layer_;
  }
  return kNotNeeded;
}

std::optional<ExpertKey> ExpertflowPolicy::ChooseVictim(std::span<const ExpertKey> candidates, int64_t time) {
  // Score (not needed by the plan, need distance, fewest demand accesses): plan-needed candidates
  // rank below all others; among equally needed ones the least used goes first, as in LFU.
  return recency_.Pick(candidates, [&](const ExpertKey& k) {
    const int64_t d = NeedDistance(k);
    const bool plan_needs = d != kNotNeeded && d < num_layers_ - current_layer_;
    return std::tuple<bool, int64_t, int64_t>(!plan_needs, d, -count_[k.Index(num_experts_)]);
  });
}

}  // namespace ef::cache
