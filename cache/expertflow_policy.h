// ExpertflowPolicy: forecast-driven replacement after the ExpertFlow paper (arXiv 2410.17954);
// see cache_policy.h for the rule and the hook contract.
//
// Predicted need distance of (l, e) at current layer c, with L layers, forecast tokens t = 0..D-1
// (t = 0 the running token): the smallest t*L + l - c over forecast entries with
// prob[t][l][e] >= need_threshold, skipping t = 0, l < c (already past). No such entry: not needed.
// The victim is a not-needed candidate if one exists, else the candidate needed furthest away;
// candidates needed by the current plan (t = 0) are taken only when every candidate is; ties
// -> the fewest demand accesses so far (as LfuPolicy), then least recently used. Without a
// forecast it is LFU: on the shared traces LFU keeps more hits than LRU (Mixtral, 4 slots per
// layer: 0.613 vs 0.601; FLAME-MoE, 16 slots: 0.294 vs 0.261).
#pragma once

#include <vector>

#include "cache/cache_policy.h"
#include "cache/recency_table.h"

namespace ef::cache {

class ExpertflowPolicy final : public CachePolicy {
 public:
  explicit ExpertflowPolicy(const PolicyConfig& c);
  std::string_view name() const override { return "expertflow"; }
  void OnHit(const ExpertKey& key, int64_t time) override;
  void OnInsert(const ExpertKey& key, int64_t time, bool demand) override;
  void OnEvict(const ExpertKey& key) override {}
  std::optional<ExpertKey> ChooseVictim(std::span<const ExpertKey> candidates, int64_t time) override;
  void SetForecast(const placement::RoutingForecast& forecast) override;
  void SetCurrentLayer(int layer) override { current_layer_ = layer; }

  static constexpr int64_t kNotNeeded = INT64_MAX;
  // The need distance defined above (kNotNeeded when the forecast does not need the expert).
  int64_t NeedDistance(const ExpertKey& key) const;

 private:
  int num_layers_;
  int num_experts_;
  float threshold_;
  int current_layer_ = 0;
  RecencyTable recency_;
  std::vector<int64_t> count_;  // demand accesses seen so far, per (layer, expert), as LfuPolicy
  placement::RoutingForecast forecast_;
};

}  // namespace ef::cache
