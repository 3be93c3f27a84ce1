#include "placement/predictor_eval.h"

#include <algorithm>
#include <numeric>

#include "placement/conditional_predictor.h"
#include "placement/trace_inputs.h"

namespace ef::placement {

const char* EvalModeName(EvalMode mode) { return mode == EvalMode::kAPriori ? "a-priori" : "one-layer-ahead"; }

EvalMode DefaultEvalMode(const Predictor& predictor) {
  return dynamic_cast<const ConditionalPredictor*>(&predictor) ? EvalMode::kOneLayerAhead : EvalMode::kAPriori;
}

StatusOr<PredictorMetrics> EvaluatePredictor(const Predictor& predictor, const RoutingTrace& trace, EvalMode mode,
                                             int k) {
  const int L = trace.num_layers(), E = trace.num_experts(), K = trace.top_k();
  if (trace.tokens.empty()) return InvalidArgument("cannot evaluate a predictor on an empty trace");
  if (predictor.num_layers() != L || predictor.num_experts() != E)
    return InvalidArgument("predictor \"" + predictor.name() + "\" is for " + std::to_string(predictor.num_layers()) +
                           " layers x " + std::to_string(predictor.num_experts()) + " experts, the trace has " +
                           std::to_string(L) + " x " + std::to_string(E));
  if (k == 0) k = K;
  if (k < 1 || k > E) return InvalidArgument("evaluation k=" + std::to_string(k) + " out of range [1, num_experts]");
  const int n = static_cast<int>(trace.tokens.size());
  TraceInputs in(trace);

  // forecast rows used for scoring: [token][layer][expert]
  RoutingForecast scored(n, L, E);
  if (mode == EvalMode::kAPriori) {
    EF_ASSIGN_OR_RETURN(scored, predictor.Predict(in.inputs()));
  } else {
    auto* cond = dynamic_cast<const ConditionalPredictor*>(&predictor);
    if (!cond) return InvalidArgument("predictor \"" + predictor.name() + "\" cannot be evaluated one layer ahead");
    for (int l = 0; l < L; ++l) {
      std::vector<ObservedRouting> obs(n);
      for (int t = 0; t < n; ++t) obs[t] = {l, trace.tokens[t].experts, K, {}};
      EF_ASSIGN_OR_RETURN(RoutingForecast f, cond->PredictGiven(in.inputs(), obs));
      for (int t = 0; t < n; ++t) std::copy(f.row(t, l), f.row(t, l) + E, scored.row(t, l));
    }
  }
  if (scored.num_tokens != n || scored.num_layers != L || scored.num_experts != E)
    return Internal("predictor \"" + predictor.name() + "\" returned a forecast of the wrong shape");

  PredictorMetrics m;
  m.mode = mode;
  m.tokens = n;
  m.k = k;
  m.per_layer_recall.assign(L, 0.0);
  m.per_layer_precision.assign(L, 0.0);
  int full_paths = 0;
  for (int t = 0; t < n; ++t) {
    bool full = true;
    for (int l = 0; l < L; ++l) {
      std::vector<int> top = scored.TopK(t, l, k);
      std::vector<int> truth(trace.tokens[t].experts.begin() + static_cast<size_t>(l) * K,
                             trace.tokens[t].experts.begin() + static_cast<size_t>(l + 1) * K);
      std::sort(truth.begin(), truth.end());
      truth.erase(std::unique(truth.begin(), truth.end()), truth.end());
      int hit = 0;
      for (int e : truth) hit += std::find(top.begin(), top.end(), e) != top.end();
      m.per_layer_recall[l] += static_cast<double>(hit) / truth.size();
      m.per_layer_precision[l] += static_cast<double>(hit) / top.size();
      full = full && hit == static_cast<int>(truth.size());
    }
    full_paths += full;
  }
  for (int l = 0; l < L; ++l) {
    m.per_layer_recall[l] /= n;
    m.per_layer_precision[l] /= n;
  }
  m.recall = std::accumulate(m.per_layer_recall.begin(), m.per_layer_recall.end(), 0.0) / L;
  m.precision = std::accumulate(m.per_layer_precision.begin(), m.per_layer_precision.end(), 0.0) / L;
  m.path_recall = static_cast<double>(full_paths) / n;
  return m;
}

}  // namespace ef::placement
