// LookaheadPredictor: the routers of later MoE layers applied to the hidden state of the current
// one (no training). Before MoE layer m runs, the engine already holds the router input h_s of an
// earlier MoE layer s (LayerRouting::hidden); router m on (a rescaled) h_s forecasts layer m's
// experts. The residual stream changes little from layer to layer, so this is accurate one or two
// layers ahead and decays with the distance m - s.
//
// Rescaling (LookaheadOptions::rescale_norm, default on): h_s = RMSNorm(x_s) * g_s, where g_s is
// layer s's post-attention norm weight, while router m sees RMSNorm(x_m) * g_m. The forecast uses
// u = h_s / g_s (the unit-RMS residual direction, elementwise) and router m folded with its own
// norm: logits_m = (W_m * g_m) u. With rescaling off, logits_m = W_m h_s.
// The input embedding is the hidden state "before layer 0" (source -1): u = RMSNorm(embedding),
// without weight, in both modes.
//
// Probabilities are the router's softmax over all experts (a row sums to 1; top-k of it is the
// model's top-k; norm_topk_prob does not change the ranking).
//
// Layers are MoE layers (index among MoE layers), as in routing traces. The predictor owns F32
// copies of every router and norm weight (E x H + H floats per layer); it does not keep the model.
// Predict/PredictGiven are const and thread-compatible.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "placement/conditional_predictor.h"
#include "runtime/engine/model_weights.h"

namespace ef::placement {

struct LookaheadOptions {
  // Layers forecast past the last observed one (PredictGiven) or from the embedding (Predict);
  // rows further ahead get the uniform distribution. 0: every remaining layer.
  int max_lookahead = 0;
  bool rescale_norm = true;  // see the file comment
};

class LookaheadPredictor final : public ConditionalPredictor {
 public:
  // Copies every MoE layer's router [experts, hidden] and post-attention norm weight [hidden]
  // from the checkpoint's host mapping (works whatever backend holds the model).
  static StatusOr<std::unique_ptr<LookaheadPredictor>> FromModel(const runtime::ModelWeights& weights,
                                                                 const LookaheadOptions& options = {});
  // Explicit weights (tests): routers[m] row-major [num_experts * hidden], norms[m] [hidden]
  // (norms may be empty: taken as all ones).
  static StatusOr<std::unique_ptr<LookaheadPredictor>> Create(int hidden, int num_experts, int top_k,
                                                              std::vector<std::vector<float>> routers,
                                                              std::vector<std::vector<float>> norms, float rms_eps,
                                                              const LookaheadOptions& options = {});

  // The model's input embedding of `token` as F32 (from the checkpoint mapping), for
  // PredictorInput::embedding.
  static StatusOr<std::vector<float>> InputEmbedding(const runtime::ModelWeights& weights, int64_t token);

  std::string name() const override { return "lookahead"; }
  int num_layers() const override { return static_cast<int>(routers_.size()); }
  int num_experts() const override { return num_experts_; }
  int top_k() const { return top_k_; }
  int hidden_size() const { return hidden_; }
  const LookaheadOptions& options() const { return options_; }

  // Router `target`'s softmax on a hidden state seen by the router of MoE layer `source`
  // (source -1: `hidden` is an input embedding). out: num_experts values.
  Status LayerProbs(std::span<const float> hidden, int source, int target, float* out) const;

  // Every layer from each token's input embedding (PredictorInput::embedding, required).
  StatusOr<RoutingForecast> Predict(std::span<const PredictorInput> batch) const override;
  // observed[t].num_layers_done = n: rows < n hold the observed experts; rows n.. are forecast
  // from observed[t].hidden, which must be the router input of MoE layer n-1 (LayerRouting::hidden
  // of that layer, one token's row); with n = 0, from the embedding as in Predict().
  StatusOr<RoutingForecast> PredictGiven(std::span<const PredictorInput> batch,
                                         std::span<const ObservedRouting> observed) const override;

 private:
  LookaheadPredictor() = default;
  // Fills rows [first, L) of token t from `hidden` seen at MoE layer `source`.
  Status FillFrom(std::span<const float> hidden, int source, int first, RoutingForecast* f, int t) const;

  int hidden_ = 0, num_experts_ = 0, top_k_ = 0;
  float rms_eps_ = 1e-6f;
  LookaheadOptions options_;
  std::vector<std::vector<float>> routers_;   // [layer][expert * hidden]: W_m
  std::vector<std::vector<float>> folded_;    // [layer][expert * hidden]: W_m * g_m
  std::vector<std::vector<float>> inv_norm_;  // [layer][hidden]: 1 / g_m (0 where g_m is ~0)
};

}  // namespace ef::placement
