// HybridPredictor: the path predictor's forecast mixed, layer by layer, with the affinity
// predictor's forecast from the routing observed so far:
//   prob_l = w_l * path_l(given layers < l) + (1 - w_l) * affinity_l(given the true experts of l-1)
// Before anything is observed (Predict, or layer 0) it is the path forecast. The weights w_l
// are fitted on a validation trace (FitWeights). This is what an engine that corrects its
// prefetches layer by layer would use; the path forecast alone drives the whole-batch plan.
#pragma once

#include <memory>
#include <vector>

#include "placement/affinity_predictor.h"
#include "placement/conditional_predictor.h"
#include "placement/path_predictor.h"

namespace ef::placement {

class HybridPredictor final : public ConditionalPredictor {
 public:
  HybridPredictor(std::unique_ptr<PathPredictor> path, std::unique_ptr<AffinityPredictor> affinity,
                  std::vector<float> weights);

  // Chooses each w_l in {0, 0.1, ..., 1} by one-layer-ahead top-k recall on `val` (sorted by
  // (seq, pos)); w_0 = 1. An empty `val` leaves the weights at 0.5.
  Status FitWeights(const RoutingTrace& val);

  std::string name() const override { return "hybrid"; }
  int num_layers() const override { return path_->num_layers(); }
  int num_experts() const override { return path_->num_experts(); }
  const std::vector<float>& weights() const { return weights_; }
  const PathPredictor& path() const { return *path_; }
  const AffinityPredictor& affinity() const { return *affinity_; }

  StatusOr<RoutingForecast> Predict(std::span<const PredictorInput> batch) const override;
  StatusOr<RoutingForecast> PredictGiven(std::span<const PredictorInput> batch,
                                         std::span<const ObservedRouting> observed) const override;
  void Observe(const PredictorInput& token, std::span<const int16_t> experts, int top_k) override;

  void ToFile(PredictorFile* file, const std::string& prefix) const;
  static StatusOr<std::unique_ptr<HybridPredictor>> FromFile(const PredictorFile& file, const std::string& prefix,
                                                             int num_layers, int num_experts, int top_k,
                                                             const std::string& path);

 private:
  std::unique_ptr<PathPredictor> path_;
  std::unique_ptr<AffinityPredictor> affinity_;
  std::vector<float> weights_;  // [layer]
};

}  // namespace ef::placement
