// PathPredictor: ExpertFlow's routing path predictor. A small learned model maps a token and
// its context to the expert probabilities of ALL layers in one pass, before the batch runs:
//
//   x = [ tok_emb[token] ; prev_emb[previous token] ; mean(ctx_emb[the context_window tokens
//         before that]) ; position features (pos == 0, pos/1024, log1p(pos)/log1p(4096), 1/(1+pos)) ]
//   h = ReLU(W1 x + b1)                      (hidden units)
//   z = W2 h + b2                            (num_layers * num_experts logits; b2 starts at the
//                                             logit of each expert's training popularity)
//   prob[l][e] = a_l * sigmoid(z[l][e]) + (1 - a_l) * popularity_l(e)
//
// The embeddings are learned by the predictor itself over the token ids seen in training
// (index 0: unknown token, 1: no previous token); token dropout trains the unknown embedding.
// a_l, the per-layer trust in the network, is chosen on the validation split (it falls back to
// popularity on layers where the network does not beat it). The served model's input
// embedding (PredictorInput::embedding) is not used yet.
//
// Training (Train): binary cross-entropy against the multi-hot target (the token's top-k
// experts per layer), Adam, shuffled mini-batches, early stopping on validation recall with
// the best epoch kept. Deterministic given options.seed and options.num_threads.
// Predict() is const and thread-compatible; Observe() is a no-op (offline model).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "placement/predictor.h"
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
  double token_dropout = 0.1;   // probability a training token id is replaced by "unknown"
  int patience = 8;             // epochs without a better validation recall before stopping
  uint64_t seed = 1;
  int num_threads = 2;  // threads per mini-batch (results depend on this, not on timing)
};

struct PathEpochReport {
  int epoch = 0;
  double train_loss = 0;  // mean binary cross-entropy per (layer, expert) output
  double val_loss = 0;
  double val_recall = 0;  // mean over layers of top-k recall on the validation split
  bool best = false;
};

class PathPredictor final : public Predictor {
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
  StatusOr<RoutingForecast> Predict(std::span<const PredictorInput> batch) const override;

  void ToFile(PredictorFile* file, const std::string& prefix) const;
  static StatusOr<std::unique_ptr<PathPredictor>> FromFile(const PredictorFile& file, const std::string& prefix,
                                                           int num_layers, int num_experts, int top_k,
                                                           const std::string& path);

 private:
  struct Example;  // token indices, position features, multi-hot target
  class Trainer;

  PathPredictor(int num_layers, int num_experts, int top_k, const PathPredictorOptions& options, int vocab_rows);
  int input_dim() const;
  int TokenIndex(int64_t token) const;
  Example MakeExample(const PredictorInput& in) const;
  // Logits of one example into z (num_layers * num_experts); h receives the hidden activations.
  void Forward(const Example& ex, const float* params, float* x, float* h, float* z) const;

  // Parameter block offsets into params_.
  size_t off_tok_ = 0, off_prev_ = 0, off_ctx_ = 0, off_w1_ = 0, off_b1_ = 0, off_w2_ = 0, off_b2_ = 0, size_ = 0;

  int num_layers_, num_experts_, top_k_;
  PathPredictorOptions options_;
  int vocab_rows_;                                // known tokens + 2
  std::vector<int32_t> vocab_;                    // row r + 2 embeds token vocab_[r]
  std::unordered_map<int64_t, int> token_index_;  // token id -> embedding row
  std::vector<float> params_;
  std::vector<float> popularity_;  // [layer][expert] marginal probability
  std::vector<float> trust_;       // [layer] a_l
};

}  // namespace ef::placement
