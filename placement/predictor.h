// Predictor: forecasts every MoE layer's routing for a batch of tokens before it runs.
//
// Implementations: PathPredictor (learned, ExpertFlow's routing path predictor), Lookahead
// (later layers' routers on the current hidden state), Affinity (inter-layer transitions),
// Frequency (per-layer popularity), Hybrid. Predict() is const and thread-compatible;
// Observe() feeds back the true routing of tokens that ran (online statistics).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "placement/routing_forecast.h"
#include "runtime/core/status.h"

namespace ef::placement {

// One token to forecast.
struct PredictorInput {
  int64_t seq = 0;
  int64_t pos = 0;
  int64_t token = -1;                // token id, -1 when unknown
  std::span<const int32_t> context;  // preceding token ids of the sequence (may be empty)
  std::span<const float> embedding;  // the served model's input embedding of `token` (may be empty)
};

class Predictor {
 public:
  virtual ~Predictor() = default;
  virtual std::string name() const = 0;
  virtual int num_layers() const = 0;
  virtual int num_experts() const = 0;
  virtual StatusOr<RoutingForecast> Predict(std::span<const PredictorInput> batch) const = 0;
  // True routing of one token after it ran: experts[l * top_k + j]. Default: ignored.
  virtual void Observe(const PredictorInput& token, std::span<const int16_t> experts, int top_k) {}
};

}  // namespace ef::placement
