// FrequencyPredictor: every token gets each layer's expert popularity, estimated from a
// training trace: prob[l][e] = (count(e chosen at l) + top_k/E) / (tokens + 1), the smoothed
// marginal probability that e is among the token's top-k at l (a row sums to top_k).
//
// Observe() keeps counting online; with decay d in (0, 1) each observation first scales the old
// counts of every layer by d (an exponential moving average over roughly 1/(1-d) tokens).
// Predict() is const and thread-compatible; Observe() needs external synchronisation.
#pragma once

#include <memory>
#include <vector>

#include "placement/predictor.h"
#include "placement/predictor_io.h"
#include "placement/routing_trace.h"

namespace ef::placement {

class FrequencyPredictor final : public Predictor {
 public:
  FrequencyPredictor(int num_layers, int num_experts, int top_k, double decay = 1.0);
  // Counts the trace's routing. The trace must be non-empty.
  static StatusOr<std::unique_ptr<FrequencyPredictor>> Fit(const RoutingTrace& trace, double decay = 1.0);

  std::string name() const override { return "frequency"; }
  int num_layers() const override { return num_layers_; }
  int num_experts() const override { return num_experts_; }
  int top_k() const { return top_k_; }
  StatusOr<RoutingForecast> Predict(std::span<const PredictorInput> batch) const override;
  void Observe(const PredictorInput& token, std::span<const int16_t> experts, int top_k) override;

  // The smoothed marginal probabilities of one layer (num_experts values).
  std::vector<float> LayerProbs(int layer) const;

  // Serialization under `prefix` ("" for a file of its own).
  void ToFile(PredictorFile* file, const std::string& prefix) const;
  static StatusOr<std::unique_ptr<FrequencyPredictor>> FromFile(const PredictorFile& file, const std::string& prefix,
                                                                int num_layers, int num_experts, int top_k,
                                                                const std::string& path);

 private:
  int num_layers_, num_experts_, top_k_;
  double decay_;
  std::vector<double> counts_;  // [layer][expert]
  std::vector<double> tokens_;  // [layer] (decayed) token count
};

}  // namespace ef::placement
