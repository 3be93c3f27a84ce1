// ForecastShare: the forecast of the experts later MoE layers will need, shared between ranks under
// expert parallelism, so that a rank computing experts for other ranks' tokens can load them ahead
// of need as the rank that owns the tokens does.
//
// Without it only a rank with tokens of its own forecasts: under `generate` or `serve` every token
// is rank 0's, and the other ranks' expert caches loaded on demand only. The expert-parallel
// executor (comm/expert_parallel_executor.h) carries each rank's forecast of the next MoE layers
// with a layer's token counts and hands every rank the forecasts combined, before the rank computes
// that layer (so the loads overlap its compute, as the owning rank's own prefetches do).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace ef::runtime {

class ForecastShare {
 public:
  virtual ~ForecastShare() = default;
  // This rank's own forecast of decoder layer `layer` for the running step, made from its own
  // tokens: need[e] the probability that some token of its batch routes to expert e, `listed` the
  // experts it prefetches for them. False when it has none. The executor asks only a rank with
  // tokens in the step (whose predictor ran for them).
  virtual bool OwnForecast(int layer, std::span<float> need, std::vector<int32_t>* listed) const = 0;
  // The forecasts of every rank that made one, combined over the experts whose rows from that rank
  // come here: need[e] = 1 - prod over those ranks (1 - need_r[e]), `listed` the union of their
  // lists, most needed first. Not called when only this rank forecast the layer (its own forecast
  // stands) or none did.
  virtual void SharedForecast(int layer, std::span<const float> need, std::span<const int32_t> listed) = 0;
  // This rank computes no row of MoE layer `layer` in this step: the prefetches that would have
  // followed that layer's experts start now.
  virtual void ComputesNothing(int layer) = 0;
};

}  // namespace ef::runtime
