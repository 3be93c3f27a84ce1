// ConditionalPredictor: a Predictor that can also forecast the remaining layers of a token once
// the routing of its first layers is known (the engine knows layer l-1's true routing, and the
// hidden state entering layer l, before layer l runs).
//
// AffinityPredictor conditions on the observed experts of the previous layer; HybridPredictor
// mixes a path forecast with that; a LookaheadPredictor (applying later layers' routers to the
// current hidden state) implements this interface with ObservedRouting::hidden once the engine
// exposes routers and hidden states. Rows of layers < num_layers_done in the returned forecast
// hold the observed routing (probability 1 for each observed expert, 0 elsewhere).
// PredictGiven() is const and thread-compatible, like Predict().
#pragma once

#include <cstdint>
#include <span>

#include "placement/predictor.h"

namespace ef::placement {

struct ObservedRouting {
  int num_layers_done = 0;           // layers 0 .. num_layers_done-1 have run
  std::span<const int16_t> experts;  // [l * top_k + j] for l < num_layers_done (may be longer)
  int top_k = 0;                     // experts per layer in `experts`
  std::span<const float> hidden;     // hidden state entering layer num_layers_done (may be empty)
  // Layers after the observed ones that the caller reads (0: all). A predictor may leave the rows
  // of later layers empty (zero) to save work.
  int horizon = 0;
};

class ConditionalPredictor : public Predictor {
 public:
  // observed.size() must equal batch.size().
  virtual StatusOr<RoutingForecast> PredictGiven(std::span<const PredictorInput> batch,
                                                 std::span<const ObservedRouting> observed) const = 0;
};

}  // namespace ef::placement
