// PathPredictor: ExpertFlow's routing path predictor. A small learned model maps a token, its
// context and the part of its routing path already observed to the expert probabilities of ALL
// layers in one pass:
//
//   x = [ tok_emb[token] ; prev_emb[previous token] ; mean(ctx_emb[the context_window tokens
//         before that]) ; position features (pos == 0, pos/1024, log1p(pos)/log1p(4096), 1/(1+pos))
//         ; path: multi-hot of the observed experts of layers d-W..d-1 (L * E; W = path_window)
//         ; depth: one-hot of d, the number of layers observed (L) ]
//   h = ReLU(W1 x + b1)                      (hidden units)
//   z = W2 h + b2 + W_path [path; depth]     (num_layers * num_experts logits; b2 starts at the
//                                             logit of each expert's training popularity; the
//                                             linear path term acts like learned transitions)
//   net[l][e]  = w_l * sigmoid(z[l][e]) + (1 - w_l) * sigmoid(z'[l][e])   (z': token ids "unknown")
//   prob[l][e] = a_l * net[l][e] + (1 - a_l) * popularity_l(e)
//
// With d = 0 (Predict) it forecasts every layer before the batch runs, from the token alone.
// As layers run, PredictGiven() re-forecasts the remaining layers from the observed prefix of
// the path (the real-time correction): on traces where token identity says little about routing
// but a token's earlier experts say much about its later ones (FLAME-MoE), the prefix carries
// the forecast; where tokens decide routing (tiny-code-moe), the token part does.
//
// The embeddings are learned by the predictor itself over the token ids seen in training
// (index 0: unknown token, 1: no previous token); token dropout trains the unknown embedding, so
// the same network also forecasts without token ids (z'). a_l, the per-layer trust in the
// network, and w_l, the weight of its view with token ids, are chosen on the validation split,
// separately for the a-priori forecast (d = 0) and the corrected one (layer l forecast at d = l):
// where routing does not follow token identity (FLAME-MoE) the view without ids wins, and the
// forecast falls back to popularity on layers where the network does not beat it. The served
// model's input embedding (PredictorInput::embedding) is not used yet.
//
// Training (Train): binary cross-entropy against the multi-hot target (the token's top-k experts
// per layer) on the layers not observed, Adam (lazy on W_path: only the rows a batch touches),
// shuffled mini-batches; each epoch shows every token with d = 0 and with path_samples distinct
// depths drawn from 1..L-1. Early stopping on validation recall (the mean of the a-priori and
// the one-layer-ahead recall), the best epoch kept. Deterministic given options.seed and
// options.num_threads. Predict()/PredictGiven() are const and
// thread-compatible; Observe() is a no-op (offline model).
//
// Files written before the path inputs existed (no "observe_path" metadata) load as a-priori
// models: PredictGiven() then returns the observed rows and the a-priori forecast for the rest.
// The corrected blend weights are chosen one layer ahead and also used for layers further on.
//
// Cost: a forecast reads the observed experts of the last path_window layers only, so its work
// is bounded by path_window * top_k rows of W_path whatever the depth. W_path itself is stored
// dense, (L*E + L) x (L*E) floats (its rows for layer l only ever reach later layers): 74k for
// Mixtral's 32 x 8, 2.8M for 26 x 64, 38M (150 MB, times Adam's moments while training) for
// 48 x 128.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "placement/conditional_predictor.h"
#include "placement/predictor_io.h"
#include "placement/routing_trace.h"

namespace ef::placement {

struct PathPredictorOptions {
  int embed_dim = 32;           // width of each of the three token embeddings
  int hidden = 256;             // hidden units
  int context_window = 8;       // context tokens averaged (before the previous token)
  int epochs = 40;              // maximum epochs
  int batch_size = 32;          // tokens per Adam step
  double learning_rate = 2e-3;  // Adam step size
  double weight_decay = 1e-5;   // L2 on all parameters
  double token_dropout = 0.3;   // probability a training token id is replaced by "unknown"
  int patience = 8;             // epochs without a better validation recall before stopping
  uint64_t seed = 1;
  int num_threads = 2;       // threads per mini-batch (results depend on this, not on timing)
  bool observe_path = true;  // condition on the observed prefix of the path (PredictGiven)
  int path_samples = 3;      // observed prefixes (of distinct depths) per token and epoch; 0: an
                             // a-priori model (as observe_path = false)
  int path_window = 4;       // observed layers (the most recent) a forecast reads; 0: all of them
};

struct PathEpochReport {
  int epoch = 0;
  double train_loss = 0;  // mean binary cross-entropy per (layer, expert) output
  double val_loss = 0;
  double val_recall = 0;  // mean of the a-priori and one-layer-ahead top-k recall (validation)
  bool best = false;
};

class PathPredictor final : public ConditionalPredictor {
 public:
  // `train` and `val` must be sorted by (seq, pos) and have the same shape; `val` may be empty
  // (then training runs options.epochs epochs and a_l = 1). on_epoch, if set, sees every epoch.
  static StatusOr<std::unique_ptr<PathPredictor>> Train(const RoutingTrace& train, const RoutingTrace& val,
                                                        const PathPredictorOptions& options,
                                                        const std::function<void(const PathEpochReport&)>& on_epoch);

  std::string name() const override { return "path"; }
  int num_layers() const override { return num_layers_; }
  int num_experts() const override { return num_experts_; }
  int top_k() const { return top_k_; }
  const PathPredictorOptions& options() const { return options_; }
  const std::vector<float>& layer_trust() const { return trust_; }
  const std::vector<float>& layer_trust_given() const { return trust_given_; }
  const std::vector<float>& layer_token_weight() const { return token_weight_; }
  const std::vector<float>& layer_token_weight_given() const { return token_weight_given_; }
  StatusOr<RoutingForecast> Predict(std::span<const PredictorInput> batch) const override;
  StatusOr<RoutingForecast> PredictGiven(std::span<const PredictorInput> batch,
                                         std::span<const ObservedRouting> observed) const override;

  void ToFile(PredictorFile* file, const std::string& prefix) const;
  static StatusOr<std::unique_ptr<PathPredictor>> FromFile(const PredictorFile& file, const std::string& prefix,
                                                           int num_layers, int num_experts, int top_k,
                                                           const std::string& path);

 private:
  struct Example;  // token indices, position features, multi-hot target
  class Trainer;

  PathPredictor(int num_layers, int num_experts, int top_k, const PathPredictorOptions& options, int vocab_rows);
  int dense_dim() const;   // token, context and position features
  int sparse_dim() const;  // path and depth inputs (0 without observe_path)
  int input_dim() const;   // dense_dim() plus the path and depth blocks when observe_path
  int TokenIndex(int64_t token) const;
  Example MakeExample(const PredictorInput& in) const;
  // Indices into x of the path and depth inputs that are 1 for `ex` (the rest of those blocks is 0).
  void ActiveInputs(const Example& ex, std::vector<int>* active) const;
  // Logits of one example into z (num_layers * num_experts; rows of the observed layers, below
  // ex.depth, and from ex.end_layer on when set, are left untouched); x receives the dense inputs, h the hidden
  // activations, active the sparse inputs.
  void Forward(const Example& ex, const float* params, float* x, std::vector<int>* active, float* h, float* z) const;
  // `ex` with every token id "unknown" (the view token dropout trains).
  Example WithoutTokens(Example ex) const;
  // Rows first_layer..L-1 (..ex.end_layer-1 when set) of token t of `f`: the blend of both views
  // and popularity (the corrected blend when ex.depth > 0).
  void ForecastRows(const Example& ex, int first_layer, RoutingForecast* f, int t, std::vector<float>* scratch,
                    std::vector<int>* active) const;

  // Parameter block offsets into params_.
  size_t off_tok_ = 0, off_prev_ = 0, off_ctx_ = 0, off_w1_ = 0, off_b1_ = 0, off_w2_ = 0, off_b2_ = 0, off_skip_ = 0,
         size_ = 0;

  int num_layers_, num_experts_, top_k_;
  PathPredictorOptions options_;
  int vocab_rows_;                                // known tokens + 2
  std::vector<int32_t> vocab_;                    // row r + 2 embeds token vocab_[r]
  std::unordered_map<int64_t, int> token_index_;  // token id -> embedding row
  std::vector<float> params_;
  std::vector<float> popularity_;          // [layer][expert] marginal probability
  std::vector<float> trust_;               // [layer] a_l of the a-priori forecast
  std::vector<float> trust_given_;         // [layer] a_l of layer l forecast with layers < l observed
  std::vector<float> token_weight_;        // [layer] w_l: weight of the view with token ids (a priori)
  std::vector<float> token_weight_given_;  // [layer] ... of the corrected forecast
};

}  // namespace ef::placement
