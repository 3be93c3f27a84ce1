// Evaluating a predictor on a routing trace.
//
// Metrics at k (default: the trace's top_k). For each token and layer, P = the k most probable
// experts of the forecast, T = the token's true experts at that layer:
//   recall@k    = |P ∩ T| / |T|,  precision@k = |P ∩ T| / |P|
// averaged over tokens, per layer; the overall values average the layers. With k = top_k the
// two coincide (|P| = |T|); a larger k (a larger prefetch budget) trades precision for recall.
//   path recall = the fraction of tokens whose EVERY layer is fully covered (T ⊆ P at all
//                 layers): the chance that a token's whole expert path was prefetched.
//
// Each predictor is evaluated the way it is used:
// - kAPriori (path, frequency): Predict() on the batch, all layers at once, before anything runs.
// - kOneLayerAhead (affinity, hybrid; any ConditionalPredictor): layer l is forecast with the
//   token's TRUE routing of layers 0..l-1 observed (what the engine knows just before layer l);
//   layer 0 has nothing observed. This is the strongest (and the usual) use of affinity
//   statistics, and so the hardest baseline for an a-priori path predictor on layers >= 1.
#pragma once

#include <string>
#include <vector>

#include "placement/predictor.h"
#include "placement/routing_trace.h"

namespace ef::placement {

enum class EvalMode { kAPriori, kOneLayerAhead };

struct PredictorMetrics {
  EvalMode mode = EvalMode::kAPriori;
  int tokens = 0;
  int k = 0;
  std::vector<double> per_layer_recall;
  std::vector<double> per_layer_precision;
  double recall = 0;
  double precision = 0;
  double path_recall = 0;
};

const char* EvalModeName(EvalMode mode);
// kOneLayerAhead for a ConditionalPredictor, kAPriori otherwise.
EvalMode DefaultEvalMode(const Predictor& predictor);

// `trace` must be sorted by (seq, pos) and match the predictor's layers and experts; k = 0
// means the trace's top_k.
StatusOr<PredictorMetrics> EvaluatePredictor(const Predictor& predictor, const RoutingTrace& trace, EvalMode mode,
                                             int k = 0);

}  // namespace ef::placement
