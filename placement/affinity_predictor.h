// AffinityPredictor: inter-layer transition statistics. From a training trace it counts, for
// each layer l >= 1, how often expert b is chosen at l by a token that chose expert a at l-1:
//   P(b at l | a at l-1) = (count(a -> b) + beta * f_l(b)) / (count(a at l-1) + beta)
// where f_l is layer l's popularity (FrequencyPredictor) and beta a small prior weight. Given
// the token's true experts S at l-1, prob_l(b) = (1/|S|) sum_{a in S} P(b | a) (sums to top_k).
//
// Two ways to use it, and each is evaluated the way it is used (placement/predictor_eval.h):
// - PredictGiven() (ConditionalPredictor): the engine knows layer l-1's true routing before
//   layer l runs; this forecasts layer l from it (and chains beyond). This is the baseline the
//   evaluation reports ("one layer ahead", layer 0 from popularity).
// - Predict(): nothing observed; layer 0 is popularity and each later layer chains the
//   distribution: prob_l(b) = (1/top_k) sum_a prob_{l-1}(a) P(b | a). Much weaker.
// Observe() adds the true routing of a token to the statistics (online).
#pragma once

#include <memory>
#include <vector>

#include "placement/conditional_predictor.h"
#include "placement/frequency_predictor.h"
#include "placement/predictor_io.h"
#include "placement/routing_trace.h"

namespace ef::placement {

class AffinityPredictor final : public ConditionalPredictor {
 public:
  AffinityPredictor(int num_layers, int num_experts, int top_k, double beta = 1.0);
  static StatusOr<std::unique_ptr<AffinityPredictor>> Fit(const RoutingTrace& trace, double beta = 1.0);

  std::string name() const override { return "affinity"; }
  int num_layers() const override { return num_layers_; }
  int num_experts() const override { return num_experts_; }
  int top_k() const { return top_k_; }
  StatusOr<RoutingForecast> Predict(std::span<const PredictorInput> batch) const override;
  StatusOr<RoutingForecast> PredictGiven(std::span<const PredictorInput> batch,
                                         std::span<const ObservedRouting> observed) const override;
  void Observe(const PredictorInput& token, std::span<const int16_t> experts, int top_k) override;

  void ToFile(PredictorFile* file, const std::string& prefix) const;
  static StatusOr<std::unique_ptr<AffinityPredictor>> FromFile(const PredictorFile& file, const std::string& prefix,
                                                               int num_layers, int num_experts, int top_k,
                                                               const std::string& path);

 private:
  // P(b at layer | a at layer-1) for all b, written to out (num_experts values).
  void Transition(int layer, int a, float* out) const;
  // Fills rows layer0 .. L-1 of `f` for token t, given row layer0-1 already holds a distribution.
  void Chain(RoutingForecast* f, int t, int from_layer) const;

  int num_layers_, num_experts_, top_k_;
  double beta_;
  FrequencyPredictor freq_;
  std::vector<double> trans_;  // [layer-1][a][b], layers 1..L-1
  std::vector<double> from_;   // [layer-1][a]: tokens with a at layer-1
};

}  // namespace ef::placement
