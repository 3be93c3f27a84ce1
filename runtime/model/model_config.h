// ModelConfig: the architecture of a Hugging Face MoE checkpoint, parsed from config.json.
//
// Families: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3 (multi-head latent
// attention, group-limited routing, shared experts) and gpt_oss (attention sinks, sliding layers,
// YaRN rope, fused biased experts). Any other model_type, a missing required field or a value of
// the wrong type or out of range is an error naming it; nothing is guessed silently.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "runtime/core/status.h"

namespace ef::runtime {

enum class ModelFamily { kMixtral, kQwen2Moe, kQwen3Moe, kOlmoe, kDeepseekV2, kDeepseekV3, kGptOss };
enum class QkNorm { kNone, kPerHead, kFull };  // qwen3: RMSNorm over head_dim; olmoe: over the projection

// How the router turns logits into expert choices and weights.
enum class RouterScoring {
  kSoftmax,      // softmax over all experts, top-k of the probabilities (mixtral, qwen, olmoe, deepseek_v2)
  kSigmoid,      // sigmoid scores; selection may add e_score_correction_bias (deepseek_v3)
  kSoftmaxTopK,  // top-k of the logits, softmax over the k selected logits (gpt_oss)
};
enum class TopkMethod { kGreedy, kGroupLimitedGreedy, kNoAuxTc };

// How a published checkpoint stores (some of) its weights: quantization_config.quant_method.
enum class WeightQuant {
  kNone,
  kMxfp4,  // gpt_oss experts: *_blocks (e2m1 pairs) + *_scales (e8m0 per 32 inputs)
  kFp8,    // F8_E4M3 linear weights + weight_scale_inv (fp32 per block of weight_block_size)
};
struct QuantConfig {
  WeightQuant method = WeightQuant::kNone;
  int block_rows = 128, block_cols = 128;  // kFp8: weight_block_size [out, in]
};

enum class ExpertActivation { kSiluMul, kClampedSwiGlu };

// Rotary embedding parameters (rope_parameters / rope_scaling of config.json).
struct RopeParams {
  std::string type = "default";  // default | yarn
  float theta = 10000.f;
  float factor = 1.f;
  int original_max_position_embeddings = 0;
  float beta_fast = 32.f, beta_slow = 1.f;
  float mscale = 0.f, mscale_all_dim = 0.f;  // 0: absent
  float attention_factor = 0.f;              // 0: absent (derived from factor)
  bool truncate = true;
};

// A MoE layer's position among the model's MoE layers (0 .. num_moe_layers() - 1), as opposed to
// its decoder layer index (0 .. num_layers - 1). The two differ in models with dense layers
// (DeepSeek's first_k_dense_replace, Qwen2-MoE's mlp_only_layers); per-MoE-layer arrays (routing
// traces, forecasts, score's router rows) are indexed by this one. Constructed explicitly, so a
// decoder index is never passed where a MoE index is meant; ModelConfig converts between the two
// (MoeLayerOf, DecoderLayer).
struct MoeLayer {
  constexpr explicit MoeLayer(int i) : index(i) {}
  int index;
  friend constexpr bool operator==(MoeLayer, MoeLayer) = default;
  friend constexpr auto operator<=>(MoeLayer, MoeLayer) = default;
};

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
  RopeParams rope;
  bool rope_interleaved = false;  // DeepSeek: rotate pairs (2i, 2i+1)
  bool qkv_bias = false;
  bool o_bias = false;           // gpt_oss
  bool attention_sinks = false;  // gpt_oss: one learned logit per head joins the softmax
  int sliding_window = 0;        // gpt_oss: window of the layers marked sliding
  std::vector<bool> sliding_layers;

  // Multi-head latent attention (deepseek_v2/v3). head_dim is then qk_nope + qk_rope and
  // num_kv_heads = num_heads; the KV cache holds kv_lora_rank + qk_rope_head_dim floats per token.
  bool mla = false;
  int q_lora_rank = 0;  // 0: plain q_proj
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;
  QkNorm qk_norm = QkNorm::kNone;
  float clip_qkv = 0.f;  // 0: no clipping (olmoe's clip_qkv)
  bool tie_word_embeddings = false;

  // MoE
  int num_experts = 0;
  int top_k = 0;
  int moe_intermediate_size = 0;            // per routed expert
  int intermediate_size = 0;                // dense MLP layers (mlp_only_layers / sparse step)
  int shared_expert_intermediate_size = 0;  // 0: no shared expert
  bool shared_expert_gated = false;         // qwen2_moe: sigmoid(shared_expert_gate . h) scales it
  bool norm_topk_prob = false;
  RouterScoring router_scoring = RouterScoring::kSoftmax;
  TopkMethod topk_method = TopkMethod::kGreedy;
  int n_group = 1;
  int topk_group = 1;
  float routed_scaling_factor = 1.f;
  bool router_bias = false;            // gpt_oss: the router Linear has a bias
  bool score_correction_bias = false;  // deepseek_v3: e_score_correction_bias
  bool expert_bias = false;            // gpt_oss: expert projections have biases
  ExpertActivation expert_activation = ExpertActivation::kSiluMul;
  float swiglu_alpha = 1.702f, swiglu_limit = 7.f;  // kClampedSwiGlu
  int decoder_sparse_step = 1;
  std::vector<int> mlp_only_layers;

  // The checkpoint's weight quantization; weights are dequantized at load (ModelWeights).
  QuantConfig quant;

  int bos_token_id = -1;
  int eos_token_id = -1;  // first one when config lists several
  std::vector<int> eos_token_ids;
  int pad_token_id = -1;
  // Decoder layers after num_hidden_layers that a checkpoint may hold for multi-token prediction
  // (DeepSeek-V3's num_nextn_predict_layers); not run.
  int num_nextn_predict_layers = 0;

  // Parses config.json text; `origin` names the file in errors.
  static StatusOr<ModelConfig> FromJson(const std::string& text, const std::string& origin);
  static StatusOr<ModelConfig> FromModelDir(const std::string& dir);
  // NotFound unless `dir` is a directory, saying what it is instead (nothing given, missing: with
  // the absolute path a relative one was looked up as, a file).
  static Status CheckModelDir(const std::string& dir);

  bool IsMoeLayer(int layer) const;
  int num_moe_layers() const;
  // The decoder indices of the MoE layers, ascending: position i is MoE layer i (MoeLayerOf's
  // inverse). Loops over experts go over these; dense layers have none.
  std::vector<int> MoeLayers() const;
  // The MoE layer that decoder layer `layer` is; nullopt for a dense layer.
  std::optional<MoeLayer> MoeLayerOf(int layer) const;
  // The decoder layer of MoE layer m (m.index < num_moe_layers()).
  int DecoderLayer(MoeLayer m) const;
  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  // Attention output width (the o_proj input): v_head_dim per head under MLA.
  int attn_out_dim() const { return mla ? num_heads * v_head_dim : q_dim(); }
  // Floats per token and layer in the KV cache: keys, then values (0: MLA keeps one latent row).
  int kv_cache_key_width() const { return mla ? kv_lora_rank + qk_rope_head_dim : kv_dim(); }
  int kv_cache_value_width() const { return mla ? 0 : kv_dim(); }
  // Rotary dimensions per head.
  int rope_dim() const { return mla ? qk_rope_head_dim : head_dim; }
  // The router's choices need more than RouterTopK (softmax top-k): computed on the host.
  bool host_routing() const {
    return router_scoring != RouterScoring::kSoftmax || topk_method != TopkMethod::kGreedy ||
           routed_scaling_factor != 1.f;
  }

  // Tensor names of the checkpoint for this family.
  std::string RouterName(int layer) const;
  // proj: 0 gate, 1 up, 2 down.
  std::string ExpertName(int layer, int expert, int proj) const;
  std::string SharedExpertName(int layer, int proj) const;
  std::string SharedExpertGateName(int layer) const;
  std::string DenseMlpName(int layer, int proj) const;
};

const char* ModelFamilyName(ModelFamily f);
// "none", "mxfp4", "fp8".
const char* WeightQuantName(WeightQuant q);

}  // namespace ef::runtime
