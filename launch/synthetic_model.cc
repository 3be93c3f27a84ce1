#include "launch/synthetic_model.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <list>
#include <nlohmann/json.hpp>

#include "runtime/core/dtype.h"
#include "runtime/core/logging.h"
#include "runtime/model/model_config.h"
#include "runtime/model/safetensors_file.h"

namespace ef::launch {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::vector<SyntheticShape> BuiltinShapes() {
  std::vector<SyntheticShape> v;
  {
    SyntheticShape s;  // Mixtral-8x7B
    s.name = "mixtral-8x7b";
    s.model_type = "mixtral";
    s.vocab_size = 32000;
    s.hidden_size = 4096;
    s.intermediate_size = 14336;
    s.num_layers = 32;
    s.num_experts = 8;
    s.top_k = 2;
    s.num_heads = 32;
    s.num_kv_heads = 8;
    s.head_dim = 128;
    s.max_position_embeddings = 32768;
    s.norm_topk_prob = true;
    v.push_back(s);
  }
  {
    SyntheticShape s;  // Qwen1.5-MoE-A2.7B
    s.name = "qwen1.5-moe";
    s.model_type = "qwen2_moe";
    s.vocab_size = 151936;
    s.hidden_size = 2048;
    s.intermediate_size = 5632;
    s.moe_intermediate_size = 1408;
    s.shared_expert_intermediate_size = 5632;
    s.num_layers = 24;
    s.num_experts = 60;
    s.top_k = 4;
    s.num_heads = 16;
    s.num_kv_heads = 16;
    s.head_dim = 128;
    s.max_position_embeddings = 8192;
    v.push_back(s);
  }
  {
    SyntheticShape s;  // DeepSeek-V2-Lite, MoE part only
    s.name = "deepseek-v2-lite";
    s.model_type = "qwen2_moe";
    s.vocab_size = 102400;
    s.hidden_size = 2048;
    s.intermediate_size = 10944;  // the dense first layer
    s.moe_intermediate_size = 1408;
    s.shared_expert_intermediate_size = 2 * 1408;
    s.num_layers = 27;
    s.num_experts = 64;
    s.top_k = 6;
    s.num_heads = 16;
    s.num_kv_heads = 16;
    s.head_dim = 128;
    s.max_position_embeddings = 32768;
    s.mlp_only_layers = {0};
    s.note =
        "approximation: DeepSeek-V2-Lite's MLA attention is replaced by 16-head MHA (head_dim 128) and its 2 shared "
        "experts by one qwen2_moe shared expert of 2816 (which adds a sigmoid gate); the routed-expert part (64 "
        "experts top-6, FFN 1408, layer 0 dense) is the real shape";
    v.push_back(s);
  }
  {
    SyntheticShape s;  // OLMoE-1B-7B
    s.name = "olmoe";
    s.model_type = "olmoe";
    s.vocab_size = 50304;
    s.hidden_size = 2048;
    s.intermediate_size = 1024;
    s.num_layers = 16;
    s.num_experts = 64;
    s.top_k = 8;
    s.num_heads = 16;
    s.num_kv_heads = 16;
    s.head_dim = 128;
    s.max_position_embeddings = 4096;
    v.push_back(s);
  }
  {
    SyntheticShape s;  // Qwen3-30B-A3B
    s.name = "qwen3-30b-a3b";
    s.model_type = "qwen3_moe";
    s.vocab_size = 151936;
    s.hidden_size = 2048;
    s.intermediate_size = 6144;
    s.moe_intermediate_size = 768;
    s.num_layers = 48;
    s.num_experts = 128;
    s.top_k = 8;
    s.num_heads = 32;
    s.num_kv_heads = 4;
    s.head_dim = 128;
    s.max_position_embeddings = 40960;
    s.norm_topk_prob = true;
    v.push_back(s);
  }
  {
    SyntheticShape s;  // for tests: a Mixtral-shaped model of a few KiB per expert
    s.name = "tiny";
    s.model_type = "mixtral";
    s.vocab_size = 512;
    s.hidden_size = 64;
    s.intermediate_size = 128;
    s.num_layers = 4;
    s.num_experts = 8;
    s.top_k = 2;
    s.num_heads = 4;
    s.num_kv_heads = 2;
    s.head_dim = 16;
    s.max_position_embeddings = 1024;
    s.norm_topk_prob = true;
    v.push_back(s);
  }
  return v;
}

int ScaleDim(int d, int scale, int floor_value) {
  if (d <= 0) return d;
  const int s = std::max(floor_value, (d / scale) / 8 * 8);
  return std::min(d, s);
}

// splitmix64: cheap, seedable, the same stream on every platform.
uint64_t SplitMix(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t HashName(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  return h;
}

// Minimal BPE tokenizer without merges: printable ASCII characters, then one "<id>" token per
// remaining id, so every id the model can emit decodes to text (the bench times tokens as the
// serving loop streams their text).
json TokenizerJson(int vocab_size) {
  json vocab = json::object();
  vocab["<unk>"] = 0;
  vocab["<s>"] = 1;
  vocab["</s>"] = 2;
  for (int c = 32; c < 127; ++c) vocab[std::string(1, static_cast<char>(c))] = 3 + (c - 32);
  for (int id = 3 + 95; id < vocab_size; ++id) {
    std::string name = "<";  // appended piecewise: GCC 12 warns (-Wrestrict) on "<" + ... here
    name += std::to_string(id);
    name += '>';
    vocab[name] = id;
  }
  return {{"version", "1.0"},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}, {"unk_token", "<unk>"}}},
          {"added_tokens",
           {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
            {{"id", 1}, {"content", "<s>"}, {"special", true}},
            {{"id", 2}, {"content", "</s>"}, {"special", true}}}}};
}

// Tensors of one shard, filled as bf16, written, then freed.
class ShardWriter {
 public:
  explicit ShardWriter(uint64_t seed) : seed_(seed) {}
  void Add(const std::string& name, std::vector<int64_t> shape, bool ones) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    data_.emplace_back(static_cast<size_t>(n));
    std::vector<uint16_t>& d = data_.back();
    if (ones) {
      std::fill(d.begin(), d.end(), F32ToBf16(1.f));
    } else {
      uint64_t state = seed_ ^ HashName(name);
      const float a = 0.02f * std::sqrt(3.f);  // uniform(-a, a) has standard deviation 0.02
      for (auto& x : d) {
        const float u = static_cast<float>(SplitMix(state) >> 40) * (1.f / 16777216.f);  // [0, 1)
        x = F32ToBf16((2.f * u - 1.f) * a);
      }
    }
    tensors_.push_back({name, DType::kBF16, std::move(shape), nullptr});
  }
  Status Write(const std::string& path) {
    auto it = data_.begin();
    for (auto& t : tensors_) t.data = (it++)->data();
    Status s = runtime::WriteSafetensors(path, tensors_, {{"format", "pt"}});
    tensors_.clear();
    data_.clear();
    return s;
  }
  const std::vector<runtime::TensorToWrite>& tensors() const { return tensors_; }

 private:
  uint64_t seed_;
  std::vector<runtime::TensorToWrite> tensors_;
  std::list<std::vector<uint16_t>> data_;  // stable addresses
};

}  // namespace

std::vector<std::string> SyntheticShapeNames() {
  std::vector<std::string> names;
  for (const auto& s : BuiltinShapes()) names.push_back(s.name);
  return names;
}

StatusOr<SyntheticShape> FindSyntheticShape(const std::string& name) {
  std::string known;
  for (const auto& s : BuiltinShapes()) {
    if (s.name == name) return s;
    known += (known.empty() ? "" : ", ") + s.name;
  }
  return InvalidArgument("unknown synthetic model shape '" + name + "' (known: " + known + ")");
}

StatusOr<SyntheticShape> ScaleSyntheticShape(SyntheticShape s, int layers, int scale) {
  if (layers < 0) return InvalidArgument("--synthetic-layers must be >= 0, got " + std::to_string(layers));
  if (scale < 1) return InvalidArgument("--synthetic-scale must be >= 1, got " + std::to_string(scale));
  if (layers > 0) {
    s.num_layers = layers;
    std::erase_if(s.mlp_only_layers, [&](int l) { return l >= layers; });
    // Keep at least one MoE layer.
    if (static_cast<int>(s.mlp_only_layers.size()) >= layers) s.mlp_only_layers.clear();
  }
  if (scale > 1) {
    s.scale = scale;
    s.hidden_size = ScaleDim(s.hidden_size, scale, 16);
    s.intermediate_size = ScaleDim(s.intermediate_size, scale, 8);
    s.moe_intermediate_size = ScaleDim(s.moe_intermediate_size, scale, 8);
    s.shared_expert_intermediate_size = ScaleDim(s.shared_expert_intermediate_size, scale, 8);
    s.vocab_size = std::max(std::min(s.vocab_size, 256), s.vocab_size / scale);
    s.num_kv_heads = std::max(1, s.num_kv_heads / scale);
    s.num_heads = std::max(s.num_kv_heads, s.num_heads / scale) / s.num_kv_heads * s.num_kv_heads;
    s.head_dim = std::max(8, s.head_dim / scale / 2 * 2);
    s.max_position_embeddings = std::min(s.max_position_embeddings, 4096);
  }
  return s;
}

std::string SyntheticConfigJson(const SyntheticShape& s) {
  json j = {{"model_type", s.model_type},
            {"vocab_size", s.vocab_size},
            {"hidden_size", s.hidden_size},
            {"intermediate_size", s.intermediate_size},
            {"num_hidden_layers", s.num_layers},
            {"num_attention_heads", s.num_heads},
            {"num_key_value_heads", s.num_kv_heads},
            {"head_dim", s.head_dim},
            {"num_experts_per_tok", s.top_k},
            {"max_position_embeddings", s.max_position_embeddings},
            {"rms_norm_eps", 1e-5},
            {"rope_theta", 1e6},
            {"hidden_act", "silu"},
            {"tie_word_embeddings", false},
            {"torch_dtype", "bfloat16"},
            {"bos_token_id", 1},
            {"eos_token_id", 2},
            {"expertflow_synthetic", {{"shape", s.name}, {"scale", s.scale}}}};
  if (s.model_type == "mixtral") {
    j["num_local_experts"] = s.num_experts;
  } else {
    j["num_experts"] = s.num_experts;
    j["norm_topk_prob"] = s.norm_topk_prob;
  }
  if (s.model_type == "qwen2_moe" || s.model_type == "qwen3_moe") {
    j["moe_intermediate_size"] = s.moe_intermediate_size;
    j["decoder_sparse_step"] = 1;
    j["mlp_only_layers"] = s.mlp_only_layers;
  }
  if (s.model_type == "qwen2_moe") j["shared_expert_intermediate_size"] = s.shared_expert_intermediate_size;
  return j.dump(2);
}

std::string DefaultSyntheticRoot() {
  std::error_code ec;  // temp_directory_path honours TMPDIR
  fs::path tmp = fs::temp_directory_path(ec);
  if (ec) tmp = "/tmp";
  return (tmp / "expertflow-synthetic").string();
}

StatusOr<std::string> WriteSyntheticCheckpoint(const SyntheticShape& shape, uint64_t seed, const std::string& root) {
  const fs::path dir = fs::path(root) / (shape.name + "-L" + std::to_string(shape.num_layers) + "-x" +
                                         std::to_string(shape.scale) + "-s" + std::to_string(seed));
  const std::string config_text = SyntheticConfigJson(shape);
  if (fs::exists(dir / "model.safetensors.index.json")) {
    std::ifstream in(dir / "config.json");
    std::string existing((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (existing == config_text) return dir.string();
    return FailedPrecondition(dir.string() + " holds a different synthetic model; remove it");
  }
  EF_ASSIGN_OR_RETURN(runtime::ModelConfig c, runtime::ModelConfig::FromJson(config_text, "synthetic " + shape.name));
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) return NotFound("cannot create " + root + ": " + ec.message());
  const fs::path tmp = fs::path(root) / (dir.filename().string() + ".tmp" + std::to_string(::getpid()));
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return NotFound("cannot create " + tmp.string() + ": " + ec.message());
  EF_LOG(INFO, MODEL, "writing synthetic %s checkpoint (%d layers, scale 1/%d, seed %llu) to %s", shape.name.c_str(),
         shape.num_layers, shape.scale, static_cast<unsigned long long>(seed), dir.c_str());

  const int64_t H = c.hidden_size;
  json weight_map = json::object();
  ShardWriter w(seed);
  auto flush = [&](const std::string& file) -> Status {
    for (const auto& t : w.tensors()) weight_map[t.name] = file;
    return w.Write((tmp / file).string());
  };
  auto add_mlp = [&](const std::string& g, const std::string& u, const std::string& d, int64_t inter) {
    w.Add(g, {inter, H}, false);
    w.Add(u, {inter, H}, false);
    w.Add(d, {H, inter}, false);
  };
  w.Add("model.embed_tokens.weight", {c.vocab_size, H}, false);
  w.Add("model.norm.weight", {H}, true);
  w.Add("lm_head.weight", {c.vocab_size, H}, false);
  EF_RETURN_IF_ERROR(flush("model-embed.safetensors"));
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l);
    w.Add(p + ".input_layernorm.weight", {H}, true);
    w.Add(p + ".post_attention_layernorm.weight", {H}, true);
    w.Add(p + ".self_attn.q_proj.weight", {c.q_dim(), H}, false);
    w.Add(p + ".self_attn.k_proj.weight", {c.kv_dim(), H}, false);
    w.Add(p + ".self_attn.v_proj.weight", {c.kv_dim(), H}, false);
    w.Add(p + ".self_attn.o_proj.weight", {H, c.q_dim()}, false);
    if (c.qkv_bias) {
      w.Add(p + ".self_attn.q_proj.bias", {c.q_dim()}, false);
      w.Add(p + ".self_attn.k_proj.bias", {c.kv_dim()}, false);
      w.Add(p + ".self_attn.v_proj.bias", {c.kv_dim()}, false);
    }
    if (c.qk_norm == runtime::QkNorm::kPerHead) {
      w.Add(p + ".self_attn.q_norm.weight", {c.head_dim}, true);
      w.Add(p + ".self_attn.k_norm.weight", {c.head_dim}, true);
    } else if (c.qk_norm == runtime::QkNorm::kFull) {
      w.Add(p + ".self_attn.q_norm.weight", {c.q_dim()}, true);
      w.Add(p + ".self_attn.k_norm.weight", {c.kv_dim()}, true);
    }
    if (!c.IsMoeLayer(l)) {
      add_mlp(c.DenseMlpName(l, 0), c.DenseMlpName(l, 1), c.DenseMlpName(l, 2), c.intermediate_size);
    } else {
      w.Add(c.RouterName(l), {c.num_experts, H}, false);
      if (c.shared_expert_intermediate_size > 0) {
        add_mlp(c.SharedExpertName(l, 0), c.SharedExpertName(l, 1), c.SharedExpertName(l, 2),
                c.shared_expert_intermediate_size);
        w.Add(c.SharedExpertGateName(l), {1, H}, false);
      }
      for (int e = 0; e < c.num_experts; ++e)
        add_mlp(c.ExpertName(l, e, 0), c.ExpertName(l, e, 1), c.ExpertName(l, e, 2), c.moe_intermediate_size);
    }
    char file[64];
    std::snprintf(file, sizeof(file), "model-layer-%05d.safetensors", l);
    EF_RETURN_IF_ERROR(flush(file));
  }
  std::ofstream(tmp / "model.safetensors.index.json")
      << json{{"metadata", json::object()}, {"weight_map", weight_map}}.dump(1) << "\n";
  std::ofstream(tmp / "tokenizer.json") << TokenizerJson(c.vocab_size).dump() << "\n";
  std::ofstream(tmp / "config.json") << config_text;
  fs::rename(tmp, dir, ec);
  if (ec) {
    fs::remove_all(tmp);
    // Another process may have finished the same directory first; use it if so.
    if (fs::exists(dir / "model.safetensors.index.json")) return dir.string();
    return NotFound("cannot rename " + tmp.string() + " to " + dir.string() + ": " + ec.message());
  }
  return dir.string();
}

}  // namespace ef::launch
