// ModelWeights: the dense (non-expert) weights of a checkpoint, made usable by a backend, plus
// views of every expert's weights in host memory, which an ExpertSource streams or uploads.
// Loading validates every tensor's presence and shape against ModelConfig. Experts are views of
// the checkpoint mapping, except where the checkpoint's layout is not the engine's: GPT-OSS's
// fused gate_up_proj [E, H, 2I] (gate/up interleaved) and down_proj [E, I, H] are repacked at load
// into per-expert gate [I, H], up [I, H], down [H, I] (+ biases), owned here. MLA's kv_b_proj is
// likewise repacked into the per-head absorbed key and value projections.
//
// Quantized checkpoints as published (config.json quantization_config): the routed experts stay in
// their stored form, packed per weight into the block-scaled formats the backends' Gemm takes
// (GPT-OSS's MXFP4 experts as kMxfp4, DeepSeek-V3's 128 x 128 block FP8 experts as kFp8Block;
// runtime/core/block_scaled_format.h), so host memory, the expert cache and the device hold them at
// the checkpoint's size. Every other quantized weight (DeepSeek-V3's attention, dense MLP and
// shared experts), and the experts too under LoadOptions::dequantize_experts or an FP8 block size
// other than 128 x 128, is dequantized at load, tensor by tensor (expert by expert), into owned
// float weights: MXFP4 into the dtype of the experts' biases (exact), block FP8 into the dtype of
// the token embedding (exact in F32, one more rounding in BF16). Formats: runtime/model/checkpoint_quant.h.
#pragma once

#include <memory>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/model_config.h"
#include "runtime/model/rope_frequencies.h"

namespace ef::runtime {

struct ExpertWeights {
  Weight gate;  // [inter, hidden]
  Weight up;    // [inter, hidden]
  Weight down;  // [hidden, inter]
  // Optional biases (gpt_oss): empty when the family has none.
  Weight gate_bias;  // [inter]
  Weight up_bias;    // [inter]
  Weight down_bias;  // [hidden]

  bool has_bias() const { return gate_bias.cols > 0; }
  // The packed byte layout of an expert wherever it is copied whole (caches, host shards, peer
  // fetches): gate | up | down, then gate_bias | up_bias | down_bias when present, back to back.
  std::vector<const Weight*> parts() const {
    std::vector<const Weight*> p = {&gate, &up, &down};
    if (has_bias()) p.insert(p.end(), {&gate_bias, &up_bias, &down_bias});
    return p;
  }
  std::vector<Weight*> parts() {
    std::vector<Weight*> p = {&gate, &up, &down};
    if (has_bias()) p.insert(p.end(), {&gate_bias, &up_bias, &down_bias});
    return p;
  }
  size_t nbytes() const {
    size_t n = 0;
    for (const Weight* w : parts()) n += w->nbytes();
    return n;
  }
  // These shapes, viewing an expert packed (parts() order) at `base`.
  ExpertWeights Rebased(const void* base) const {
    ExpertWeights r = *this;
    auto* p = static_cast<const std::byte*>(base);
    for (Weight* w : r.parts()) {
      w->data = p;
      p += w->nbytes();
    }
    return r;
  }
};

struct LayerWeights {
  Weight input_norm, post_attention_norm;
  Weight q, k, v, o;
  Weight q_bias, k_bias, v_bias, o_bias;  // empty when the family has none
  Weight q_norm, k_norm;                  // empty when the family has none
  Weight sinks;                           // gpt_oss: [heads], F32
  // MLA (deepseek): q is q_proj, or q_b_proj after q_a_proj + q_a_norm when q_lora_rank > 0.
  Weight q_a, q_a_norm;
  Weight kv_a;        // kv_a_proj_with_mqa [kv_lora + rope, hidden]
  Weight kv_a_norm;   // [kv_lora]
  Weight kv_b_key;    // absorbed key projection, per head W_uk^T: [heads * kv_lora, nope]
  Weight kv_b_value;  // per head W_uv: [heads * v_head_dim, kv_lora]
  // MoE layers
  Weight router;                             // [experts, hidden]
  Weight router_bias;                        // gpt_oss: [experts]
  std::vector<float> score_correction_bias;  // deepseek_v3, host: [experts]
  ExpertWeights shared_expert;               // empty gate when none
  Weight shared_expert_gate;                 // [1, hidden]; empty unless config.shared_expert_gated
  // Dense MLP layers (mlp_only_layers)
  ExpertWeights dense_mlp;
};

struct LoadOptions {
  // Dequantize the routed experts of an MXFP4 or block FP8 checkpoint at load into float weights
  // (as every other quantized weight is) instead of keeping them packed at their stored size. The
  // CPU backend computes the same logits either way, except that block FP8 dequantized into a BF16
  // checkpoint's dtype is rounded once more (runtime/model/checkpoint_quant.h).
  bool dequantize_experts = false;
  // Weights already opened (a checkpoint built in memory, Checkpoint::FromFiles); null: open
  // model_dir's safetensors. The config is read from model_dir either way.
  std::shared_ptr<const Checkpoint> checkpoint;
};

class ModelWeights {
 public:
  // Opens the checkpoint and uploads the dense weights to the backend. Expert weights stay in
  // host memory (host_expert()): the checkpoint mapping where its layout is the engine's.
  static StatusOr<std::unique_ptr<ModelWeights>> Load(const std::string& model_dir, Backend* backend,
                                                      const LoadOptions& options = {});

  const ModelConfig& config() const { return config_; }
  const Checkpoint& checkpoint() const { return *checkpoint_; }
  const Weight& embed() const { return embed_; }
  const Weight& final_norm() const { return final_norm_; }
  const Weight& lm_head() const { return lm_head_; }
  // Rotary inverse frequencies, F32 [rope_dim / 2] on the backend, and YaRN's cos/sin factor.
  const Weight& rope_inv_freq() const { return rope_inv_freq_; }
  float rope_attention_factor() const { return rope_attention_factor_; }
  const LayerWeights& layer(int l) const { return layers_[static_cast<size_t>(l)]; }
  // Host views of routed expert e of layer l (checkpoint bytes, or owned repacked, packed or
  // dequantized bytes). Valid for MoE layers only.
  const ExpertWeights& host_expert(int layer, int expert) const {
    return host_experts_[static_cast<size_t>(layer) * config_.num_experts + expert];
  }
  // The largest expert's size in bytes: the size of a cache slot.
  size_t max_expert_bytes() const { return max_expert_bytes_; }
  // Dtype of the experts' gate, up and down weights: the checkpoint's, kMxfp4 / kFp8Block for
  // experts kept packed, or the float type quantized experts were dequantized into.
  DType expert_dtype() const { return expert_dtype_; }

 private:
  friend class ModelWeightsLoader;
  ModelConfig config_;
  std::shared_ptr<const Checkpoint> checkpoint_;
  Weight embed_, final_norm_, lm_head_;
  Weight rope_inv_freq_;
  float rope_attention_factor_ = 1.f;
  // Repacked or dequantized host bytes (fused experts, MLA projections, fp32 vectors, quantized
  // weights) that weights above view.
  std::vector<std::unique_ptr<std::vector<std::byte>>> owned_;
  std::vector<LayerWeights> layers_;
  std::vector<ExpertWeights> host_experts_;
  size_t max_expert_bytes_ = 0;
  DType expert_dtype_ = DType::kF32;
};

}  // namespace ef::runtime
