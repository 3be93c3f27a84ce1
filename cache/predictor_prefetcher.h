// PredictorPrefetcher: turns a routing predictor's forecast into an expert cache's prefetch list.
// It runs as an engine routing hook: at MoE layer m, once the router has run (the truth for m),
// it forecasts, for the batch's tokens, the experts of the next `depth` MoE layers and hands each
// layer's list to the cache (UpcomingSink -> SetUpcoming), which loads them while layer m computes
// (OnRouting(m) runs right after the hooks). It also gives the `expertflow` policy the step's
// forecast (ForecastSink -> ExpertStore::SetForecast): the current layer's true experts and the
// predicted ones, probability 1, so eviction spares what the step still needs.
//
// Predictors (PredictorPrefetcherOptions::kind; layers below are MoE layers):
//   lookahead  the routers of layers m+1.. applied to layer m's router input (LayerRouting::hidden;
//              the engine must expose router inputs, see needs_router_inputs()); no training.
//   frequency  each layer's expert popularity: from a trained file (`path`), else fitted on a
//              routing trace (`trace`), else counted online from the routing seen so far.
//   path       ExpertFlow's routing path predictor (trained file): the next layers of a token from
//              the token, its context and its routing so far, at each MoE layer (files without
//              path inputs: every layer a priori, once per forward at the first MoE layer).
//   affinity, hybrid  (trained files) conditioned on the true routing of layers 0..m.
// A token's forecast for a layer is its predictor top-k; a layer's list is the union over the
// batch's tokens, most expected first (sum of the tokens' probabilities), cut at `capacity` (the
// layer's slots: prefetching more would evict what was just prefetched); of it, the experts some
// token needs with probability >= min_prob are prefetched, and the cache loads one only when it is
// min_prob more probable than the resident it would evict (ExpertStore::PrefetchSet).
//
// Counters: for each MoE layer after the first, how many of the experts the router chose had been
// prefetched, that is forecast and let through min_prob (forecast_recall() = hits / chosen): the
// prefetch accuracy the cache sees.
//
// Not thread-safe: driven by the engine thread through the hook. The sinks are called from it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "placement/conditional_predictor.h"
#include "placement/frequency_predictor.h"
#include "placement/lookahead_predictor.h"
#include "placement/routing_forecast.h"
#include "placement/routing_trace.h"
#include "runtime/engine/engine.h"

namespace ef::cache {

struct PredictorPrefetcherOptions {
  std::string kind = "frequency";  // lookahead | frequency | path | affinity | hybrid
  std::string path;                // trained predictor file (needed by path, affinity, hybrid)
  int depth = 1;                   // MoE layers forecast ahead of the current one, >= 1
  // A listed expert is prefetched only when the forecast gives at least this probability that some
  // token of the batch routes to it, 1 - prod_t (1 - p_t(e)) (0: every listed expert); the policy's
  // forecast still protects every listed expert from eviction. On an expert cache bound by its
  // copies (batch-1 decode over PCIe) a wrong prefetch costs a whole expert copy while a right one
  // saves little compute overlap, so only near-certain experts should load; in a large batch most
  // experts are near-certain.
  double min_prob = 0;
  // Slots of each decoder layer (experts a layer's list may hold); empty: num_experts everywhere.
  std::vector<int> capacity;
  // frequency without a file: fitted on this trace (its shape must match the model's MoE layers).
  const placement::RoutingTrace* trace = nullptr;
};

class PredictorPrefetcher {
 public:
  // (decoder layer, experts of its next run, most expected first, and per expert of the layer the
  // probability that some token of the batch uses it: 1 - prod_t (1 - p_t(e))).
  using UpcomingSink = std::function<void(int layer, std::vector<int32_t> experts, std::vector<float> need)>;
  // A forecast of the running step: [1 token, decoder layers, experts].
  using ForecastSink = std::function<void(const placement::RoutingForecast& forecast)>;

  // Unknown kind, a missing or unreadable file, a file of another kind or trained for another
  // shape (naming both shapes) -> InvalidArgument / NotFound.
  static StatusOr<std::unique_ptr<PredictorPrefetcher>> Create(const runtime::ModelWeights& model,
                                                               const PredictorPrefetcherOptions& options,
                                                               UpcomingSink upcoming, ForecastSink forecast);

  // The hook body: call with every MoE layer's routing, in layer order.
  Status OnRouting(const runtime::LayerRouting& routing);
  // lookahead needs LayerRouting::hidden (Engine::set_expose_router_inputs(true)).
  bool needs_router_inputs() const { return lookahead_ != nullptr; }
  // "lookahead", "frequency (online)", "path (FILE)", ...
  const std::string& description() const { return description_; }

  int64_t forecast_hits() const { return forecast_hits_; }
  int64_t forecast_chosen() const { return forecast_chosen_; }
  void ResetStats() { forecast_hits_ = forecast_chosen_ = 0; }
  double forecast_recall() const {
    return forecast_chosen_ ? static_cast<double>(forecast_hits_) / forecast_chosen_ : 0.0;
  }

 private:
  // The tail of a sequence's token ids, for the path predictor's context.
  struct History {
    int64_t first_pos = 0;
    std::vector<int32_t> tokens;  // positions first_pos ..
    int64_t last_step = 0;
  };
  PredictorPrefetcher() = default;
  // At a forward's first MoE layer: predictor inputs of its rows (path), a-priori forecast.
  Status BeginForward(const runtime::LayerRouting& r);
  // Per-token probabilities of MoE layer `target` forecast at MoE layer `m`, into probs_ [T][E].
  Status TokenProbs(const runtime::LayerRouting& r, int m, int target);

  const runtime::ModelConfig* config_ = nullptr;
  PredictorPrefetcherOptions options_;
  std::string description_;
  UpcomingSink upcoming_;
  ForecastSink forecast_;
  std::vector<int> moe_layers_;  // decoder layer of each MoE layer

  std::unique_ptr<placement::LookaheadPredictor> lookahead_;
  std::unique_ptr<placement::FrequencyPredictor> frequency_;  // online or loaded
  std::unique_ptr<placement::Predictor> loaded_;              // path / affinity / hybrid
  const placement::ConditionalPredictor* conditional_ = nullptr;
  bool observe_online_ = false;

  // Per forward.
  int num_tokens_ = 0;
  std::vector<int16_t> observed_;  // [token][moe layer * top_k + j], -1 unknown
  std::vector<placement::PredictorInput> inputs_;
  placement::RoutingForecast apriori_;           // a-priori path models: [T, moe layers, E]
  placement::RoutingForecast conditional_f_;     // the others, given layers 0..m
  std::vector<float> probs_;                     // [T][E] scratch
  std::vector<std::vector<int32_t>> predicted_;  // per MoE layer: the last list handed out
  placement::RoutingForecast step_;              // [1, decoder layers, E] for the policy

  std::unordered_map<int64_t, History> history_;
  int64_t step_count_ = 0;
  int64_t forecast_hits_ = 0, forecast_chosen_ = 0;
};

}  // namespace ef::cache
