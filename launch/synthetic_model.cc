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
#include "runtime/core/thread_pool.h"
#include "runtime/model/checkpoint_quant.h"
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
    SyntheticShape s;  // DeepSeek-V3 (and R1, the same architecture), FP8 as published
    s.name = "deepseek-v3";
    s.model_type = "deepseek_v3";
    s.vocab_size = 129280;
    s.hidden_size = 7168;
    s.intermediate_size = 18432;  // the dense first layers
    s.moe_intermediate_size = 2048;
    s.n_shared_experts = 1;
    s.shared_expert_intermediate_size = 2048;
    s.num_layers = 61;
    s.first_k_dense_replace = 3;
    s.num_experts = 256;
    s.top_k = 8;
    s.n_group = 8;
    s.topk_group = 4;
    s.routed_scaling_factor = 2.5;
    s.norm_topk_prob = true;
    s.num_heads = 128;
    s.num_kv_heads = 128;
    s.q_lora_rank = 1536;
    s.kv_lora_rank = 512;
    s.qk_nope_head_dim = 128;
    s.qk_rope_head_dim = 64;
    s.v_head_dim = 128;
    s.head_dim = 128 + 64;
    s.max_position_embeddings = 163840;
    s.rms_norm_eps = 1e-6;
    s.rope_theta = 10000;
    s.yarn_factor = 40;
    s.yarn_original_max_position_embeddings = 4096;
    s.yarn_mscale = 1;
    s.yarn_mscale_all_dim = 1;
    s.quant = "fp8";
    s.note =
        "decoder linear weights stored as F8_E4M3 with 128x128 block scales (weight_scale_inv), as DeepSeek publishes "
        "them; the multi-token-prediction layer is not written (num_nextn_predict_layers 0)";
    v.push_back(s);
  }
  {
    SyntheticShape s;  // gpt-oss-120b, MXFP4 experts as published
    s.name = "gpt-oss-120b";
    s.model_type = "gpt_oss";
    s.vocab_size = 201088;
    s.hidden_size = 2880;
    s.intermediate_size = 2880;
    s.moe_intermediate_size = 2880;
    s.num_layers = 36;
    s.num_experts = 128;
    s.top_k = 4;
    s.num_heads = 64;
    s.num_kv_heads = 8;
    s.head_dim = 64;
    s.max_position_embeddings = 131072;
    s.rms_norm_eps = 1e-5;
    s.rope_theta = 150000;
    s.yarn_factor = 32;
    s.yarn_original_max_position_embeddings = 4096;
    s.sliding_window = 128;
    s.swiglu_limit = 7;
    s.quant = "mxfp4";
    s.note = "experts stored as MXFP4 (e2m1 blocks with an e8m0 scale per 32 inputs), as OpenAI publishes them";
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

// A per-head dimension divided by `scale`: even (rotary pairs), at least 8.
int ScaleHeadDim(int d, int scale) { return d <= 0 ? d : std::max(8, d / scale / 2 * 2); }

int RoundUp(int d, int multiple) { return (d + multiple - 1) / multiple * multiple; }

// splitmix64: cheap, seedable, the same stream on every platform. It is a counter: value i of
// the stream seeded with `state` is Mix(state + (i + 1) * kGamma), so a tensor is filled in any
// order (spread over threads) with the same bytes.
constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ULL;
inline uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Value i of the stream `state` as uniform(-a, a) with standard deviation 0.02.
inline float UniformAt(uint64_t state, int64_t i) {
  static const float a = 0.02f * std::sqrt(3.f);
  const uint64_t z = Mix(state + (static_cast<uint64_t>(i) + 1) * kGamma);
  const float u = static_cast<float>(z >> 40) * (1.f / 16777216.f);  // [0, 1)
  return (2.f * u - 1.f) * a;
}

// store(j, UniformAt(state, first + j)) for j in [0, n), spread over ThreadPool::Default().
template <typename Store>
void FillUniform(uint64_t state, int64_t first, int64_t n, const Store& store) {
  ThreadPool::Default().ParallelFor(
      n,
      [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) store(j, UniformAt(state, first + j));
      },
      /*min_chunk=*/int64_t{1} << 16);
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

// Tensors of one shard, filled, written, then freed.
class ShardWriter {
 public:
  // fp8_block > 0: DeepSeek-V3's linear weights (DeepseekV3StoresAsFp8) are written as block FP8.
  ShardWriter(uint64_t seed, int fp8_block) : seed_(seed), fp8_block_(fp8_block) {}

  // A bf16 tensor of ones (norms) or random values; or a block FP8 weight (see the constructor).
  void Add(const std::string& name, std::vector<int64_t> shape, bool ones) {
    if (!ones && fp8_block_ > 0 && shape.size() == 2 && runtime::DeepseekV3StoresAsFp8(name)) {
      AddFp8(name, shape[0], shape[1]);
      return;
    }
    const int64_t n = Numel(shape);
    auto* d = reinterpret_cast<uint16_t*>(NewTensor(name, DType::kBF16, std::move(shape)));
    if (ones) {
      std::fill(d, d + n, F32ToBf16(1.f));
    } else {
      FillUniform(State(name), 0, n, [d](int64_t j, float v) { d[j] = F32ToBf16(v); });
    }
  }
  // A random F32 tensor.
  void AddF32(const std::string& name, std::vector<int64_t> shape) {
    const int64_t n = Numel(shape);
    auto* d = reinterpret_cast<float*>(NewTensor(name, DType::kF32, std::move(shape)));
    FillUniform(State(name), 0, n, [d](int64_t j, float v) { d[j] = v; });
  }
  // `experts` random [rows, cols] matrices as MXFP4: <name>_blocks [experts, rows, cols / 32, 16]
  // and <name>_scales [experts, rows, cols / 32] (U8). One expert's values are drawn at a time.
  void AddMxfp4(const std::string& name, int64_t experts, int64_t rows, int64_t cols) {
    const int64_t groups = cols / runtime::kMxfp4Group;
    uint8_t* blocks = NewTensor(name + "_blocks", DType::kU8, {experts, rows, groups, runtime::kMxfp4GroupBytes});
    uint8_t* scales = NewTensor(name + "_scales", DType::kU8, {experts, rows, groups});
    const int64_t n = rows * cols;
    values_.resize(static_cast<size_t>(n));
    for (int64_t e = 0; e < experts; ++e) {
      FillUniform(State(name), e * n, n, [this](int64_t j, float v) { values_[static_cast<size_t>(j)] = v; });
      runtime::EncodeMxfp4Rows(values_.data(), rows, cols, blocks + e * rows * groups * runtime::kMxfp4GroupBytes,
                               scales + e * rows * groups);
    }
  }
  Status Write(const std::string& path) {
    Status s = runtime::WriteSafetensors(path, tensors_, {{"format", "pt"}});
    tensors_.clear();
    data_.clear();
    values_ = {};
    return s;
  }
  // The tensors added since the last Write/TakeFile, as a file held in memory named `origin`.
  StatusOr<std::unique_ptr<runtime::SafetensorsFile>> TakeFile(const std::string& origin) {
    std::string bytes = runtime::SafetensorsBytes(tensors_, {{"format", "pt"}});
    tensors_.clear();
    data_.clear();
    values_ = {};
    return runtime::SafetensorsFile::FromBytes(std::move(bytes), origin);
  }
  const std::vector<runtime::TensorToWrite>& tensors() const { return tensors_; }

 private:
  static int64_t Numel(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  uint64_t State(const std::string& name) const { return seed_ ^ HashName(name); }
  uint8_t* NewTensor(const std::string& name, DType dtype, std::vector<int64_t> shape) {
    data_.emplace_back(static_cast<size_t>(Numel(shape)) * DTypeSize(dtype));
    tensors_.push_back({name, dtype, std::move(shape), data_.back().data()});
    return data_.back().data();
  }
  // <name> [rows, cols] as F8_E4M3 and <name>_scale_inv [ceil(rows / b), ceil(cols / b)] F32.
  void AddFp8(const std::string& name, int64_t rows, int64_t cols) {
    const int64_t b = fp8_block_;
    values_.resize(static_cast<size_t>(rows * cols));
    FillUniform(State(name), 0, rows * cols, [this](int64_t j, float v) { values_[static_cast<size_t>(j)] = v; });
    uint8_t* q = NewTensor(name, DType::kF8E4M3, {rows, cols});
    auto* scale_inv = reinterpret_cast<float*>(
        NewTensor(runtime::Fp8ScaleName(name), DType::kF32, {(rows + b - 1) / b, (cols + b - 1) / b}));
    runtime::EncodeFp8Blocks(values_.data(), rows, cols, fp8_block_, fp8_block_, q, scale_inv);
  }

  uint64_t seed_;
  int fp8_block_;
  std::vector<runtime::TensorToWrite> tensors_;
  std::list<std::vector<uint8_t>> data_;  // stable addresses
  std::vector<float> values_;             // the float values of one quantized tensor or expert
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
    s.first_k_dense_replace = std::min(s.first_k_dense_replace, layers - 1);
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
    if (s.kv_lora_rank > 0) {  // MLA
      s.q_lora_rank = ScaleDim(s.q_lora_rank, scale, 8);
      s.kv_lora_rank = ScaleDim(s.kv_lora_rank, scale, 8);
      s.qk_nope_head_dim = ScaleHeadDim(s.qk_nope_head_dim, scale);
      s.qk_rope_head_dim = ScaleHeadDim(s.qk_rope_head_dim, scale);
      s.v_head_dim = ScaleHeadDim(s.v_head_dim, scale);
      s.head_dim = s.qk_nope_head_dim + s.qk_rope_head_dim;
      s.num_kv_heads = s.num_heads;
      s.shared_expert_intermediate_size = s.n_shared_experts * s.moe_intermediate_size;
    }
    if (s.quant == "mxfp4") {  // every MXFP4 input dimension is whole groups of 32
      s.hidden_size = RoundUp(s.hidden_size, static_cast<int>(runtime::kMxfp4Group));
      s.intermediate_size = RoundUp(s.intermediate_size, static_cast<int>(runtime::kMxfp4Group));
      s.moe_intermediate_size = RoundUp(s.moe_intermediate_size, static_cast<int>(runtime::kMxfp4Group));
    }
  }
  return s;
}

namespace {

json SyntheticTag(const SyntheticShape& s) { return {{"shape", s.name}, {"scale", s.scale}}; }

// The key set of deepseek-ai/DeepSeek-V3's config.json (less auto_map, which names remote code,
// and training-only keys), plus head_dim and qk_head_dim, which transformers >= 5 writes.
json DeepseekV3Config(const SyntheticShape& s) {
  json rope_scaling = {{"type", "yarn"},
                       {"factor", s.yarn_factor},
                       {"original_max_position_embeddings", s.yarn_original_max_position_embeddings},
                       {"beta_fast", s.yarn_beta_fast},
                       {"beta_slow", s.yarn_beta_slow}};
  if (s.yarn_mscale > 0) rope_scaling["mscale"] = s.yarn_mscale;
  if (s.yarn_mscale_all_dim > 0) rope_scaling["mscale_all_dim"] = s.yarn_mscale_all_dim;
  return {{"architectures", json::array({"DeepseekV3ForCausalLM"})},
          {"model_type", "deepseek_v3"},
          {"vocab_size", s.vocab_size},
          {"hidden_size", s.hidden_size},
          {"intermediate_size", s.intermediate_size},
          {"moe_intermediate_size", s.moe_intermediate_size},
          {"num_hidden_layers", s.num_layers},
          {"first_k_dense_replace", s.first_k_dense_replace},
          {"moe_layer_freq", 1},
          {"num_nextn_predict_layers", 0},
          {"n_routed_experts", s.num_experts},
          {"n_shared_experts", s.n_shared_experts},
          {"num_experts_per_tok", s.top_k},
          {"n_group", s.n_group},
          {"topk_group", s.topk_group},
          {"topk_method", "noaux_tc"},
          {"scoring_func", "sigmoid"},
          {"norm_topk_prob", s.norm_topk_prob},
          {"routed_scaling_factor", s.routed_scaling_factor},
          {"num_attention_heads", s.num_heads},
          {"num_key_value_heads", s.num_heads},
          {"q_lora_rank", s.q_lora_rank},
          {"kv_lora_rank", s.kv_lora_rank},
          {"qk_nope_head_dim", s.qk_nope_head_dim},
          {"qk_rope_head_dim", s.qk_rope_head_dim},
          {"qk_head_dim", s.qk_nope_head_dim + s.qk_rope_head_dim},
          {"head_dim", s.qk_rope_head_dim},
          {"v_head_dim", s.v_head_dim},
          {"attention_bias", false},
          {"attention_dropout", 0.0},
          {"max_position_embeddings", s.max_position_embeddings},
          {"rope_theta", s.rope_theta},
          {"rope_scaling", rope_scaling},
          {"rope_interleave", true},
          {"rms_norm_eps", s.rms_norm_eps},
          {"hidden_act", "silu"},
          {"initializer_range", 0.02},
          {"pretraining_tp", 1},
          {"tie_word_embeddings", false},
          {"use_cache", true},
          {"torch_dtype", "bfloat16"},
          {"bos_token_id", 1},
          {"eos_token_id", 2},
          {"pad_token_id", 0},
          {"quantization_config",
           {{"activation_scheme", "dynamic"},
            {"fmt", "e4m3"},
            {"quant_method", "fp8"},
            {"weight_block_size", {s.fp8_block, s.fp8_block}}}},
          {"expertflow_synthetic", SyntheticTag(s)}};
}

// The key set of openai/gpt-oss-120b's config.json.
json GptOssConfig(const SyntheticShape& s) {
  json layer_types = json::array();
  for (int l = 0; l < s.num_layers; ++l) layer_types.push_back(l % 2 == 0 ? "sliding_attention" : "full_attention");
  return {{"architectures", json::array({"GptOssForCausalLM"})},
          {"model_type", "gpt_oss"},
          {"vocab_size", s.vocab_size},
          {"hidden_size", s.hidden_size},
          {"intermediate_size", s.intermediate_size},
          {"num_hidden_layers", s.num_layers},
          {"num_local_experts", s.num_experts},
          {"num_experts_per_tok", s.top_k},
          {"experts_per_token", s.top_k},
          {"num_attention_heads", s.num_heads},
          {"num_key_value_heads", s.num_kv_heads},
          {"head_dim", s.head_dim},
          {"attention_bias", true},
          {"attention_dropout", 0.0},
          {"layer_types", layer_types},
          {"sliding_window", s.sliding_window},
          {"max_position_embeddings", s.max_position_embeddings},
          {"initial_context_length", s.yarn_original_max_position_embeddings},
          {"rope_theta", s.rope_theta},
          {"rope_scaling",
           {{"rope_type", "yarn"},
            {"factor", s.yarn_factor},
            {"original_max_position_embeddings", s.yarn_original_max_position_embeddings},
            {"beta_fast", s.yarn_beta_fast},
            {"beta_slow", s.yarn_beta_slow},
            {"truncate", false}}},
          {"swiglu_limit", s.swiglu_limit},
          {"rms_norm_eps", s.rms_norm_eps},
          {"hidden_act", "silu"},
          {"initializer_range", 0.02},
          {"router_aux_loss_coef", 0.9},
          {"output_router_logits", false},
          {"tie_word_embeddings", false},
          {"use_cache", true},
          {"torch_dtype", "bfloat16"},
          {"bos_token_id", 1},
          {"eos_token_id", 2},
          {"pad_token_id", 0},
          {"quantization_config",
           {{"modules_to_not_convert",
             {"model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"}},
            {"quant_method", "mxfp4"}}},
          {"expertflow_synthetic", SyntheticTag(s)}};
}

}  // namespace

namespace {

// The tensors of the shard that holds the embedding, the final norm and the LM head.
void AddEmbedTensors(ShardWriter& w, const runtime::ModelConfig& c) {
  const int64_t H = c.hidden_size;
  w.Add("model.embed_tokens.weight", {c.vocab_size, H}, false);
  w.Add("model.norm.weight", {H}, true);
  w.Add("lm_head.weight", {c.vocab_size, H}, false);
}

// The tensors of decoder layer l (every name starts "model.layers.<l>.").
void AddLayerTensors(ShardWriter& w, const runtime::ModelConfig& c, int l) {
  const int64_t H = c.hidden_size;
  auto add_mlp = [&](const std::string& g, const std::string& u, const std::string& d, int64_t inter) {
    w.Add(g, {inter, H}, false);
    w.Add(u, {inter, H}, false);
    w.Add(d, {H, inter}, false);
  };
  const std::string p = "model.layers." + std::to_string(l);
  w.Add(p + ".input_layernorm.weight", {H}, true);
  w.Add(p + ".post_attention_layernorm.weight", {H}, true);
  if (c.mla) {
    const int64_t nh = c.num_heads, rope = c.qk_rope_head_dim, r = c.kv_lora_rank;
    if (c.q_lora_rank > 0) {
      w.Add(p + ".self_attn.q_a_proj.weight", {c.q_lora_rank, H}, false);
      w.Add(p + ".self_attn.q_a_layernorm.weight", {c.q_lora_rank}, true);
      w.Add(p + ".self_attn.q_b_proj.weight", {c.q_dim(), c.q_lora_rank}, false);
    } else {
      w.Add(p + ".self_attn.q_proj.weight", {c.q_dim(), H}, false);
    }
    w.Add(p + ".self_attn.kv_a_proj_with_mqa.weight", {r + rope, H}, false);
    w.Add(p + ".self_attn.kv_a_layernorm.weight", {r}, true);
    w.Add(p + ".self_attn.kv_b_proj.weight", {nh * (c.qk_nope_head_dim + c.v_head_dim), r}, false);
    w.Add(p + ".self_attn.o_proj.weight", {H, c.attn_out_dim()}, false);
  } else {
    w.Add(p + ".self_attn.q_proj.weight", {c.q_dim(), H}, false);
    w.Add(p + ".self_attn.k_proj.weight", {c.kv_dim(), H}, false);
    w.Add(p + ".self_attn.v_proj.weight", {c.kv_dim(), H}, false);
    w.Add(p + ".self_attn.o_proj.weight", {H, c.q_dim()}, false);
  }
  if (c.qkv_bias) {
    w.Add(p + ".self_attn.q_proj.bias", {c.q_dim()}, false);
    w.Add(p + ".self_attn.k_proj.bias", {c.kv_dim()}, false);
    w.Add(p + ".self_attn.v_proj.bias", {c.kv_dim()}, false);
  }
  if (c.o_bias) w.Add(p + ".self_attn.o_proj.bias", {H}, false);
  if (c.attention_sinks) w.Add(p + ".self_attn.sinks", {c.num_heads}, false);
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
    const std::string mlp = p + ".mlp.";
    const int64_t E = c.num_experts, I = c.moe_intermediate_size;
    w.Add(c.RouterName(l), {E, H}, false);
    if (c.router_bias) w.Add(mlp + "router.bias", {E}, false);
    if (c.score_correction_bias) w.AddF32(mlp + "gate.e_score_correction_bias", {E});
    if (c.shared_expert_intermediate_size > 0) {
      add_mlp(c.SharedExpertName(l, 0), c.SharedExpertName(l, 1), c.SharedExpertName(l, 2),
              c.shared_expert_intermediate_size);
      if (c.shared_expert_gated) w.Add(c.SharedExpertGateName(l), {1, H}, false);
    }
    if (c.expert_bias) {  // gpt_oss: fused gate_up (rows interleave gate and up) and down, with biases
      if (c.quant.method == runtime::WeightQuant::kMxfp4) {
        w.AddMxfp4(mlp + "experts.gate_up_proj", E, 2 * I, H);
        w.AddMxfp4(mlp + "experts.down_proj", E, H, I);
      } else {
        w.Add(mlp + "experts.gate_up_proj", {E, H, 2 * I}, false);
        w.Add(mlp + "experts.down_proj", {E, I, H}, false);
      }
      w.Add(mlp + "experts.gate_up_proj_bias", {E, 2 * I}, false);
      w.Add(mlp + "experts.down_proj_bias", {E, H}, false);
    } else {
      for (int e = 0; e < c.num_experts; ++e)
        add_mlp(c.ExpertName(l, e, 0), c.ExpertName(l, e, 1), c.ExpertName(l, e, 2), I);
    }
  }
}

std::string LayerShardName(int l) {
  char file[64];
  std::snprintf(file, sizeof(file), "model-layer-%05d.safetensors", l);
  return file;
}

}  // namespace

std::string SyntheticWeightFormat(const SyntheticShape& s) {
  if (s.quant == "fp8") return "bf16 + block FP8";
  if (s.quant == "mxfp4") return "bf16 + MXFP4";
  return "bf16";
}

std::string SyntheticConfigJson(const SyntheticShape& s) {
  if (s.model_type == "deepseek_v3") return DeepseekV3Config(s).dump(2);
  if (s.model_type == "gpt_oss") return GptOssConfig(s).dump(2);
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

namespace {

std::string CheckpointName(const SyntheticShape& shape, uint64_t seed) {
  return shape.name + "-L" + std::to_string(shape.num_layers) + "-x" + std::to_string(shape.scale) + "-s" +
         std::to_string(seed);
}

// Writes tokenizer.json and config.json into tmp and renames it to dir. `marker` is the file whose
// presence means dir is complete: when another process finished dir first, its dir is used.
StatusOr<std::string> Publish(const fs::path& tmp, const fs::path& dir, int vocab_size, const std::string& config_text,
                              const std::string& marker) {
  std::ofstream(tmp / "tokenizer.json") << TokenizerJson(vocab_size).dump() << "\n";
  std::ofstream(tmp / "config.json") << config_text;
  std::error_code ec;
  fs::rename(tmp, dir, ec);
  if (ec) {
    fs::remove_all(tmp);
    if (fs::exists(dir / marker)) return dir.string();
    return NotFound("cannot rename " + tmp.string() + " to " + dir.string() + ": " + ec.message());
  }
  return dir.string();
}

// A fresh temporary directory for dir's files under root.
StatusOr<fs::path> MakeTemp(const std::string& root, const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) return NotFound("cannot create " + root + ": " + ec.message());
  const fs::path tmp = fs::path(root) / (dir.filename().string() + ".tmp" + std::to_string(::getpid()));
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return NotFound("cannot create " + tmp.string() + ": " + ec.message());
  return tmp;
}

// The config.json of dir, or "" when there is none.
std::string ReadConfig(const fs::path& dir) {
  std::ifstream in(dir / "config.json");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

StatusOr<std::string> WriteSyntheticConfig(const SyntheticShape& shape, uint64_t seed, const std::string& root) {
  const fs::path dir = fs::path(root) / (CheckpointName(shape, seed) + "-config");
  const std::string config_text = SyntheticConfigJson(shape);
  if (fs::exists(dir / "tokenizer.json")) {
    if (ReadConfig(dir) == config_text) return dir.string();
    return FailedPrecondition(dir.string() + " holds a different synthetic model; remove it");
  }
  EF_ASSIGN_OR_RETURN(runtime::ModelConfig c, runtime::ModelConfig::FromJson(config_text, "synthetic " + shape.name));
  EF_ASSIGN_OR_RETURN(const fs::path tmp, MakeTemp(root, dir));
  return Publish(tmp, dir, c.vocab_size, config_text, "tokenizer.json");
}

StatusOr<std::string> WriteSyntheticCheckpoint(const SyntheticShape& shape, uint64_t seed, const std::string& root) {
  const fs::path dir = fs::path(root) / CheckpointName(shape, seed);
  const std::string config_text = SyntheticConfigJson(shape);
  if (fs::exists(dir / "model.safetensors.index.json")) {
    if (ReadConfig(dir) == config_text) return dir.string();
    return FailedPrecondition(dir.string() + " holds a different synthetic model; remove it");
  }
  EF_ASSIGN_OR_RETURN(runtime::ModelConfig c, runtime::ModelConfig::FromJson(config_text, "synthetic " + shape.name));
  EF_ASSIGN_OR_RETURN(const fs::path tmp, MakeTemp(root, dir));
  EF_LOG(INFO, MODEL, "writing synthetic %s checkpoint (%d layers, scale 1/%d, seed %llu) to %s", shape.name.c_str(),
         shape.num_layers, shape.scale, static_cast<unsigned long long>(seed), dir.c_str());

  json weight_map = json::object();
  ShardWriter w(seed, c.quant.method == runtime::WeightQuant::kFp8 ? shape.fp8_block : 0);
  auto flush = [&](const std::string& file) -> Status {
    for (const auto& t : w.tensors()) weight_map[t.name] = file;
    return w.Write((tmp / file).string());
  };
  AddEmbedTensors(w, c);
  EF_RETURN_IF_ERROR(flush("model-embed.safetensors"));
  for (int l = 0; l < c.num_layers; ++l) {
    AddLayerTensors(w, c, l);
    EF_RETURN_IF_ERROR(flush(LayerShardName(l)));
  }
  std::ofstream(tmp / "model.safetensors.index.json")
      << json{{"metadata", json::object()}, {"weight_map", weight_map}}.dump(1) << "\n";
  return Publish(tmp, dir, c.vocab_size, config_text, "model.safetensors.index.json");
}

StatusOr<SyntheticInMemory> BuildSyntheticCheckpoint(const SyntheticShape& shape, uint64_t seed,
                                                     const std::string& root, int distinct_layers) {
  if (distinct_layers < 0)
    return InvalidArgument("--synthetic-distinct-layers must be >= 0, got " + std::to_string(distinct_layers));
  const std::string config_text = SyntheticConfigJson(shape);
  EF_ASSIGN_OR_RETURN(runtime::ModelConfig c, runtime::ModelConfig::FromJson(config_text, "synthetic " + shape.name));
  SyntheticInMemory m;
  EF_ASSIGN_OR_RETURN(m.dir, WriteSyntheticConfig(shape, seed, root));
  const int distinct = distinct_layers == 0 ? c.num_layers : std::min(distinct_layers, c.num_layers);
  EF_LOG(INFO, MODEL,
         "generating synthetic %s weights in memory (%d layers, %d of them distinct, scale 1/%d, seed %llu)",
         shape.name.c_str(), c.num_layers, distinct, shape.scale, static_cast<unsigned long long>(seed));
  ShardWriter w(seed, c.quant.method == runtime::WeightQuant::kFp8 ? shape.fp8_block : 0);
  std::vector<std::unique_ptr<runtime::SafetensorsFile>> files;
  auto take = [&](const std::string& name) -> Status {
    EF_ASSIGN_OR_RETURN(auto f, w.TakeFile("synthetic " + shape.name + " (in memory) " + name));
    m.host_bytes += static_cast<int64_t>(f->file_size());
    files.push_back(std::move(f));
    return Status::Ok();
  };
  AddEmbedTensors(w, c);
  EF_RETURN_IF_ERROR(take("model-embed.safetensors"));
  // Layers past the distinct ones take the bytes of the generated layers of their kind, in turn.
  std::vector<std::pair<std::string, std::string>> aliases;
  std::vector<std::vector<std::string>> names(static_cast<size_t>(c.num_layers));  // of generated layers
  std::vector<int> generated[2];                                                   // [dense, moe]
  int turn[2] = {0, 0};
  for (int l = 0; l < c.num_layers; ++l) {
    std::vector<int>& same_kind = generated[c.IsMoeLayer(l) ? 1 : 0];
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    if (l < distinct || same_kind.empty()) {
      AddLayerTensors(w, c, l);
      for (const auto& t : w.tensors()) names[static_cast<size_t>(l)].push_back(t.name);
      EF_RETURN_IF_ERROR(take(LayerShardName(l)));
      same_kind.push_back(l);
      ++m.distinct_layers;
      continue;
    }
    int& k = turn[c.IsMoeLayer(l) ? 1 : 0];
    const int src = same_kind[static_cast<size_t>(k++) % same_kind.size()];
    const std::string src_prefix = "model.layers." + std::to_string(src) + ".";
    for (const std::string& name : names[static_cast<size_t>(src)]) {
      if (name.compare(0, src_prefix.size(), src_prefix) != 0)
        return Internal("synthetic layer tensor \"" + name + "\" is not under " + src_prefix);
      aliases.emplace_back(prefix + name.substr(src_prefix.size()), name);
    }
  }
  EF_ASSIGN_OR_RETURN(auto ck,
                      runtime::Checkpoint::FromFiles(m.dir + " (weights in memory)", std::move(files), aliases));
  m.checkpoint = std::move(ck);
  return m;
}

}  // namespace ef::launch
