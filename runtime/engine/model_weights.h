// ModelWeights: the dense (non-expert) weights of a checkpoint, made usable by a backend, plus
// views of every expert's weights in host memory (the checkpoint mapping), which an ExpertSource
// streams or uploads. Loading validates every tensor's presence and shape against ModelConfig.
#pragma once

#include <memory>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/model_config.h"

namespace ef::runtime {

struct ExpertWeights {
  Weight gate;  // [inter, hidden]
  Weight up;    // [inter, hidden]
  Weight down;  // [hidden, inter]
  size_t nbytes() const { return gate.nbytes() + up.nbytes() + down.nbytes(); }
};

struct LayerWeights {
  Weight input_norm, post_attention_norm;
  Weight q, k, v, o;
  Weight q_bias, k_bias, v_bias;  // empty when the family has none
  Weight q_norm, k_norm;          // empty when the family has none
  // MoE layers
  Weight router;                // [experts, hidden]
  ExpertWeights shared_expert;  // empty gate when none
  Weight shared_expert_gate;    // [1, hidden]
  // Dense MLP layers (mlp_only_layers)
  ExpertWeights dense_mlp;
};

class ModelWeights {
 public:
  // Opens the checkpoint and uploads the dense weights to the backend. Expert weights stay in
  // the checkpoint mapping (host_expert()).
  static StatusOr<std::unique_ptr<ModelWeights>> Load(const std::string& model_dir, Backend* backend);

  const ModelConfig& config() const { return config_; }
  const Checkpoint& checkpoint() const { return *checkpoint_; }
  const Weight& embed() const { return embed_; }
  const Weight& final_norm() const { return final_norm_; }
  const Weight& lm_head() const { return lm_head_; }
  const LayerWeights& layer(int l) const { return layers_[static_cast<size_t>(l)]; }
  // Host views (checkpoint bytes) of routed expert e of layer l. Valid for MoE layers only.
  const ExpertWeights& host_expert(int layer, int expert) const {
    return host_experts_[static_cast<size_t>(layer) * config_.num_experts + expert];
  }
  // The largest expert's size in bytes: the size of a cache slot.
  size_t max_expert_bytes() const { return max_expert_bytes_; }
  // Weights dtype of the experts (the checkpoint's).
  DType expert_dtype() const { return expert_dtype_; }

 private:
  ModelConfig config_;
  std::unique_ptr<Checkpoint> checkpoint_;
  Weight embed_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
  std::vector<ExpertWeights> host_experts_;
  size_t max_expert_bytes_ = 0;
  DType expert_dtype_ = DType::kF32;
};

}  // namespace ef::runtime
