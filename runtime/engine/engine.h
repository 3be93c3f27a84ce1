// Engine: the forward pass of an MoE decoder over a backend, with a per-sequence KV cache.
//
// One Forward() call runs a batch of chunks; each chunk appends tokens to one sequence (a whole
// prompt for prefill, one token for decode, or anything between), so prefill and decode mix
// freely and sequences of different lengths batch together. Per layer: attention over each
// sequence's cache, then the MoE block: router top-k (the truth) -> routing hooks (observers,
// overrides) -> the ExpertSource is told the layer's experts -> per expert: gather its tokens,
// gate/up GEMMs, SiLU*up, down GEMM, weighted scatter-add.
//
// Not thread-safe: one thread drives an engine.
#pragma once

#include <array>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/core/sample_row.h"
#include "runtime/engine/expert_source.h"
#include "runtime/engine/host_router.h"
#include "runtime/engine/kv_cache.h"
#include "runtime/engine/model_weights.h"
#include "runtime/engine/moe_executor.h"

namespace ef::runtime {

inline constexpr int64_t kMaxKvCacheTokens = (int64_t{1} << 31) - 1;  // EngineOptions::kv_cache_tokens

struct EngineOptions {
  std::string backend = "cpu";  // cpu | cuda | auto
  int device = 0;
  int max_seq_len = 0;  // KV capacity per sequence; 0: the model's max_position_embeddings
  // A max_seq_len past the positions the model was trained for (max_position_embeddings, or yarn's
  // factor x original_max_position_embeddings) is refused unless this is set (random-weight
  // benchmarks, whose positions mean nothing).
  bool allow_untrained_positions = false;
  // true: every routed expert is uploaded to the backend at Create (ResidentExpertSource).
  // false: none is, so a model whose experts exceed the device still loads; Forward then needs an
  // ExpertSource (SetExpertSource, e.g. the expert cache) or UploadExperts() first, and fails with
  // FailedPrecondition otherwise.
  bool upload_experts = true;
  // Attention on the cuda backend: "bf16" stages Q, K, V and P in bf16 for tensor cores (fp32
  // accumulation; prefill chunks, and decode rows over a bf16 KV cache), "fp32" keeps the exact
  // fp32 kernels, "auto" picks bf16 when the model's
  // attention weights are 16-bit (its GEMMs then round activations to bf16 already). The cpu
  // backend always computes in fp32.
  std::string attention_precision = "auto";
  // Keys and values in the KV cache: "fp32" (exact), "bf16" (half the memory and half the bytes
  // decode attention reads; scores and softmax stay fp32), or "auto": bf16 where prefill attention
  // runs in bf16 (attention_precision above resolved to bf16: the cuda backend, 16-bit attention
  // weights, plain attention), fp32 otherwise. bf16 needs plain attention (not MLA, rope scaling,
  // sinks or a sliding window: their kernels read fp32).
  std::string kv_cache_dtype = "auto";
  // Paged KV cache: token rows per block (a power of two up to 1024), all sequences sharing one
  // pool; 0 gives each sequence max_seq_len rows of its own at AddSequence (the contiguous layout).
  int kv_block_size = 16;
  // Paged: the pool's capacity in tokens over all sequences (allocated on first use; a pass that
  // needs more fails with ResourceExhausted and changes nothing). 0: the pool starts at
  // min(max_seq_len, 4096) tokens and doubles when full.
  int64_t kv_cache_tokens = 0;  // at most kMaxKvCacheTokens
  // Dequantize the routed experts of MXFP4 / block FP8 checkpoints at load instead of keeping them
  // at their stored size (LoadOptions::dequantize_experts).
  bool dequantize_experts = false;
  // Weights already opened (LoadOptions::checkpoint: a synthetic checkpoint built in memory);
  // null: the safetensors of model_dir.
  std::shared_ptr<const Checkpoint> checkpoint;
  // Decode steps (one new token per sequence) of a model with plain attention on the paged cache
  // read their lengths and block tables from device memory (Backend::UploadStepSeqs); on CUDA, a
  // step that also keeps its routing on the device is recorded as a graph the second time its
  // shape (sequences, attention plan) comes, and replayed with one launch after that. Same numbers
  // as without. false: every step launches its ops one by one.
  bool cuda_graphs = true;
  // Sampled rows of token-only chunks are drawn on the backend when it samples
  // (Backend::SamplesRows); false: always on the host from their logits (the same tokens).
  bool backend_sampling = true;
};

// One chunk of a batch: tokens appended to sequence `seq`.
struct SeqChunk {
  int64_t seq = 0;
  std::span<const int32_t> tokens;
  bool all_logits = false;  // logits for every token (score) or only the last (generate)
  // Only the token of its rows is wanted, picked on the backend: ForwardResult::tokens. When every
  // chunk of a pass says so its logits stay on the backend (R ids come back instead of R x vocab
  // floats). The token is the arg max (greedy), or with `sampling` the token runtime::SampleRow
  // draws with it (Backend::SampleRows; every row of the chunk with the same draw).
  bool token_only = false;
  std::optional<RowSampling> sampling = std::nullopt;
};

// A layer's routing, on the host, for the hooks. Rows follow the batch's token order.
struct LayerRouting {
  int layer = 0;          // decoder layer index
  MoeLayer moe_layer{0};  // its index among MoE layers
  int num_tokens = 0;
  int top_k = 0;
  std::span<int32_t> ids;        // [num_tokens * top_k], mutable: an override may rewrite it
  std::span<float> weights;      // [num_tokens * top_k]
  std::span<const int64_t> seq;  // sequence of each token row
  std::span<const int32_t> pos;  // position of each token row
  std::span<const int32_t> token_ids;
  // The normalised hidden states the router used, [num_tokens * hidden_size] row-major, on the
  // host; empty unless Engine::set_expose_router_inputs(true) (a copy from the backend per layer).
  std::span<const float> hidden;
};

using RoutingHook = std::function<Status(LayerRouting&)>;

struct ForwardResult {
  // Logits, row-major [rows][vocab]: per chunk, all its tokens or its last one.
  std::vector<float> logits;
  std::vector<int> row_offset;  // first row of each chunk
  // When a chunk asked (SeqChunk::token_only): the token of every row, picked on the backend (the
  // arg max, runtime::ArgMax's contract, for rows of chunks without SeqChunk::sampling); else empty.
  // logits is empty when every chunk asked, unless the backend does not sample
  // (Backend::SamplesRows) and a chunk has sampling: then they come back and the host draws.
  std::vector<int32_t> tokens;
};

class Engine {
 public:
  static StatusOr<std::unique_ptr<Engine>> Create(const std::string& model_dir, const EngineOptions& options);
  ~Engine();

  const ModelConfig& config() const { return weights_->config(); }
  const ModelWeights& weights() const { return *weights_; }
  Backend& backend() { return *backend_; }
  const Backend& backend() const { return *backend_; }
  int max_seq_len() const { return max_seq_len_; }
  // Paged KV cache of a fixed size (EngineOptions::kv_cache_tokens): the blocks a sequence of
  // `tokens` tokens takes and the pool's total; 0 and 0 when the cache grows or is contiguous.
  int64_t KvBlocksFor(int64_t tokens) const;
  int64_t kv_capacity_blocks() const;
  // Blocks of a fixed-size paged KV cache not held by any sequence (-1: the cache grows or is
  // contiguous).
  int64_t kv_free_blocks() const;
  // Token rows of the KV cache held by sequences and allocated in all (paged: the pool; contiguous:
  // max_seq_len per sequence).
  struct KvUsage {
    int64_t used_tokens = 0;
    int64_t allocated_tokens = 0;
  };
  KvUsage kv_usage() const;
  // Why the last Forward failed for memory, if it did: the paged KV cache could not give its
  // sequences the blocks they needed (full, or its growth did not fit), or the batch's activation
  // buffers (the engine's, the MoE executor's) did not fit on the backend. Either way it changed
  // nothing and can be retried: with fewer sequences (blocks) or fewer tokens (activations).
  // (Workspaces a backend grows inside an op fail the backend instead: not retryable.)
  enum class OutOfMemory { kNone, kKvBlocks, kActivations };
  OutOfMemory last_forward_out_of_memory() const { return last_forward_out_of_memory_; }

  // Replaces where expert weights come from (default: all resident). The engine keeps a pointer;
  // the caller keeps it alive. nullptr restores the resident experts (none when the engine was
  // created with upload_experts = false and UploadExperts() was not called).
  void SetExpertSource(ExpertSource* source) { local_moe_->set_expert_source(source ? source : resident_.get()); }
  // Uploads every routed expert (the ResidentExpertSource upload_experts = true makes at Create)
  // and makes it the expert source. A no-op when they are resident already.
  Status UploadExperts();
  bool experts_resident() const { return resident_ != nullptr; }
  // Whether attention stages its operands in bf16 (EngineOptions::attention_precision).
  bool reduced_precision_attention() const { return reduced_precision_attention_; }
  // The KV cache's element type as resolved from EngineOptions::kv_cache_dtype: kF32 or kBF16.
  DType kv_cache_dtype() const { return kv_bf16_ ? DType::kBF16 : DType::kF32; }
  // Replaces how routed experts are computed (default: all on this process). nullptr restores
  // the local executor. The caller keeps it alive.
  void SetMoeExecutor(MoeExecutor* executor) { moe_executor_ = executor ? executor : local_moe_.get(); }
  LocalMoeExecutor& local_moe() { return *local_moe_; }
  // Hooks run in order after each MoE layer's router (observers, trace recorders, overrides).
  // Returns an id for RemoveRoutingHook.
  int AddRoutingHook(RoutingHook hook) {
    hooks_.emplace_back(next_hook_id_, std::move(hook));
    return next_hook_id_++;
  }
  // Observers see each MoE layer's routing without changing it (counters, traces, score's router
  // rows). They run in layer order, but may run only when the forward pass ends: a step that keeps
  // the routing on the device (below) copies it to the host once, after the logits. Returns an id
  // for RemoveRoutingHook.
  int AddRoutingObserver(RoutingHook observer) {
    observers_.emplace_back(next_hook_id_, std::move(observer));
    return next_hook_id_++;
  }
  void RemoveRoutingHook(int id) {
    std::erase_if(hooks_, [id](const auto& h) { return h.first == id; });
    std::erase_if(observers_, [id](const auto& h) { return h.first == id; });
  }
  void ClearRoutingHooks() {
    hooks_.clear();
    observers_.clear();
  }
  // Whether the last Forward kept the routing of its MoE layers on the device (Backend::MoeRouted:
  // resident experts, no routing hook, at most Backend::MoeRoutedMaxTokens() rows) instead of
  // waiting for it at every layer.
  bool last_forward_device_routed() const { return last_device_routed_; }
  // Decode steps run from graphs (EngineOptions::cuda_graphs): recorded, replayed (a recorded step
  // counts as replayed too), and recordings the backend refused (those steps ran op by op).
  struct GraphStats {
    int64_t recorded = 0;
    int64_t replayed = 0;
    int64_t refused = 0;
  };
  const GraphStats& graph_stats() const { return graph_stats_; }
  // Rows of token-only chunks drawn with a temperature (SeqChunk::sampling): on the backend
  // (Backend::SampleRows), or on the host from their logits (backend_sampling off, or a backend
  // that does not sample).
  struct SamplingStats {
    int64_t on_backend = 0;
    int64_t on_host = 0;
  };
  const SamplingStats& sampling_stats() const { return sampling_stats_; }
  // When on, LayerRouting::hidden carries each MoE layer's router input (lookahead predictors).
  // Off by default: the copy to the host costs T x hidden floats per MoE layer.
  void set_expose_router_inputs(bool on) { expose_router_inputs_ = on; }
  bool expose_router_inputs() const { return expose_router_inputs_; }

  // Starts an empty sequence (error if it exists).
  Status AddSequence(int64_t seq);
  void RemoveSequence(int64_t seq);
  // One prefill of `tokens` tokens (at most the context less one) and one decode step on a
  // sequence of its own, then removed: loads the backend's kernels, plans its GEMMs and grows its
  // scratch before the first request pays for them (on the H200 the first 2k-token prefill of a
  // Mixtral shape took ~100 ms more than the next). Routing hooks and observers do not see it
  // (a trace override or a predictor would take its tokens for a request's); an expert source
  // (cache) does. Returns the time it took.
  StatusOr<double> WarmUp(int tokens);
  bool HasSequence(int64_t seq) const { return seqs_.count(seq) != 0; }
  int SequenceLength(int64_t seq) const;

  Status Forward(std::span<const SeqChunk> batch, ForwardResult* result);

 private:
  // What one Forward enqueues from the embedding to the logits (no transfer to the host, so that a
  // decode step can be recorded as a graph).
  struct Pass {
    std::span<const SeqChunk> batch;
    int64_t T = 0, R = 0;
    const int32_t* tokens_dev = nullptr;
    const int32_t* pos_dev = nullptr;
    const int32_t* rows_dev = nullptr;
    int32_t* tokens_out_dev = nullptr;          // null: no token wanted
    const RowSampling* sampling_dev = nullptr;  // null: the tokens are arg maxes
    bool device_routing = false;
    const std::vector<int64_t>* row_seq = nullptr;
    const std::vector<int32_t>* row_pos = nullptr;
    const std::vector<int32_t>* row_tok = nullptr;
  };
  Status RunLayers(const Pass& p);
  // A decode step whose sequences the backend holds on the device (EngineOptions::cuda_graphs).
  bool StepPass(std::span<const SeqChunk> batch) const;
  // RunLayers through a graph of the step's shape: replayed, recorded now (the shape's second
  // step), or run op by op (its first step, or a shape the backend would not record).
  Status RunGraphed(const Pass& p, uint64_t plan);
  // Drops every graph when memory they point into has moved.
  void SyncGraphLayout();
  Status ConfigureAttentionPrecision(const std::string& precision);
  Status ConfigureKvCache(const std::string& dtype);
  // Per layer, max_seq_len rows of config().kv_cache_key_width() values in k and of
  // kv_cache_value_width() values in v, fp32 or bf16 (kv_bf16_) (MLA: v is empty; k holds the normalised latent then
  // the rotated shared rope key, the compressed form both prefill and decode attend over).
  // Paged (kv_): the sequence's block table instead (rows in the pool, PagedKvCache).
  struct Sequence {
    int length = 0;
    std::vector<Buffer> k, v;
    std::vector<int32_t> blocks;
  };
  Engine() = default;
  // Activation buffers are sized once per Forward (ReserveScratch: a clear error when the
  // backend cannot hold them); Scratch then only hands them out.
  Status GrowScratch(int slot, size_t floats);
  Status ReserveScratch(int64_t T, int64_t R);
  float* Scratch(int slot, size_t floats);
  // The normalised hidden rows' bf16 twin (Backend::Bf16Twins) where a GEMM over weights like
  // `reader` would round them to bf16 itself; else null.
  uint16_t* NormTwin(int64_t T, const Weight& reader);
  // h = RmsNorm(x), and its twin into h16 unless null.
  void Norm(const float* x, int64_t T, const Weight& norm, float* h, uint16_t* h16);
  // y = x . w^T (+ bias) as Backend::Gemm computes it, from x's twin x16 unless null.
  void GemmTwin(const float* x, const uint16_t* x16, int64_t T, const Weight& w, const Weight* bias, float* y);
  // h16: the twin of the normalised rows (kNormed) or null.
  Status Attention(int layer, std::span<const SeqChunk> batch, const int32_t* positions_dev, int64_t T,
                   const uint16_t* h16);
  Status MlaAttention(int layer, std::span<const SeqChunk> batch, const int32_t* positions_dev, int64_t T);
  // resid += attn . o^T (+ o_bias): the attention block's output projection and residual.
  void AddOutputProjection(const LayerWeights& L, const float* attn, int64_t T);
  // Appends each chunk's new rows of k (and v unless null) to its sequence's cache of `layer`;
  // returns the batch's attention descriptors.
  std::vector<AttentionSeq> AppendKv(int layer, std::span<const SeqChunk> batch, const float* k, const float* v);
  // Paged: the batch's sequences get the blocks their new rows need (all or nothing) and their
  // block tables go to the backend in one copy (block_tables_dev_, one offset per chunk).
  Status ReserveKvBlocks(std::span<const SeqChunk> batch);
  // The router's expert ids and weights of T rows, on the host.
  void Route(const LayerWeights& L, int64_t T, const float* logits, std::vector<int32_t>* ids, std::vector<float>* wts);
  Status MoeBlock(int layer, int64_t T, const float* h, const uint16_t* h16, float* out,
                  const std::vector<int64_t>& row_seq, const std::vector<int32_t>& row_pos,
                  const std::vector<int32_t>& row_tok);
  Status Mlp(const ExpertWeights& w, int64_t rows, const float* x, float* out);
  // Device pointer tables of the resident experts per MoE layer (Backend::MoeRouted); a layer
  // whose experts the routed path cannot take (biases, clamped SwiGLU, shared experts, quantized
  // or mixed dtypes) gets none.
  Status BuildRoutedTables();
  // Whether this step's MoE layers may keep their routing on the device (see last_forward_device_routed).
  bool DeviceRouting(int64_t T) const;
  // The router's top-k of T rows into the device routing buffer of MoE layer `moe_layer` (ids
  // then weights), for MoeRouted and the observers.
  std::pair<int32_t*, float*> DeviceRoutingSlot(MoeLayer moe_layer, int64_t T);
  // After a device-routed step: the step's routing to the host in one copy, every id checked
  // (an error like the host path's for an out-of-range expert), then the observers per layer.
  Status FinishDeviceRouting(int64_t T, const std::vector<int64_t>& row_seq, const std::vector<int32_t>& row_pos,
                             const std::vector<int32_t>& row_tok);

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<ResidentExpertSource> resident_;
  std::unique_ptr<LocalMoeExecutor> local_moe_;
  std::unique_ptr<HostRouter> host_router_;  // null when the backend's RouterTopK suffices
  MoeExecutor* moe_executor_ = nullptr;
  std::vector<std::pair<int, RoutingHook>> hooks_;  // (id, hook), in the order added
  std::vector<std::pair<int, RoutingHook>> observers_;
  std::vector<RoutedExpertTable> routed_;  // per decoder layer; num_experts 0: none
  std::vector<Buffer> routed_tables_;      // their pointer arrays
  bool last_device_routed_ = false;
  OutOfMemory last_forward_out_of_memory_ = OutOfMemory::kNone;
  int next_hook_id_ = 0;
  std::map<int64_t, Sequence> seqs_;
  int max_seq_len_ = 0;
  std::vector<Buffer> scratch_;
  std::vector<float> routing_host_;  // host copy of a layer's router ids + weights (or logits)
  bool expose_router_inputs_ = false;
  bool reduced_precision_attention_ = false;
  bool kv_bf16_ = false;                       // the KV cache holds bf16 (EngineOptions::kv_cache_dtype)
  std::unique_ptr<PagedKvCache> kv_;           // null: contiguous per-sequence caches
  const int32_t* block_tables_dev_ = nullptr;  // this pass's block tables (scratch)
  std::vector<int64_t> block_table_offset_;    // per chunk of the pass
  std::vector<float> router_inputs_;           // host copy behind LayerRouting::hidden
  // Decode graphs: by (sequences, the backend's plan fingerprint); id -1 until recorded. A shape
  // is recorded on its second step (the first grows whatever scratch it needs) unless refused.
  bool cuda_graphs_ = true;
  bool backend_sampling_ = true;  // EngineOptions::backend_sampling
  bool step_pass_ = false;        // this pass uses the backend's step ops
  struct GraphEntry {
    int id = -1;
    int steps = 0;
    bool refused = false;
  };
  std::map<std::tuple<int64_t, uint64_t, int>, GraphEntry> graphs_;  // (T, plan, 0 logits/1 arg max/2 sampled)
  std::array<uint64_t, 3> graph_layout_{};                           // the layout graphs_ was recorded against
  uint64_t scratch_generation_ = 0;                                  // incremented when a scratch buffer moves
  GraphStats graph_stats_;
  SamplingStats sampling_stats_;
};

}  // namespace ef::runtime
