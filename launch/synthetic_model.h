// Synthetic MoE checkpoints of real model shapes, for benchmarks (`expertflow bench --synthetic`).
//
//   EF_ASSIGN_OR_RETURN(SyntheticShape s, FindSyntheticShape("mixtral-8x7b"));
//   s = ScaleSyntheticShape(s, /*layers=*/32, /*scale=*/64);
//   EF_ASSIGN_OR_RETURN(std::string dir, WriteSyntheticCheckpoint(s, /*seed=*/1, DefaultSyntheticRoot()));
//   auto engine = runtime::Engine::Create(dir, options);   // the normal loader, nothing special
//
// The checkpoint is a Hugging Face directory (config.json, one safetensors shard per layer plus
// model.safetensors.index.json, and a minimal byte-level tokenizer.json), so every path of the
// engine — loader, expert cache, trace routing — runs exactly as on a real model. Weights are
// uniform with standard deviation 0.02 (norms 1), from a generator seeded by `seed` and the tensor's name, so the same
// (shape, seed) gives the same bytes on every machine. Directories are cached under `root` by
// name (<shape>-L<layers>-x<scale>-s<seed>); a finished directory is reused, a new one is written
// under a temporary name and renamed into place, so a crash never leaves a half-written one.
//
// Tensors are bf16, except where the shape stores weights quantized as its model publishes them
// (the values are drawn as above, then encoded with runtime/model/checkpoint_quant.h):
//   deepseek-v3   model_type deepseek_v3; every decoder linear weight (attention projections,
//                 dense MLPs, shared and routed experts) is F8_E4M3 with an F32
//                 <name>_scale_inv per 128x128 block, quantization_config {quant_method fp8,
//                 fmt e4m3, activation_scheme dynamic, weight_block_size [128, 128]};
//                 e_score_correction_bias is F32; router, norms, embedding and lm_head bf16.
//   gpt-oss-120b  model_type gpt_oss; each layer's experts are MXFP4: gate_up_proj_blocks
//                 [E, 2I, H / 32, 16] + gate_up_proj_scales [E, 2I, H / 32] (rows interleave gate
//                 and up) and down_proj_blocks [E, H, I / 32, 16] + down_proj_scales, e2m1 codes
//                 with an e8m0 scale per 32 inputs, quantization_config {quant_method mxfp4};
//                 expert biases, attention (with its biases and sinks) and router bf16.
// Loaded like any checkpoint (ModelWeights), both keep their routed experts packed at the stored
// size (kFp8Block, kMxfp4), so benchmarks on them move and compute the published byte counts.
//
// Peak host memory while writing is one layer's tensors (the shards are written one at a time),
// plus the float values of one quantized tensor (one layer's experts of gpt-oss: one expert).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/core/status.h"
#include "runtime/model/checkpoint.h"

namespace ef::launch {

struct SyntheticShape {
  std::string name;        // "mixtral-8x7b", ...
  std::string model_type;  // mixtral | qwen2_moe | qwen3_moe | olmoe | deepseek_v3 | gpt_oss (what the engine loads)
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;      // dense MLP (mixtral/olmoe/gpt_oss: the expert FFN)
  int moe_intermediate_size = 0;  // expert FFN (qwen2_moe/qwen3_moe/deepseek_v3; gpt_oss: = intermediate_size)
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
  double rms_norm_eps = 1e-5;
  double rope_theta = 1e6;
  // YaRN rope (rope_scaling type yarn) when yarn_factor > 0; mscales 0: not written.
  double yarn_factor = 0;
  int yarn_original_max_position_embeddings = 0;
  double yarn_beta_fast = 32, yarn_beta_slow = 1;
  double yarn_mscale = 0, yarn_mscale_all_dim = 0;

  // deepseek_v3: multi-head latent attention and group-limited sigmoid routing. num_kv_heads =
  // num_heads; shared_expert_intermediate_size = n_shared_experts x moe_intermediate_size.
  int q_lora_rank = 0;
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;
  int n_shared_experts = 0;
  int first_k_dense_replace = 0;  // layers [0, k) are dense
  int n_group = 1;
  int topk_group = 1;
  double routed_scaling_factor = 1;

  // gpt_oss: layers alternate sliding_attention (even) and full_attention (odd).
  int sliding_window = 0;
  double swiglu_limit = 7;

  // How weights are stored: "" (bf16), "fp8" (block FP8, fp8_block x fp8_block) or "mxfp4".
  std::string quant;
  int fp8_block = 128;

  int scale = 1;     // divisor applied by ScaleSyntheticShape
  std::string note;  // how the shape approximates the real model, if it does
};

// The built-in shapes: mixtral-8x7b, qwen1.5-moe, deepseek-v2-lite, olmoe, qwen3-30b-a3b,
// deepseek-v3, gpt-oss-120b, tiny.
std::vector<std::string> SyntheticShapeNames();
StatusOr<SyntheticShape> FindSyntheticShape(const std::string& name);

// `layers` > 0 replaces the layer count (dense layers are dropped first: mlp_only_layers past
// the end go, and first_k_dense_replace becomes at most layers - 1, so one MoE layer remains);
// `scale` > 1 divides hidden, FFN sizes, vocabulary and head counts (head_dim too, down to 8;
// the MLA ranks to a multiple of 8, at least 8; qk_nope/qk_rope/v head dims as head_dim),
// keeping layers, experts, top-k, n_group and topk_group, so the routing and the cache behave as
// on the full model while CPU runs stay small. MXFP4 shapes round hidden and FFN sizes up to a
// multiple of 32 (an MXFP4 group); block FP8 keeps weight_block_size [128, 128] whatever the
// widths: the format allows a partial last block in each dimension (as the published
// kv_a_proj_with_mqa [576, 7168] has), and the loader reads it so.
StatusOr<SyntheticShape> ScaleSyntheticShape(SyntheticShape shape, int layers, int scale);

// config.json text of the shape (the engine's ModelConfig::FromJson accepts it). deepseek_v3 and
// gpt_oss write the key set of their published config.json (rope as rope_theta + rope_scaling,
// quantization_config), with the synthetic tokenizer's bos 1, eos 2 and pad 0.
std::string SyntheticConfigJson(const SyntheticShape& shape);

// "bf16", "bf16 + block FP8" or "bf16 + MXFP4": how the shape's weights are stored.
std::string SyntheticWeightFormat(const SyntheticShape& shape);

// <temp dir>/expertflow-synthetic (the temp dir honours $TMPDIR).
std::string DefaultSyntheticRoot();

// Writes (or reuses) the checkpoint directory of `shape` and `seed` under `root`; returns its path.
StatusOr<std::string> WriteSyntheticCheckpoint(const SyntheticShape& shape, uint64_t seed, const std::string& root);

// The same checkpoint with its weights generated into host memory instead of written
// (`expertflow bench --synthetic-in-memory`): for shapes larger than the disk (32 Mixtral-8x7B
// layers are 93 GB). Only config.json and tokenizer.json go to disk, in
// <root>/<name>-config (WriteSyntheticConfig); the engine takes the weights through
// EngineOptions::checkpoint:
//
//   EF_ASSIGN_OR_RETURN(SyntheticInMemory m, BuildSyntheticCheckpoint(s, 1, root, /*distinct_layers=*/2));
//   options.checkpoint = m.checkpoint;
//   auto engine = runtime::Engine::Create(m.dir, options);
//
// distinct_layers = 0 generates every layer, with the bytes WriteSyntheticCheckpoint writes.
// distinct_layers = N > 0 generates the embedding shard and the first N layers (and the first
// layer of a kind, MoE or dense, that those lack); every later layer repeats the bytes of the
// generated layers of its kind, in turn (Checkpoint::FromFiles aliases), so host memory holds N
// layers while the engine loads and uploads every layer as its own weights. Speed does not depend
// on the values; the router of a repeated layer sees that layer's own hidden states.
struct SyntheticInMemory {
  std::string dir;  // config.json and tokenizer.json
  std::shared_ptr<const runtime::Checkpoint> checkpoint;
  int distinct_layers = 0;  // layers generated
  int64_t host_bytes = 0;   // bytes of the generated files
};
StatusOr<SyntheticInMemory> BuildSyntheticCheckpoint(const SyntheticShape& shape, uint64_t seed,
                                                     const std::string& root, int distinct_layers);

// Writes (or reuses) <root>/<name>-config with the shape's config.json and tokenizer.json only.
StatusOr<std::string> WriteSyntheticConfig(const SyntheticShape& shape, uint64_t seed, const std::string& root);

}  // namespace ef::launch
