// ModelConfig: the architecture of a Hugging Face MoE checkpoint, parsed from config.json.
//
// Families: mixtral, qwen2_moe, qwen3_moe, olmoe. Any other model_type, a missing required
// field or a value of the wrong type is an error naming it; nothing is guessed silently.
#pragma once

#include <string>
#include <vector>

#include "runtime/core/status.h"

namespace ef::runtime {

enum class ModelFamily { kMixtral, kQwen2Moe, kQwen3Moe, kOlmoe };
enum class QkNorm { kNone, kPerHead, kFull };  // qwen3: RMSNorm over head_dim; olmoe: over the projection

struct ModelConfig {
  std::string model_type;
  ModelFamily family = ModelFamily::kMixtral;
  int vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_position_embeddings = 0;
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.f;
  bool qkv_bias = false;
  QkNorm qk_norm = QkNorm::kNone;
  float clip_qkv = 0.f;  // 0: no clipping (olmoe's clip_qkv)
  bool tie_word_embeddings = false;

  // MoE
  int num_experts = 0;
  int top_k = 0;
  int moe_intermediate_size = 0;            // per routed expert
  int intermediate_size = 0;                // dense MLP layers (mlp_only_layers / sparse step)
  int shared_expert_intermediate_size = 0;  // 0: no shared expert
  bool norm_topk_prob = false;
  int decoder_sparse_step = 1;
  std::vector<int> mlp_only_layers;

  int bos_token_id = -1;
  int eos_token_id = -1;  // first one when config lists several
  std::vector<int> eos_token_ids;
  int pad_token_id = -1;

  // Parses config.json text; `origin` names the file in errors.
  static StatusOr<ModelConfig> FromJson(const std::string& text, const std::string& origin);
  static StatusOr<ModelConfig> FromModelDir(const std::string& dir);

  bool IsMoeLayer(int layer) const;
  int num_moe_layers() const;
  // Index among MoE layers (0-based) or -1 for a dense layer.
  int MoeLayerIndex(int layer) const;
  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }

  // Tensor names of the checkpoint for this family.
  std::string RouterName(int layer) const;
  // proj: 0 gate, 1 up, 2 down.
  std::string ExpertName(int layer, int expert, int proj) const;
  std::string SharedExpertName(int layer, int proj) const;
  std::string SharedExpertGateName(int layer) const;
  std::string DenseMlpName(int layer, int proj) const;
};

const char* ModelFamilyName(ModelFamily f);

}  // namespace ef::runtime
