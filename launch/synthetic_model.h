// Synthetic MoE checkpoints of real model shapes, for benchmarks (`expertflow bench --synthetic`).
//
//   EF_ASSIGN_OR_RETURN(SyntheticShape s, FindSyntheticShape("mixtral-8x7b"));
//   s = ScaleSyntheticShape(s, /*layers=*/32, /*scale=*/64);
//   EF_ASSIGN_OR_RETURN(std::string dir, WriteSyntheticCheckpoint(s, /*seed=*/1, DefaultSyntheticRoot()));
//   auto engine = runtime::Engine::Create(dir, options);   // the normal loader, nothing special
//
// The checkpoint is a Hugging Face directory (config.json, one bf16 safetensors shard per layer
// plus model.safetensors.index.json, and a minimal byte-level tokenizer.json), so every path of
// the engine — loader, expert cache, trace routing — runs exactly as on a real model. Weights are
// uniform with standard deviation 0.02 (norms 1), from a generator seeded by `seed` and the tensor's name, so the same
// (shape, seed) gives the same bytes on every machine. Directories are cached under `root` by
// name (<shape>-L<layers>-x<scale>-s<seed>); a finished directory is reused, a new one is written
// under a temporary name and renamed into place, so a crash never leaves a half-written one.
//
// Peak host memory while writing is one layer's tensors (the shards are written one at a time).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/core/status.h"

namespace ef::launch {

struct SyntheticShape {
  std::string name;        // "mixtral-8x7b", ...
  std::string model_type;  // mixtral | qwen2_moe | qwen3_moe | olmoe (what the engine loads)
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;      // dense MLP (mixtral/olmoe: the expert FFN)
  int moe_intermediate_size = 0;  // expert FFN (qwen2_moe/qwen3_moe)
  int shared_expert_intermediate_size = 0;
  int num_layers = 0;
  int num_experts = 0;
  int top_k = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_position_embeddings = 4096;
  bool norm_topk_prob = false;
  std::vector<int> mlp_only_layers;  // dense layers (deepseek-v2-lite: layer 0)
  int scale = 1;                     // divisor applied by ScaleSyntheticShape
  std::string note;                  // how the shape approximates the real model, if it does
};

// The built-in shapes: mixtral-8x7b, qwen1.5-moe, deepseek-v2-lite, olmoe, qwen3-30b-a3b, tiny.
std::vector<std::string> SyntheticShapeNames();
StatusOr<SyntheticShape> FindSyntheticShape(const std::string& name);

// `layers` > 0 replaces the layer count; `scale` > 1 divides hidden, FFN sizes, vocabulary and
// head counts (head_dim too, down to 8), keeping layers, experts and top-k, so the routing and
// the cache behave as on the full model while CPU runs stay small.
StatusOr<SyntheticShape> ScaleSyntheticShape(SyntheticShape shape, int layers, int scale);

// config.json text of the shape (the engine's ModelConfig::FromJson accepts it).
std::string SyntheticConfigJson(const SyntheticShape& shape);

// <temp dir>/expertflow-synthetic (the temp dir honours $TMPDIR).
std::string DefaultSyntheticRoot();

// Writes (or reuses) the checkpoint directory of `shape` and `seed` under `root`; returns its path.
StatusOr<std::string> WriteSyntheticCheckpoint(const SyntheticShape& shape, uint64_t seed, const std::string& root);

}  // namespace ef::launch
