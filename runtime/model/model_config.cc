#include "runtime/model/model_config.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "runtime/core/check.h"
#include "runtime/core/limits.h"

namespace ef::runtime {
namespace {

using json = nlohmann::json;

class Reader {
 public:
  Reader(const json& j, const std::string& origin) : j_(j), origin_(origin) {}

  Status Int(const char* key, int* out, int min_value = 1, int max_value = 1 << 30) {
    if (!j_.contains(key) || j_[key].is_null()) return Missing(key);
    if (!j_[key].is_number_integer()) return WrongType(key, "an integer");
    int64_t v = j_[key].get<int64_t>();
    if (v < min_value || v > max_value)
      return InvalidArgument(origin_ + ": \"" + key + "\" = " + std::to_string(v) + " is out of range [" +
                             std::to_string(min_value) + ", " + std::to_string(max_value) + "]");
    *out = static_cast<int>(v);
    return Status::Ok();
  }
  Status OptInt(const char* key, int* out, int min_value = 0, int max_value = 1 << 30) {
    if (!j_.contains(key) || j_[key].is_null()) return Status::Ok();
    return Int(key, out, min_value, max_value);
  }
  Status OptFloat(const char* key, float* out) {
    if (!j_.contains(key) || j_[key].is_null()) return Status::Ok();
    if (!j_[key].is_number()) return WrongType(key, "a number");
    *out = j_[key].get<float>();
    return Status::Ok();
  }
  Status OptBool(const char* key, bool* out) {
    if (!j_.contains(key) || j_[key].is_null()) return Status::Ok();
    if (!j_[key].is_boolean()) return WrongType(key, "a boolean");
    *out = j_[key].get<bool>();
    return Status::Ok();
  }
  Status Float(const char* key, float* out) {
    if (!Has(key)) return Missing(key);
    return OptFloat(key, out);
  }
  Status OptString(const char* key, std::string* out) {
    if (!j_.contains(key) || j_[key].is_null()) return Status::Ok();
    if (!j_[key].is_string()) return WrongType(key, "a string");
    *out = j_[key].get<std::string>();
    return Status::Ok();
  }
  bool Has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }
  Status Missing(const char* key) const {
    return InvalidArgument(origin_ + ": required field \"" + key + "\" is missing");
  }
  Status WrongType(const char* key, const char* what) const {
    return InvalidArgument(origin_ + ": field \"" + key + "\" must be " + what + ", got " + j_[key].dump());
  }

 private:
  const json& j_;
  const std::string& origin_;
};

}  // namespace

const char* ModelFamilyName(ModelFamily f) {
  switch (f) {
    case ModelFamily::kMixtral:
      return "mixtral";
    case ModelFamily::kQwen2Moe:
      return "qwen2_moe";
    case ModelFamily::kQwen3Moe:
      return "qwen3_moe";
    case ModelFamily::kOlmoe:
      return "olmoe";
    case ModelFamily::kDeepseekV2:
      return "deepseek_v2";
    case ModelFamily::kDeepseekV3:
      return "deepseek_v3";
    case ModelFamily::kGptOss:
      return "gpt_oss";
  }
  return "?";
}

namespace {

std::string Num(double v) {
  std::ostringstream o;
  o << v;
  return o.str();
}

// rope_parameters (transformers >= 5) or rope_theta + rope_scaling (older configs). Types: default
// and yarn (GPT-OSS, DeepSeek-V3); others are refused rather than approximated.
Status ParseRope(const json& j, const std::string& origin, ModelConfig* c) {
  const bool v5 = j.contains("rope_parameters") && j["rope_parameters"].is_object();
  const bool scaled = !v5 && j.contains("rope_scaling") && !j["rope_scaling"].is_null();
  if (!v5) {
    Reader r(j, origin);
    EF_RETURN_IF_ERROR(r.OptFloat("rope_theta", &c->rope.theta));
    if (!(c->rope.theta > 0))
      return InvalidArgument(origin + ": \"rope_theta\" must be positive, got " + Num(c->rope.theta));
    if (!scaled) return Status::Ok();
    if (!j["rope_scaling"].is_object()) return r.WrongType("rope_scaling", "an object");
  }
  const std::string where = v5 ? "rope_parameters" : "rope_scaling";
  const json& rp = v5 ? j["rope_parameters"] : j["rope_scaling"];
  const std::string sub = origin + " (" + where + ")";
  Reader r(rp, sub);
  std::string type = "default";
  if (rp.contains("type") && rp["type"].is_string()) type = rp["type"].get<std::string>();
  EF_RETURN_IF_ERROR(r.OptString("rope_type", &type));
  if (type != "default" && type != "yarn")
    return Unimplemented(origin + ": " + where + ".rope_type \"" + type + "\" is not supported (default, yarn)");
  c->rope.type = type;
  EF_RETURN_IF_ERROR(r.OptFloat("rope_theta", &c->rope.theta));
  if (!(c->rope.theta > 0))
    return InvalidArgument(sub + ": \"rope_theta\" must be positive, got " + Num(c->rope.theta));
  if (type == "yarn") {
    EF_RETURN_IF_ERROR(r.Float("factor", &c->rope.factor));
    if (c->rope.factor <= 0) return InvalidArgument(sub + ": \"factor\" must be positive, got " + Num(c->rope.factor));
    EF_RETURN_IF_ERROR(r.Int("original_max_position_embeddings", &c->rope.original_max_position_embeddings));
    EF_RETURN_IF_ERROR(r.OptFloat("beta_fast", &c->rope.beta_fast));
    EF_RETURN_IF_ERROR(r.OptFloat("beta_slow", &c->rope.beta_slow));
    EF_RETURN_IF_ERROR(r.OptFloat("mscale", &c->rope.mscale));
    EF_RETURN_IF_ERROR(r.OptFloat("mscale_all_dim", &c->rope.mscale_all_dim));
    EF_RETURN_IF_ERROR(r.OptFloat("attention_factor", &c->rope.attention_factor));
    EF_RETURN_IF_ERROR(r.OptBool("truncate", &c->rope.truncate));
  }
  return Status::Ok();
}

// DeepSeek-V2/V3: MLA attention, dense layers before first_k_dense_replace, routed + shared
// experts, and the router's top-k method.
Status ParseDeepseek(const json& j, const std::string& origin, ModelConfig* c) {
  Reader r(j, origin);
  const bool v3 = c->family == ModelFamily::kDeepseekV3;
  c->mla = true;
  if (r.Has("q_lora_rank")) EF_RETURN_IF_ERROR(r.Int("q_lora_rank", &c->q_lora_rank));
  EF_RETURN_IF_ERROR(r.Int("kv_lora_rank", &c->kv_lora_rank));
  EF_RETURN_IF_ERROR(r.Int("qk_nope_head_dim", &c->qk_nope_head_dim));
  EF_RETURN_IF_ERROR(r.Int("qk_rope_head_dim", &c->qk_rope_head_dim));
  EF_RETURN_IF_ERROR(r.Int("v_head_dim", &c->v_head_dim));
  if (c->qk_rope_head_dim % 2 != 0)
    return InvalidArgument(origin + ": \"qk_rope_head_dim\" = " + std::to_string(c->qk_rope_head_dim) +
                           " must be even for rotary embeddings");
  c->head_dim = c->qk_nope_head_dim + c->qk_rope_head_dim;
  c->num_kv_heads = c->num_heads;  // MLA: every head has its own keys (expanded from the latent)
  bool attention_bias = false;
  EF_RETURN_IF_ERROR(r.OptBool("attention_bias", &attention_bias));
  if (attention_bias) return Unimplemented(origin + ": \"attention_bias\": true is not supported for " + c->model_type);
  // transformers: V2 always rotates interleaved pairs (complex form); V3 when rope_interleave (default true).
  c->rope_interleaved = true;
  if (v3) EF_RETURN_IF_ERROR(r.OptBool("rope_interleave", &c->rope_interleaved));

  EF_RETURN_IF_ERROR(r.Int("n_routed_experts", &c->num_experts, 1, limits::kMaxExperts));
  EF_RETURN_IF_ERROR(r.Int("moe_intermediate_size", &c->moe_intermediate_size));
  int n_shared = 0;
  EF_RETURN_IF_ERROR(r.OptInt("n_shared_experts", &n_shared));
  c->shared_expert_intermediate_size = n_shared * c->moe_intermediate_size;
  int first_dense = 0;
  EF_RETURN_IF_ERROR(r.OptInt("first_k_dense_replace", &first_dense, 0, c->num_layers));
  for (int l = 0; l < first_dense; ++l) c->mlp_only_layers.push_back(l);
  EF_RETURN_IF_ERROR(r.OptBool("norm_topk_prob", &c->norm_topk_prob));
  EF_RETURN_IF_ERROR(r.OptFloat("routed_scaling_factor", &c->routed_scaling_factor));
  EF_RETURN_IF_ERROR(r.OptInt("n_group", &c->n_group, 1, c->num_experts));
  EF_RETURN_IF_ERROR(r.OptInt("topk_group", &c->topk_group, 1, c->num_experts));
  if (c->num_experts % c->n_group != 0)
    return InvalidArgument(origin + ": \"n_routed_experts\" (" + std::to_string(c->num_experts) +
                           ") is not divisible by \"n_group\" (" + std::to_string(c->n_group) + ")");
  if (c->topk_group > c->n_group)
    return InvalidArgument(origin + ": \"topk_group\" (" + std::to_string(c->topk_group) + ") exceeds \"n_group\" (" +
                           std::to_string(c->n_group) + ")");
  std::string method = v3 ? "noaux_tc" : "greedy";
  EF_RETURN_IF_ERROR(r.OptString("topk_method", &method));
  if (v3) {
    // transformers' V3 router always scores with sigmoid and selects group-limited with the bias.
    if (method != "noaux_tc")
      return Unimplemented(origin + ": \"topk_method\" \"" + method + "\" is not supported for deepseek_v3 (noaux_tc)");
    c->router_scoring = RouterScoring::kSigmoid;
    c->topk_method = TopkMethod::kNoAuxTc;
    c->score_correction_bias = true;
    // Group scores sum each group's top two experts.
    if (c->num_experts / c->n_group < 2)
      return InvalidArgument(origin + ": \"n_group\" (" + std::to_string(c->n_group) +
                             ") leaves fewer than 2 experts per group; noaux_tc scores a group by its top two");
  } else if (method == "greedy") {
    c->topk_method = TopkMethod::kGreedy;
  } else if (method == "group_limited_greedy") {
    c->topk_method = TopkMethod::kGroupLimitedGreedy;
  } else {
    return Unimplemented(origin + ": \"topk_method\" \"" + method +
                         "\" is not supported for deepseek_v2 (greedy, group_limited_greedy)");
  }
  if (c->top_k > c->topk_group * (c->num_experts / c->n_group) && c->topk_method != TopkMethod::kGreedy)
    return InvalidArgument(origin + ": \"num_experts_per_tok\" (" + std::to_string(c->top_k) +
                           ") exceeds the experts of topk_group groups (" +
                           std::to_string(c->topk_group * (c->num_experts / c->n_group)) + ")");
  if (!v3) c->norm_topk_prob = false;  // transformers' V2 router never renormalises the top-k weights
  return Status::Ok();
}

// GPT-OSS: biased attention with sinks, sliding/full layers, biased fused experts.
Status ParseGptOss(const json& j, const std::string& origin, ModelConfig* c) {
  Reader r(j, origin);
  c->qkv_bias = true;
  EF_RETURN_IF_ERROR(r.OptBool("attention_bias", &c->qkv_bias));
  c->o_bias = c->qkv_bias;
  c->attention_sinks = true;
  c->router_scoring = RouterScoring::kSoftmaxTopK;
  c->router_bias = true;
  c->expert_bias = true;
  c->expert_activation = ExpertActivation::kClampedSwiGlu;
  c->moe_intermediate_size = c->intermediate_size;
  EF_RETURN_IF_ERROR(r.OptFloat("swiglu_limit", &c->swiglu_limit));
  c->sliding_layers.assign(c->num_layers, false);
  if (r.Has("layer_types")) {
    const json& lt = j["layer_types"];
    if (!lt.is_array() || static_cast<int>(lt.size()) != c->num_layers)
      return r.WrongType("layer_types", ("a list of " + std::to_string(c->num_layers) + " layer types").c_str());
    for (int l = 0; l < c->num_layers; ++l) {
      if (lt[l] == "sliding_attention") {
        c->sliding_layers[l] = true;
      } else if (lt[l] != "full_attention") {
        return InvalidArgument(origin + ": \"layer_types\"[" + std::to_string(l) + "] = " + lt[l].dump() +
                               " is not sliding_attention or full_attention");
      }
    }
  } else {
    for (int l = 0; l < c->num_layers; ++l) c->sliding_layers[l] = l % 2 == 0;  // transformers' default
  }
  if (std::find(c->sliding_layers.begin(), c->sliding_layers.end(), true) != c->sliding_layers.end())
    EF_RETURN_IF_ERROR(r.Int("sliding_window", &c->sliding_window));
  return Status::Ok();
}

// quantization_config: absent or null (weights as stored), mxfp4 (gpt_oss experts) or fp8 (block
// FP8 with dynamic activation scales, which this runtime does not apply: activations stay fp32).
Status ParseQuantization(const json& j, const std::string& origin, ModelConfig* c) {
  if (!j.contains("quantization_config") || j["quantization_config"].is_null()) return Status::Ok();
  const json& q = j["quantization_config"];
  if (!q.is_object()) return Reader(j, origin).WrongType("quantization_config", "an object");
  const std::string sub = origin + " (quantization_config)";
  Reader r(q, sub);
  std::string method;
  EF_RETURN_IF_ERROR(r.OptString("quant_method", &method));
  if (method.empty()) return r.Missing("quant_method");
  if (method == "mxfp4") {
    if (c->family != ModelFamily::kGptOss)
      return Unimplemented(origin + ": quantization_config.quant_method \"mxfp4\" is supported for gpt_oss only, not " +
                           c->model_type);
    c->quant.method = WeightQuant::kMxfp4;
    return Status::Ok();
  }
  if (method != "fp8")
    return Unimplemented(origin + ": quantization_config.quant_method \"" + method +
                         "\" is not supported (supported: mxfp4, fp8); dequantize the checkpoint first");
  c->quant.method = WeightQuant::kFp8;
  std::string fmt = "e4m3", scheme = "dynamic";
  EF_RETURN_IF_ERROR(r.OptString("fmt", &fmt));
  if (fmt != "e4m3")
    return Unimplemented(origin + ": quantization_config.fmt \"" + fmt + "\" is not supported (only e4m3)");
  EF_RETURN_IF_ERROR(r.OptString("activation_scheme", &scheme));
  if (scheme != "dynamic")
    return Unimplemented(origin + ": quantization_config.activation_scheme \"" + scheme +
                         "\" is not supported (only dynamic)");
  if (r.Has("weight_block_size")) {
    const json& b = q["weight_block_size"];
    if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer() ||
        b[0].get<int64_t>() < 1 || b[1].get<int64_t>() < 1 || b[0].get<int64_t>() > (1 << 20) ||
        b[1].get<int64_t>() > (1 << 20))
      return r.WrongType("weight_block_size", "two positive integers [rows, cols] up to 2^20");
    c->quant.block_rows = b[0].get<int>();
    c->quant.block_cols = b[1].get<int>();
  }
  return Status::Ok();
}

}  // namespace

const char* WeightQuantName(WeightQuant q) {
  switch (q) {
    case WeightQuant::kNone:
      return "none";
    case WeightQuant::kMxfp4:
      return "mxfp4";
    case WeightQuant::kFp8:
      return "fp8";
  }
  return "?";
}

StatusOr<ModelConfig> ModelConfig::FromJson(const std::string& text, const std::string& origin) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgument(origin + " is not valid JSON");
  if (!j.is_object()) return InvalidArgument(origin + " is not a JSON object");
  ModelConfig c;
  if (!j.contains("model_type") || !j["model_type"].is_string())
    return InvalidArgument(origin + ": required field \"model_type\" is missing or not a string");
  c.model_type = j["model_type"].get<std::string>();
  if (c.model_type == "mixtral")
    c.family = ModelFamily::kMixtral;
  else if (c.model_type == "qwen2_moe")
    c.family = ModelFamily::kQwen2Moe;
  else if (c.model_type == "qwen3_moe")
    c.family = ModelFamily::kQwen3Moe;
  else if (c.model_type == "olmoe")
    c.family = ModelFamily::kOlmoe;
  else if (c.model_type == "deepseek_v2")
    c.family = ModelFamily::kDeepseekV2;
  else if (c.model_type == "deepseek_v3")
    c.family = ModelFamily::kDeepseekV3;
  else if (c.model_type == "gpt_oss")
    c.family = ModelFamily::kGptOss;
  else
    return Unimplemented(origin + ": model_type \"" + c.model_type +
                         "\" is not supported (supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, "
                         "deepseek_v3, gpt_oss)");
  const bool deepseek = c.family == ModelFamily::kDeepseekV2 || c.family == ModelFamily::kDeepseekV3;

  Reader r(j, origin);
  EF_RETURN_IF_ERROR(r.Int("vocab_size", &c.vocab_size, 1, limits::kMaxVocab));
  EF_RETURN_IF_ERROR(r.Int("hidden_size", &c.hidden_size));
  EF_RETURN_IF_ERROR(r.Int("num_hidden_layers", &c.num_layers, 1, limits::kMaxLayers));
  EF_RETURN_IF_ERROR(r.Int("num_attention_heads", &c.num_heads));
  c.num_kv_heads = c.num_heads;
  EF_RETURN_IF_ERROR(r.OptInt("num_key_value_heads", &c.num_kv_heads, 1));
  if (c.num_heads % c.num_kv_heads != 0)
    return InvalidArgument(origin + ": num_attention_heads (" + std::to_string(c.num_heads) +
                           ") is not a multiple of num_key_value_heads (" + std::to_string(c.num_kv_heads) + ")");
  c.head_dim = 0;
  EF_RETURN_IF_ERROR(r.OptInt("head_dim", &c.head_dim, 1));
  if (c.head_dim == 0) {
    if (c.hidden_size % c.num_heads != 0)
      return InvalidArgument(origin + ": hidden_size is not a multiple of num_attention_heads and head_dim is unset");
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim % 2 != 0) return InvalidArgument(origin + ": head_dim must be even for rotary embeddings");
  c.max_position_embeddings = 4096;
  EF_RETURN_IF_ERROR(r.OptInt("max_position_embeddings", &c.max_position_embeddings, 1));
  EF_RETURN_IF_ERROR(r.OptFloat("rms_norm_eps", &c.rms_norm_eps));

  EF_RETURN_IF_ERROR(ParseRope(j, origin, &c));
  c.rope_theta = c.rope.theta;
  // gpt_oss writes hidden_act "silu" but its experts use their own clamped SwiGLU.
  if (j.contains("hidden_act") && j["hidden_act"] != "silu")
    return Unimplemented(origin + ": hidden_act " + j["hidden_act"].dump() + " is not supported (only silu)");
  EF_RETURN_IF_ERROR(r.OptBool("tie_word_embeddings", &c.tie_word_embeddings));

  EF_RETURN_IF_ERROR(r.Int("num_experts_per_tok", &c.top_k, 1, limits::kMaxTopK));
  const char* experts_key = c.family == ModelFamily::kMixtral || c.family == ModelFamily::kGptOss ? "num_local_experts"
                            : deepseek                                                            ? "n_routed_experts"
                                                                                                  : "num_experts";
  if (!r.Has(experts_key) && r.Has("num_local_experts")) experts_key = "num_local_experts";
  EF_RETURN_IF_ERROR(r.Int(experts_key, &c.num_experts, 1, limits::kMaxExperts));
  if (c.top_k > c.num_experts)
    return InvalidArgument(origin + ": num_experts_per_tok (" + std::to_string(c.top_k) + ") exceeds the " +
                           std::to_string(c.num_experts) + " experts");
  EF_RETURN_IF_ERROR(r.Int("intermediate_size", &c.intermediate_size));
  switch (c.family) {
    case ModelFamily::kMixtral:
      c.moe_intermediate_size = c.intermediate_size;
      c.norm_topk_prob = true;  // Mixtral always renormalises the top-k weights
      break;
    case ModelFamily::kOlmoe:
      c.moe_intermediate_size = c.intermediate_size;
      c.qk_norm = QkNorm::kFull;
      EF_RETURN_IF_ERROR(r.OptBool("norm_topk_prob", &c.norm_topk_prob));
      EF_RETURN_IF_ERROR(r.OptBool("attention_bias", &c.qkv_bias));
      EF_RETURN_IF_ERROR(r.OptFloat("clip_qkv", &c.clip_qkv));
      break;
    case ModelFamily::kQwen2Moe:
      EF_RETURN_IF_ERROR(r.Int("moe_intermediate_size", &c.moe_intermediate_size));
      EF_RETURN_IF_ERROR(r.OptInt("shared_expert_intermediate_size", &c.shared_expert_intermediate_size));
      c.qkv_bias = true;  // Qwen2 attention always has q/k/v biases
      c.shared_expert_gated = true;
      EF_RETURN_IF_ERROR(r.OptBool("qkv_bias", &c.qkv_bias));
      EF_RETURN_IF_ERROR(r.OptBool("norm_topk_prob", &c.norm_topk_prob));
      break;
    case ModelFamily::kQwen3Moe:
      EF_RETURN_IF_ERROR(r.Int("moe_intermediate_size", &c.moe_intermediate_size));
      c.qk_norm = QkNorm::kPerHead;
      EF_RETURN_IF_ERROR(r.OptBool("attention_bias", &c.qkv_bias));
      EF_RETURN_IF_ERROR(r.OptBool("norm_topk_prob", &c.norm_topk_prob));
      break;
    case ModelFamily::kDeepseekV2:
    case ModelFamily::kDeepseekV3:
      EF_RETURN_IF_ERROR(ParseDeepseek(j, origin, &c));
      break;
    case ModelFamily::kGptOss:
      EF_RETURN_IF_ERROR(ParseGptOss(j, origin, &c));
      break;
  }
  if (c.family == ModelFamily::kQwen2Moe || c.family == ModelFamily::kQwen3Moe) {
    EF_RETURN_IF_ERROR(r.OptInt("decoder_sparse_step", &c.decoder_sparse_step, 1));
    if (j.contains("mlp_only_layers") && !j["mlp_only_layers"].is_null()) {
      if (!j["mlp_only_layers"].is_array()) return r.WrongType("mlp_only_layers", "a list of layer indices");
      for (const json& v : j["mlp_only_layers"]) {
        if (!v.is_number_integer() || v.get<int>() < 0 || v.get<int>() >= c.num_layers)
          return InvalidArgument(origin + ": mlp_only_layers entry " + v.dump() + " is not a layer index");
        c.mlp_only_layers.push_back(v.get<int>());
      }
    }
  }
  if ((j.contains("use_sliding_window") && j["use_sliding_window"] == true) ||
      (c.family == ModelFamily::kMixtral && r.Has("sliding_window") && j["sliding_window"].is_number_integer() &&
       j["sliding_window"].get<int64_t>() < c.max_position_embeddings))
    return Unimplemented(origin + ": sliding-window attention is not supported");

  EF_RETURN_IF_ERROR(ParseQuantization(j, origin, &c));
  EF_RETURN_IF_ERROR(r.OptInt("bos_token_id", &c.bos_token_id, -1));
  EF_RETURN_IF_ERROR(r.OptInt("pad_token_id", &c.pad_token_id, -1));
  EF_RETURN_IF_ERROR(r.OptInt("num_nextn_predict_layers", &c.num_nextn_predict_layers, 0));
  if (j.contains("eos_token_id") && !j["eos_token_id"].is_null()) {
    const json& e = j["eos_token_id"];
    if (e.is_number_integer()) {
      c.eos_token_ids.push_back(e.get<int>());
    } else if (e.is_array()) {
      for (const json& v : e) {
        if (!v.is_number_integer()) return r.WrongType("eos_token_id", "an integer or a list of integers");
        c.eos_token_ids.push_back(v.get<int>());
      }
    } else {
      return r.WrongType("eos_token_id", "an integer or a list of integers");
    }
    for (int id : c.eos_token_ids)
      if (id < 0 || id >= c.vocab_size)
        return InvalidArgument(origin + ": eos_token_id " + std::to_string(id) +
                               " is not a token of the vocabulary of " + std::to_string(c.vocab_size));
    if (!c.eos_token_ids.empty()) c.eos_token_id = c.eos_token_ids[0];
  }
  return c;
}

Status ModelConfig::CheckModelDir(const std::string& dir) {
  namespace fs = std::filesystem;
  if (dir.empty()) return NotFound("no model directory given (--model or model.path is empty)");
  std::error_code ec;
  if (fs::is_directory(dir, ec)) return Status::Ok();
  if (fs::exists(dir, ec)) return NotFound("model path " + dir + " is a file: give the checkpoint's directory");
  std::string where;
  if (fs::path(dir).is_relative()) where = " (looked for at " + fs::absolute(dir, ec).string() + ")";
  return NotFound("model directory " + dir + " does not exist" + where);
}

StatusOr<ModelConfig> ModelConfig::FromModelDir(const std::string& dir) {
  namespace fs = std::filesystem;
  fs::path p = fs::path(dir) / "config.json";
  EF_RETURN_IF_ERROR(CheckModelDir(dir));
  std::ifstream in(p);
  if (!in) return NotFound("missing " + p.string() + " (a Hugging Face checkpoint directory needs config.json)");
  std::stringstream ss;
  ss << in.rdbuf();
  return FromJson(ss.str(), p.string());
}

bool ModelConfig::IsMoeLayer(int layer) const {
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) return false;
  return num_experts > 0 && (layer + 1) % decoder_sparse_step == 0;
}

int ModelConfig::num_moe_layers() const {
  int n = 0;
  for (int l = 0; l < num_layers; ++l) n += IsMoeLayer(l);
  return n;
}

std::vector<int> ModelConfig::MoeLayers() const {
  std::vector<int> v;
  for (int l = 0; l < num_layers; ++l)
    if (IsMoeLayer(l)) v.push_back(l);
  return v;
}

std::optional<MoeLayer> ModelConfig::MoeLayerOf(int layer) const {
  if (!IsMoeLayer(layer)) return std::nullopt;
  int n = 0;
  for (int l = 0; l < layer; ++l) n += IsMoeLayer(l);
  return MoeLayer(n);
}

int ModelConfig::DecoderLayer(MoeLayer m) const {
  int n = 0;
  for (int l = 0; l < num_layers; ++l)
    if (IsMoeLayer(l) && n++ == m.index) return l;
  EF_CHECK_MSG(false, "MoE layer index out of range");
  return -1;
}

std::string ModelConfig::RouterName(int layer) const {
  const std::string p = "model.layers." + std::to_string(layer);
  if (family == ModelFamily::kGptOss) return p + ".mlp.router.weight";
  return family == ModelFamily::kMixtral ? p + ".block_sparse_moe.gate.weight" : p + ".mlp.gate.weight";
}

std::string ModelConfig::ExpertName(int layer, int expert, int proj) const {
  const std::string p = "model.layers." + std::to_string(layer);
  if (family == ModelFamily::kMixtral) {
    static const char* kW[] = {"w1", "w3", "w2"};
    return p + ".block_sparse_moe.experts." + std::to_string(expert) + "." + kW[proj] + ".weight";
  }
  static const char* kP[] = {"gate_proj", "up_proj", "down_proj"};
  return p + ".mlp.experts." + std::to_string(expert) + "." + kP[proj] + ".weight";
}

std::string ModelConfig::SharedExpertName(int layer, int proj) const {
  static const char* kP[] = {"gate_proj", "up_proj", "down_proj"};
  const char* module = mla ? ".mlp.shared_experts." : ".mlp.shared_expert.";
  return "model.layers." + std::to_string(layer) + module + kP[proj] + ".weight";
}

std::string ModelConfig::SharedExpertGateName(int layer) const {
  return "model.layers." + std::to_string(layer) + ".mlp.shared_expert_gate.weight";
}

std::string ModelConfig::DenseMlpName(int layer, int proj) const {
  static const char* kP[] = {"gate_proj", "up_proj", "down_proj"};
  return "model.layers." + std::to_string(layer) + ".mlp." + kP[proj] + ".weight";
}

}  // namespace ef::runtime
