#include "runtime/model/model_config.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

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
  else
    return Unimplemented(origin + ": model_type \"" + c.model_type +
                         "\" is not supported (supported: mixtral, qwen2_moe, qwen3_moe, olmoe)");

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

  // Rotary: transformers >= 5 writes rope_parameters; older configs rope_theta / rope_scaling.
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    const json& rp = j["rope_parameters"];
    if (rp.contains("rope_type") && !rp["rope_type"].is_string())
      return InvalidArgument(origin + ": rope_parameters.rope_type must be a string");
    const std::string type = rp.contains("rope_type") ? rp["rope_type"].get<std::string>() : "default";
    if (type != "default")
      return Unimplemented(origin + ": rope_parameters.rope_type \"" + type + "\" is not supported (only default)");
    if (rp.contains("rope_theta")) {
      if (!rp["rope_theta"].is_number())
        return InvalidArgument(origin + ": rope_parameters.rope_theta must be a number");
      c.rope_theta = rp["rope_theta"].get<float>();
    }
  } else {
    EF_RETURN_IF_ERROR(r.OptFloat("rope_theta", &c.rope_theta));
    if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
      return Unimplemented(origin + ": rope_scaling is not supported");
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu")
    return Unimplemented(origin + ": hidden_act " + j["hidden_act"].dump() + " is not supported (only silu)");
  EF_RETURN_IF_ERROR(r.OptBool("tie_word_embeddings", &c.tie_word_embeddings));

  EF_RETURN_IF_ERROR(r.Int("num_experts_per_tok", &c.top_k, 1, limits::kMaxTopK));
  const char* experts_key = c.family == ModelFamily::kMixtral ? "num_local_experts" : "num_experts";
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
      EF_RETURN_IF_ERROR(r.OptBool("qkv_bias", &c.qkv_bias));
      EF_RETURN_IF_ERROR(r.OptBool("norm_topk_prob", &c.norm_topk_prob));
      break;
    case ModelFamily::kQwen3Moe:
      EF_RETURN_IF_ERROR(r.Int("moe_intermediate_size", &c.moe_intermediate_size));
      c.qk_norm = QkNorm::kPerHead;
      EF_RETURN_IF_ERROR(r.OptBool("attention_bias", &c.qkv_bias));
      EF_RETURN_IF_ERROR(r.OptBool("norm_topk_prob", &c.norm_topk_prob));
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

  EF_RETURN_IF_ERROR(r.OptInt("bos_token_id", &c.bos_token_id, -1));
  EF_RETURN_IF_ERROR(r.OptInt("pad_token_id", &c.pad_token_id, -1));
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
    if (!c.eos_token_ids.empty()) c.eos_token_id = c.eos_token_ids[0];
  }
  return c;
}

StatusOr<ModelConfig> ModelConfig::FromModelDir(const std::string& dir) {
  namespace fs = std::filesystem;
  fs::path p = fs::path(dir) / "config.json";
  if (!fs::is_directory(dir)) return NotFound("model directory " + dir + " does not exist");
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

int ModelConfig::MoeLayerIndex(int layer) const {
  if (!IsMoeLayer(layer)) return -1;
  int n = 0;
  for (int l = 0; l < layer; ++l) n += IsMoeLayer(l);
  return n;
}

std::string ModelConfig::RouterName(int layer) const {
  const std::string p = "model.layers." + std::to_string(layer);
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
  return "model.layers." + std::to_string(layer) + ".mlp.shared_expert." + kP[proj] + ".weight";
}

std::string ModelConfig::SharedExpertGateName(int layer) const {
  return "model.layers." + std::to_string(layer) + ".mlp.shared_expert_gate.weight";
}

std::string ModelConfig::DenseMlpName(int layer, int proj) const {
  static const char* kP[] = {"gate_proj", "up_proj", "down_proj"};
  return "model.layers." + std::to_string(layer) + ".mlp." + kP[proj] + ".weight";
}

}  // namespace ef::runtime
