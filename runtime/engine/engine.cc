#include "runtime/engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <numeric>

#include "runtime/core/check.h"
#include "runtime/core/logging.h"
#include "runtime/core/thread_pool.h"

namespace ef::runtime {
namespace {
// Scratch slots: each holds one activation buffer reused across layers and calls.
enum ScratchSlot {
  kResid,
  kNormed,
  kNormed16,  // kNormed's bf16 twin, uint16 (Backend::Bf16Twins)
  kQ,
  kK,
  kV,
  kAttn,
  kTmp,
  kMoeOut,
  kRouterLogits,
  kRouterIds,
  kGate,
  kUp,
  kExpertOut,
  kPerm,
  kPositions,
  kTokens,
  kFinal,
  kLogits,
  kSharedGate,
  kMlaQa,          // q_a_proj output [T, q_lora_rank]
  kMlaKv,          // kv_a_proj output [T, kv_lora + rope]
  kMlaLatent,      // normalised latent [T, kv_lora]
  kMlaQAbs,        // absorbed queries [T, heads * (kv_lora + rope)]
  kMlaOutLatent,   // attention output in latent space [T, heads * kv_lora]
  kDeviceRouting,  // routed decode: every MoE layer's ids then weights [moe layers][2 * T * top_k]
  kBlockTables,    // paged KV: the pass's block tables, int32 (grown in ReserveKvBlocks)
  kPicked,         // the token picked from each logits row, int32 (SeqChunk::token_only)
  kSampling,       // each row's RowSampling when a chunk samples on the backend
  kNumSlots
};
// transformers builds MLA's q_a_layernorm and kv_a_layernorm with RMSNorm's default eps.
constexpr float kMlaNormEps = 1e-6f;
}  // namespace

Engine::~Engine() {
  // Buffers free through the backend: release them before it goes.
  if (backend_) backend_->DropGraphs();
  seqs_.clear();
  kv_.reset();
  scratch_.clear();
  routed_tables_.clear();
  local_moe_.reset();
  resident_.reset();
  weights_.reset();
  backend_.reset();
}

StatusOr<std::unique_ptr<Engine>> Engine::Create(const std::string& model_dir, const EngineOptions& options) {
  const int bs = options.kv_block_size;
  if (bs < 0 || bs > 1024 || (bs & (bs - 1)) != 0)
    return InvalidArgument("kv cache block size must be 0 (contiguous) or a power of two up to 1024, got " +
                           std::to_string(bs));
  if (options.kv_cache_tokens < 0 || options.kv_cache_tokens > kMaxKvCacheTokens)
    return InvalidArgument("kv cache tokens must be in [0, " + std::to_string(kMaxKvCacheTokens) + "], got " +
                           std::to_string(options.kv_cache_tokens));
  if (options.kv_cache_tokens > 0 && bs == 0)
    return InvalidArgument("a kv cache capacity (kv_cache_tokens) needs the paged cache (kv_block_size > 0)");
  auto e = std::unique_ptr<Engine>(new Engine());
  EF_ASSIGN_OR_RETURN(e->backend_, MakeBackend(options.backend, options.device));
  EF_ASSIGN_OR_RETURN(e->weights_, ModelWeights::Load(model_dir, e->backend_.get(),
                                                      LoadOptions{.dequantize_experts = options.dequantize_experts,
                                                                  .checkpoint = options.checkpoint}));
  EF_RETURN_IF_ERROR(e->ConfigureAttentionPrecision(options.attention_precision));
  EF_RETURN_IF_ERROR(e->ConfigureKvCache(options.kv_cache_dtype));
  e->local_moe_ =
      std::make_unique<LocalMoeExecutor>(e->backend_.get(), e->config().hidden_size, e->config().num_experts,
                                         ExpertActivationParams::ForModel(e->config()));
  if (e->config().host_routing()) e->host_router_ = std::make_unique<HostRouter>(e->config());
  if (options.upload_experts) EF_RETURN_IF_ERROR(e->UploadExperts());
  e->moe_executor_ = e->local_moe_.get();
  e->cuda_graphs_ = options.cuda_graphs;
  e->backend_sampling_ = options.backend_sampling;
  const ModelConfig& mc = e->config();
  int64_t trained = mc.max_position_embeddings;
  std::string trained_what = "max_position_embeddings";
  if (mc.rope.type == "yarn" && mc.rope.original_max_position_embeddings > 0) {
    const auto scaled =
        static_cast<int64_t>(mc.rope.factor * static_cast<float>(mc.rope.original_max_position_embeddings));
    if (scaled > trained) {
      trained = scaled;
      trained_what = "yarn factor x original_max_position_embeddings";
    }
  }
  if (options.max_seq_len > trained && trained > 0 && !options.allow_untrained_positions)
    return InvalidArgument("runtime.max_seq_len (--max-seq-len) " + std::to_string(options.max_seq_len) +
                           " is past the model's " + trained_what + " (" + std::to_string(trained) +
                           "): it was not trained for positions past that");
  e->max_seq_len_ = options.max_seq_len > 0 ? options.max_seq_len : mc.max_position_embeddings;
  e->scratch_.resize(kNumSlots);
  if (options.kv_block_size > 0) {
    const ModelConfig& c = e->config();
    const size_t elem = e->kv_bf16_ ? sizeof(uint16_t) : sizeof(float);
    PagedKvCache::Options o;
    o.num_layers = c.num_layers;
    o.key_row_bytes = c.kv_cache_key_width() * elem;
    o.value_row_bytes = c.kv_cache_value_width() * elem;
    o.block_size = options.kv_block_size;
    o.capacity_tokens = options.kv_cache_tokens;
    o.initial_tokens = std::min(e->max_seq_len_, 4096);
    EF_ASSIGN_OR_RETURN(PagedKvCache kv, PagedKvCache::Create(e->backend_.get(), o));
    e->kv_ = std::make_unique<PagedKvCache>(std::move(kv));
    // A fixed size is allocated now: it fails here if the device cannot hold it, and the expert
    // cache's budget (planned after) sees the memory taken.
    if (options.kv_cache_tokens > 0) {
      EF_RETURN_IF_ERROR(e->kv_->AllocateCapacity());
    }
    const std::string cap = options.kv_cache_tokens > 0 ? std::to_string(options.kv_cache_tokens) + " tokens"
                                                        : std::string("growing on demand");
    EF_LOG(INFO, ENGINE, "engine ready on %s, context limit %d tokens, paged %s kv cache (blocks of %d tokens, %s)",
           e->backend_->name().c_str(), e->max_seq_len_, e->kv_bf16_ ? "bf16" : "fp32", options.kv_block_size,
           cap.c_str());
  } else {
    EF_LOG(INFO, ENGINE, "engine ready on %s, %s kv capacity %d tokens per sequence", e->backend_->name().c_str(),
           e->kv_bf16_ ? "bf16" : "fp32", e->max_seq_len_);
  }
  return e;
}

Status Engine::ConfigureAttentionPrecision(const std::string& precision) {
  if (precision != "auto" && precision != "fp32" && precision != "bf16")
    return InvalidArgument("attention precision must be auto, fp32 or bf16, got '" + precision + "'");
  const DType o = weights_->layer(0).o.dtype;  // every model has an output projection
  reduced_precision_attention_ =
      precision == "bf16" || (precision == "auto" && (o == DType::kBF16 || o == DType::kF16));
  // The cpu backend computes in fp32 always; MLA and GPT-OSS attention (AttentionEx) have no
  // tensor-core path yet.
  const ModelConfig& c = config();
  const bool attention_ex = c.mla || c.rope.type != "default" || c.attention_sinks || c.sliding_window != 0;
  if (backend_->kind() != BackendKind::kCuda || attention_ex) reduced_precision_attention_ = false;
  backend_->SetReducedPrecisionAttention(reduced_precision_attention_);
  return Status::Ok();
}

Status Engine::ConfigureKvCache(const std::string& dtype) {
  if (dtype != "auto" && dtype != "fp32" && dtype != "bf16")
    return InvalidArgument("kv cache dtype must be auto, fp32 or bf16, got '" + dtype + "'");
  // auto follows the prefill attention's precision (ConfigureAttentionPrecision runs first): its
  // conditions (cuda, 16-bit attention weights, plain attention) are the bf16 cache's, and a model
  // that asked for exact attention keeps an exact cache.
  kv_bf16_ = dtype == "bf16" || (dtype == "auto" && reduced_precision_attention_);
  if (!kv_bf16_) return Status::Ok();
  const ModelConfig& c = config();
  if (c.mla || c.rope.type != "default" || c.attention_sinks || c.sliding_window != 0)
    return Unimplemented(
        "a bf16 kv cache needs plain attention; this model's (MLA, rope scaling, sinks or a sliding window) reads "
        "fp32 keys and values: use kv cache dtype fp32");
  if (!backend_->SetKvCacheDType(DType::kBF16))
    return Unimplemented("the " + backend_->name() + " backend has no bf16 kv cache");
  return Status::Ok();
}

Status Engine::UploadExperts() {
  if (resident_) return Status::Ok();
  EF_ASSIGN_OR_RETURN(resident_, ResidentExpertSource::Create(*weights_, backend_.get()));
  if (!local_moe_->expert_source()) local_moe_->set_expert_source(resident_.get());
  return BuildRoutedTables();
}

Status Engine::BuildRoutedTables() {
  const ModelConfig& c = config();
  routed_.assign(c.num_layers, RoutedExpertTable{});
  routed_tables_.clear();
  if (backend_->MoeRoutedMaxTokens() == 0 || c.expert_activation != ExpertActivation::kSiluMul) return Status::Ok();
  for (int l : c.MoeLayers()) {
    if (!weights_->layer(l).shared_expert.gate.empty()) continue;  // shared experts add to the same rows
    std::vector<const void*> ptrs(static_cast<size_t>(3) * c.num_experts);
    RoutedExpertTable t;
    bool ok = true;
    for (int e = 0; e < c.num_experts && ok; ++e) {
      EF_ASSIGN_OR_RETURN(ExpertWeights w, resident_->Acquire(l, e));
      resident_->Release(l, e);
      if (e == 0)
        t = RoutedExpertTable{nullptr, nullptr, nullptr, w.gate.dtype, c.num_experts, w.gate.cols, w.gate.rows};
      ok = !w.has_bias() && w.gate.dtype == t.dtype && w.up.dtype == t.dtype && w.down.dtype == t.dtype &&
           w.gate.rows == t.inter && w.up.rows == t.inter && w.gate.cols == t.hidden && w.up.cols == t.hidden &&
           w.down.rows == t.hidden && w.down.cols == t.inter;
      ptrs[e] = w.gate.data;
      ptrs[c.num_experts + e] = w.up.data;
      ptrs[2 * c.num_experts + e] = w.down.data;
    }
    if (!ok || (t.dtype != DType::kBF16 && t.dtype != DType::kF16)) continue;
    EF_ASSIGN_OR_RETURN(Buffer b, backend_->Allocate(ptrs.size() * sizeof(void*)));
    backend_->CopyToDevice(b.data(), ptrs.data(), ptrs.size() * sizeof(void*));
    auto* table = static_cast<const void* const*>(b.data());
    t.gate = table;
    t.up = table + c.num_experts;
    t.down = table + 2 * c.num_experts;
    routed_[l] = t;
    routed_tables_.push_back(std::move(b));
  }
  return Status::Ok();
}

bool Engine::DeviceRouting(int64_t T) const {
  // Every MoE layer must be able to (a layer on the host path waits anyway), on the resident
  // experts through the local executor, with nothing that needs the routing on the host during
  // the step: routing hooks (overrides, the cache's prefetcher), the host router, router inputs.
  if (T > backend_->MoeRoutedMaxTokens() || !hooks_.empty() || host_router_ || expose_router_inputs_ || !resident_ ||
      moe_executor_ != local_moe_.get() || local_moe_->expert_source() != resident_.get())
    return false;
  const ModelConfig& c = config();
  for (int l : c.MoeLayers())
    if (routed_.empty() || routed_[l].num_experts == 0) return false;
  return c.num_moe_layers() > 0;
}

std::pair<int32_t*, float*> Engine::DeviceRoutingSlot(MoeLayer moe_layer, int64_t T) {
  const int64_t K = config().top_k;
  float* base =
      Scratch(kDeviceRouting, static_cast<size_t>(config().num_moe_layers() * 2 * T * K)) + moe_layer.index * 2 * T * K;
  return {reinterpret_cast<int32_t*>(base), base + T * K};
}

Status Engine::FinishDeviceRouting(int64_t T, const std::vector<int64_t>& row_seq, const std::vector<int32_t>& row_pos,
                                   const std::vector<int32_t>& row_tok) {
  const ModelConfig& c = config();
  const int64_t K = c.top_k, per = 2 * T * K;
  std::vector<float> all(static_cast<size_t>(c.num_moe_layers() * per));
  backend_->CopyToHost(all.data(), Scratch(kDeviceRouting, all.size()), all.size() * sizeof(float));
  std::vector<int32_t> ids(static_cast<size_t>(T * K));
  for (int m = 0; m < c.num_moe_layers(); ++m) {
    std::memcpy(ids.data(), all.data() + m * per, ids.size() * sizeof(int32_t));
    // What the host path refuses before computing (LocalMoeExecutor::Run), refused here after:
    // MoeRouted computed nothing for such a pair, and the step is not committed.
    for (int32_t e : ids)
      if (e < 0 || e >= c.num_experts)
        return Internal("routing chose expert " + std::to_string(e) + " out of range at MoE layer " +
                        std::to_string(m) + " (non-finite router logits?)");
    if (observers_.empty()) continue;
    std::span<float> wts(all.data() + m * per + T * K, static_cast<size_t>(T * K));
    LayerRouting r{c.MoeLayers()[m], MoeLayer(m), static_cast<int>(T), static_cast<int>(K), ids, wts, row_seq, row_pos,
                   row_tok,          {}};
    for (auto& [id, observer] : observers_) EF_RETURN_IF_ERROR(observer(r));
  }
  return Status::Ok();
}

Status Engine::GrowScratch(int slot, size_t floats) {
  Buffer& b = scratch_[slot];
  const size_t bytes = std::max<size_t>(floats, 1) * sizeof(float);
  if (b.bytes() >= bytes) return Status::Ok();
  b = Buffer();  // free the old one first: the budget may hold only one of them
  // Graphs hold the other slots' addresses; the block tables are reached through the step's
  // descriptors, uploaded each step.
  if (slot != kBlockTables) ++scratch_generation_;
  auto nb = backend_->Allocate(bytes + bytes / 2);
  if (!nb.ok()) {
    Status st = nb.status();
    return st.Prepend("activation buffers for this batch (" + std::to_string(bytes) + " bytes in one of them)");
  }
  b = std::move(nb).value();
  return Status::Ok();
}

Status Engine::ReserveScratch(int64_t T, int64_t R) {
  const ModelConfig& c = config();
  const size_t t = static_cast<size_t>(T), H = c.hidden_size;
  const size_t inter = std::max({c.intermediate_size, c.moe_intermediate_size, c.shared_expert_intermediate_size});
  const size_t lat = c.kv_lora_rank, kvw = c.kv_cache_key_width();
  const std::pair<int, size_t> sizes[] = {
      {kResid, t * H},
      {kNormed, t * H},
      {kNormed16, backend_->Bf16Twins(T, DType::kBF16) ? (t * H + 1) / 2 : 0},
      {kQ, t * c.q_dim()},
      {kK, t * c.kv_dim()},
      {kV, t * c.kv_dim()},
      {kAttn, t * std::max(c.q_dim(), c.attn_out_dim())},
      {kMlaQa, t * c.q_lora_rank},
      {kMlaKv, t * (c.mla ? kvw : 0)},
      {kMlaLatent, t * lat},
      {kMlaQAbs, t * c.num_heads * (c.mla ? kvw : 0)},
      {kMlaOutLatent, t * c.num_heads * lat},
      {kTmp, t * H},
      {kMoeOut, t * H},
      {kRouterLogits, t * c.num_experts},
      {kRouterIds, 2 * t * c.top_k},
      {kGate, t * inter},
      {kUp, t * inter},
      {kExpertOut, t * H},
      {kPerm, static_cast<size_t>(R)},
      {kPositions, t},
      {kTokens, t},
      {kFinal, static_cast<size_t>(R) * H},
      {kLogits, static_cast<size_t>(R) * c.vocab_size},
      {kSharedGate, t},
      {kPicked, static_cast<size_t>(R)},
      {kSampling, static_cast<size_t>(R) * sizeof(RowSampling) / sizeof(float)},
      {kDeviceRouting, DeviceRouting(T) ? c.num_moe_layers() * 2 * t * c.top_k : 0}};
  for (const auto& [slot, floats] : sizes) {
    Status s = GrowScratch(slot, floats);
    if (!s.ok()) {
      // Slots grown for this batch would keep memory a smaller retry needs: free them all.
      for (Buffer& b : scratch_) b = Buffer();
      ++scratch_generation_;
      return s;
    }
  }
  return Status::Ok();
}

float* Engine::Scratch(int slot, size_t floats) {
  // ReserveScratch sized every slot for the batch; growing here would be a bug.
  EF_CHECK_MSG(scratch_[slot].bytes() >= std::max<size_t>(floats, 1) * sizeof(float), "scratch slot not reserved");
  return scratch_[slot].f32();
}

StatusOr<double> Engine::WarmUp(int tokens) {
  const auto t0 = std::chrono::steady_clock::now();
  int limit = max_seq_len_;
  if (kv_ && kv_->capacity_tokens() > 0) limit = static_cast<int>(std::min<int64_t>(limit, kv_->capacity_tokens()));
  const int n = std::clamp(tokens, 1, std::max(1, limit - 2));
  const int64_t seq = std::numeric_limits<int64_t>::max();  // no caller's id
  EF_RETURN_IF_ERROR(AddSequence(seq));
  std::vector<int32_t> prompt(static_cast<size_t>(n));
  const int vocab = config().vocab_size;
  for (int i = 0; i < n; ++i) prompt[i] = static_cast<int32_t>((int64_t{i} * 7919 + 13) % vocab);
  auto hooks = std::exchange(hooks_, {});
  auto observers = std::exchange(observers_, {});
  ForwardResult r;
  Status s = Forward(std::vector<SeqChunk>{SeqChunk{seq, prompt, false}}, &r);
  if (s.ok() && n + 1 <= limit) {
    const int32_t next = prompt.back();
    s = Forward(std::vector<SeqChunk>{SeqChunk{seq, std::span<const int32_t>(&next, 1), false}}, &r);
  }
  hooks_ = std::move(hooks);
  observers_ = std::move(observers);
  RemoveSequence(seq);
  EF_RETURN_IF_ERROR(s);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Status Engine::AddSequence(int64_t seq) {
  if (seqs_.count(seq)) return InvalidArgument("sequence " + std::to_string(seq) + " already exists");
  Sequence s;
  if (kv_) {  // paged: blocks come as the sequence grows
    seqs_.emplace(seq, std::move(s));
    return Status::Ok();
  }
  const ModelConfig& c = config();
  const size_t elem = kv_bf16_ ? sizeof(uint16_t) : sizeof(float);
  const size_t k_bytes = static_cast<size_t>(max_seq_len_) * c.kv_cache_key_width() * elem;
  const size_t v_bytes = static_cast<size_t>(max_seq_len_) * c.kv_cache_value_width() * elem;
  for (int l = 0; l < c.num_layers; ++l) {
    EF_ASSIGN_OR_RETURN(Buffer k, backend_->Allocate(k_bytes));
    s.k.push_back(std::move(k));
    if (v_bytes == 0) continue;
    EF_ASSIGN_OR_RETURN(Buffer v, backend_->Allocate(v_bytes));
    s.v.push_back(std::move(v));
  }
  seqs_.emplace(seq, std::move(s));
  return Status::Ok();
}

void Engine::RemoveSequence(int64_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  if (kv_) kv_->Release(&it->second.blocks);
  seqs_.erase(it);
}

int64_t Engine::KvBlocksFor(int64_t tokens) const { return kv_capacity_blocks() > 0 ? kv_->BlocksFor(tokens) : 0; }

int64_t Engine::kv_free_blocks() const {
  const int64_t capacity = kv_capacity_blocks();
  return capacity > 0 ? kv_->free_blocks() + capacity - kv_->num_blocks() : -1;
}

Engine::KvUsage Engine::kv_usage() const {
  KvUsage u;
  if (!kv_) {
    u.used_tokens = u.allocated_tokens = static_cast<int64_t>(seqs_.size()) * max_seq_len_;
    return u;
  }
  u.allocated_tokens = kv_->num_blocks() * kv_->block_size();
  u.used_tokens = (kv_->num_blocks() - kv_->free_blocks()) * kv_->block_size();
  return u;
}

int64_t Engine::kv_capacity_blocks() const {
  return kv_ && kv_->capacity_tokens() > 0 ? kv_->BlocksFor(kv_->capacity_tokens()) : 0;
}

Status Engine::ReserveKvBlocks(std::span<const SeqChunk> batch) {
  std::vector<std::vector<int32_t>*> tables;
  std::vector<int64_t> tokens;
  for (const SeqChunk& chunk : batch) {
    Sequence& s = seqs_.at(chunk.seq);
    tables.push_back(&s.blocks);
    tokens.push_back(s.length + static_cast<int64_t>(chunk.tokens.size()));
  }
  // The tables' scratch first: a pass that fails changes nothing.
  int64_t entries = 0;
  for (size_t i = 0; i < tables.size(); ++i)
    entries += std::max<int64_t>(static_cast<int64_t>(tables[i]->size()), kv_->BlocksFor(tokens[i]));
  EF_RETURN_IF_ERROR(GrowScratch(kBlockTables, static_cast<size_t>(entries)));
  EF_RETURN_IF_ERROR(kv_->ReserveAll(tables, tokens));
  // Each chunk's table, whole, once per pass: every layer reads the same block ids.
  std::vector<int32_t> host;
  block_table_offset_.clear();
  for (const std::vector<int32_t>* t : tables) {
    block_table_offset_.push_back(static_cast<int64_t>(host.size()));
    host.insert(host.end(), t->begin(), t->end());
  }
  auto* dev = reinterpret_cast<int32_t*>(Scratch(kBlockTables, host.size()));
  backend_->CopyToDevice(dev, host.data(), host.size() * sizeof(int32_t));
  block_tables_dev_ = dev;
  return Status::Ok();
}

int Engine::SequenceLength(int64_t seq) const {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? 0 : it->second.length;
}

Status Engine::Mlp(const ExpertWeights& w, int64_t rows, const float* x, float* out) {
  const int64_t inter = w.gate.rows;
  float* g = Scratch(kGate, static_cast<size_t>(rows * inter));
  float* u = Scratch(kUp, static_cast<size_t>(rows * inter));
  backend_->Gemm(x, rows, w.gate, nullptr, g, false);
  backend_->Gemm(x, rows, w.up, nullptr, u, false);
  backend_->SiluMul(g, u, g, rows * inter);
  backend_->Gemm(g, rows, w.down, nullptr, out, false);
  return Status::Ok();
}

std::vector<AttentionSeq> Engine::AppendKv(int layer, std::span<const SeqChunk> batch, const float* k, const float* v) {
  const ModelConfig& c = config();
  const size_t kw = c.kv_cache_key_width(), vw = c.kv_cache_value_width();
  std::vector<AttentionSeq> seqs;
  seqs.reserve(batch.size());
  std::vector<Backend::CopyItem> copies;  // one launch for the whole batch's appends
  copies.reserve(2 * batch.size());
  int64_t row = 0;
  if (step_pass_) {  // the rows' destinations come from the step's sequences on the device
    backend_->AppendKvStep(kv_->key(layer), v ? kv_->value(layer) : nullptr, k, v, static_cast<int64_t>(kw),
                           static_cast<int64_t>(vw));
    return seqs;
  }
  const size_t elem = kv_bf16_ ? sizeof(uint16_t) : sizeof(float);
  auto at = [elem](const Buffer& b, int64_t values) { return static_cast<std::byte*>(b.data()) + values * elem; };
  if (kv_) {
    // Paged: each chunk's rows go to its blocks, a copy per block touched.
    const int bs = kv_->block_size();
    auto* kpool = static_cast<std::byte*>(kv_->key(layer));
    auto* vpool = static_cast<std::byte*>(kv_->value(layer));
    for (size_t i = 0; i < batch.size(); ++i) {
      const SeqChunk& chunk = batch[i];
      Sequence& s = seqs_.at(chunk.seq);
      const int n = static_cast<int>(chunk.tokens.size());
      for (int t = 0; t < n;) {
        const int pos = s.length + t;
        const int piece = std::min(n - t, bs - pos % bs);
        const int64_t dst_row = static_cast<int64_t>(s.blocks[pos / bs]) * bs + pos % bs;
        copies.push_back({kpool + dst_row * kw * elem, k + (row + t) * kw, sizeof(float) * piece * kw});
        if (v) copies.push_back({vpool + dst_row * vw * elem, v + (row + t) * vw, sizeof(float) * piece * vw});
        t += piece;
      }
      const int32_t* table = block_tables_dev_ + block_table_offset_[i];
      seqs.push_back(AttentionSeq{kpool, v ? vpool : kpool, row, n, s.length + n, table, bs});
      row += n;
    }
  }
  for (const SeqChunk& chunk : kv_ ? std::span<const SeqChunk>() : batch) {
    Sequence& s = seqs_.at(chunk.seq);
    const int n = static_cast<int>(chunk.tokens.size());
    // bytes: of the fp32 source (CopyBatchToBf16 writes half as many).
    copies.push_back({at(s.k[layer], s.length * kw), k + row * kw, sizeof(float) * n * kw});
    if (v) copies.push_back({at(s.v[layer], s.length * vw), v + row * vw, sizeof(float) * n * vw});
    const void* vbase = v ? s.v[layer].data() : s.k[layer].data();
    seqs.push_back(AttentionSeq{s.k[layer].data(), vbase, row, n, s.length + n});
    row += n;
  }
  if (kv_bf16_) {
    backend_->CopyBatchToBf16(copies.data(), static_cast<int>(copies.size()));
  } else {
    backend_->CopyBatch(copies.data(), static_cast<int>(copies.size()));
  }
  return seqs;
}

uint16_t* Engine::NormTwin(int64_t T, const Weight& reader) {
  if (!backend_->Bf16Twins(T, reader.dtype)) return nullptr;
  return reinterpret_cast<uint16_t*>(Scratch(kNormed16, (static_cast<size_t>(T) * config().hidden_size + 1) / 2));
}

void Engine::Norm(const float* x, int64_t T, const Weight& norm, float* h, uint16_t* h16) {
  const ModelConfig& c = config();
  if (h16) {
    backend_->RmsNormTwin(x, T, c.hidden_size, norm, c.rms_norm_eps, h, h16);
  } else {
    backend_->RmsNorm(x, T, c.hidden_size, norm, c.rms_norm_eps, h);
  }
}

void Engine::GemmTwin(const float* x, const uint16_t* x16, int64_t T, const Weight& w, const Weight* bias, float* y) {
  if (!x16) return backend_->Gemm(x, T, w, bias, y, false);
  const Weight* ws[] = {&w};
  const Weight* bs[] = {bias};
  float* ys[] = {y};
  backend_->GemmGroup(x, x16, T, 1, ws, bs, ys);
}

Status Engine::Attention(int layer, std::span<const SeqChunk> batch, const int32_t* positions_dev, int64_t T,
                         const uint16_t* h16) {
  const ModelConfig& c = config();
  if (c.mla) return MlaAttention(layer, batch, positions_dev, T);
  const LayerWeights& L = weights_->layer(layer);
  const int qd = c.q_dim(), kvd = c.kv_dim();
  float* h = Scratch(kNormed, T * c.hidden_size);
  float* q = Scratch(kQ, T * qd);
  float* k = Scratch(kK, T * kvd);
  float* v = Scratch(kV, T * kvd);
  {
    const Weight* ws[] = {&L.q, &L.k, &L.v};
    const Weight* bs[] = {c.qkv_bias ? &L.q_bias : nullptr, c.qkv_bias ? &L.k_bias : nullptr,
                          c.qkv_bias ? &L.v_bias : nullptr};
    float* ys[] = {q, k, v};
    backend_->GemmGroup(h, h16, T, 3, ws, bs, ys);
  }
  if (c.clip_qkv > 0) {
    backend_->Clamp(q, T * qd, c.clip_qkv);
    backend_->Clamp(k, T * kvd, c.clip_qkv);
    backend_->Clamp(v, T * kvd, c.clip_qkv);
  }
  if (c.qk_norm == QkNorm::kFull) {
    backend_->RmsNorm(q, T, qd, L.q_norm, c.rms_norm_eps, q);
    backend_->RmsNorm(k, T, kvd, L.k_norm, c.rms_norm_eps, k);
  } else if (c.qk_norm == QkNorm::kPerHead) {
    backend_->RmsNorm(q, T * c.num_heads, c.head_dim, L.q_norm, c.rms_norm_eps, q);
    backend_->RmsNorm(k, T * c.num_kv_heads, c.head_dim, L.k_norm, c.rms_norm_eps, k);
  }
  // Default rope, no window, no sinks: the original ops (kept bitwise for the families that
  // need nothing more); otherwise the table-driven rope and AttentionEx.
  const bool plain = c.rope.type == "default" && !c.attention_sinks && c.sliding_window == 0;
  // A step on the device rotates q and k and appends k and v to the cache in one op.
  const bool appended = plain && step_pass_ &&
                        backend_->RopeQKAppendStep(q, k, v, positions_dev, c.num_heads, c.num_kv_heads, c.head_dim,
                                                   c.rope_theta, kv_->key(layer), kv_->value(layer));
  if (plain && !appended) {
    backend_->RopeQK(q, k, positions_dev, T, c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta);
  } else if (!plain) {
    RopeSpec rs{c.head_dim,
                qd,
                c.head_dim,
                0,
                static_cast<const float*>(weights_->rope_inv_freq().data),
                weights_->rope_attention_factor(),
                false};
    backend_->RopeTable(q, positions_dev, T, c.num_heads, rs);
    rs.row_stride = kvd;
    backend_->RopeTable(k, positions_dev, T, c.num_kv_heads, rs);
  }
  float* attn = Scratch(kAttn, T * qd);
  // Append each sequence's new keys/values to its cache, then one attention call for the batch.
  std::vector<AttentionSeq> attn_seqs = appended ? std::vector<AttentionSeq>() : AppendKv(layer, batch, k, v);
  if (step_pass_) {
    backend_->AttentionStep(q, kv_->key(layer), kv_->value(layer), attn);
  } else if (plain) {
    backend_->AttentionBatch(q, attn_seqs.data(), static_cast<int>(attn_seqs.size()), c.num_heads, c.num_kv_heads,
                             c.head_dim, attn);
  } else {
    AttentionSpec spec;
    spec.num_heads = c.num_heads;
    spec.num_kv_heads = c.num_kv_heads;
    spec.qk_dim = spec.v_dim = c.head_dim;
    spec.q_stride = spec.out_stride = qd;
    spec.k_stride = spec.v_stride = kvd;
    spec.scale = AttentionSoftmaxScale(c);
    spec.window = c.sliding_layers.empty() || !c.sliding_layers[layer] ? 0 : c.sliding_window;
    spec.sinks = c.attention_sinks ? static_cast<const float*>(L.sinks.data) : nullptr;
    backend_->AttentionEx(q, attn_seqs.data(), static_cast<int>(attn_seqs.size()), spec, attn);
  }
  AddOutputProjection(L, attn, T);
  return Status::Ok();
}

void Engine::AddOutputProjection(const LayerWeights& L, const float* attn, int64_t T) {
  const ModelConfig& c = config();
  float* resid = Scratch(kResid, T * c.hidden_size);
  if (!c.o_bias) {
    // Accumulated into the residual by the GEMM: resid + (attn . o^T) in one op, the sum Add
    // forms (one launch less per layer).
    backend_->Gemm(attn, T, L.o, nullptr, resid, true);
    return;
  }
  // With a bias the GEMM adds it after accumulating, which would round (resid + a) + b, not
  // resid + (a + b): the projection goes through its own buffer.
  float* o = Scratch(kTmp, T * c.hidden_size);
  backend_->Gemm(attn, T, L.o, &L.o_bias, o, false);
  backend_->Add(resid, o, T * c.hidden_size);
}

// Multi-head latent attention in the absorbed form, for prefill and decode alike: the cache keeps
// per token only c = kv_a_layernorm(latent) and the rotated rope key kr (kv_lora + rope floats);
// each head's query is mapped into latent space (q_nope . W_uk, then its rope part appended) so
// that q . k = q_abs . [c, kr] and all heads attend over the one cached row (MQA-like); the
// per-head latent outputs go through W_uv. Decode is memory-bound and this reads the compressed
// cache once instead of expanding every cached token through kv_b_proj. For long prefills the
// expanded form (keys and values from kv_b_proj, qk_head_dim-wide dot products) does fewer flops;
// it is not implemented, the absorbed form gives the same result up to fp32 rounding.
Status Engine::MlaAttention(int layer, std::span<const SeqChunk> batch, const int32_t* positions_dev, int64_t T) {
  const ModelConfig& c = config();
  const LayerWeights& L = weights_->layer(layer);
  const int nh = c.num_heads, nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, r = c.kv_lora_rank;
  const int dq = c.head_dim, kvw = r + rope, vd = c.v_head_dim;
  float* h = Scratch(kNormed, T * c.hidden_size);
  float* q = Scratch(kQ, T * c.q_dim());
  if (c.q_lora_rank > 0) {
    float* qa = Scratch(kMlaQa, T * c.q_lora_rank);
    backend_->Gemm(h, T, L.q_a, nullptr, qa, false);
    backend_->RmsNorm(qa, T, c.q_lora_rank, L.q_a_norm, kMlaNormEps, qa);
    backend_->Gemm(qa, T, L.q, nullptr, q, false);
  } else {
    backend_->Gemm(h, T, L.q, nullptr, q, false);
  }
  const float* inv_freq = static_cast<const float*>(weights_->rope_inv_freq().data);
  const float rope_scale = weights_->rope_attention_factor();
  backend_->RopeTable(
      q, positions_dev, T, nh,
      RopeSpec{rope, static_cast<int64_t>(nh) * dq, dq, nope, inv_freq, rope_scale, c.rope_interleaved});
  // kv row: [latent (r) | rope key (rope)] -> [kv_a_layernorm(latent) | rope(rope key)], the cache row.
  float* kv = Scratch(kMlaKv, T * kvw);
  float* lat = Scratch(kMlaLatent, T * r);
  backend_->Gemm(h, T, L.kv_a, nullptr, kv, false);
  backend_->Copy2D(lat, r, kv, kvw, r, T);
  backend_->RmsNorm(lat, T, r, L.kv_a_norm, kMlaNormEps, lat);
  backend_->Copy2D(kv, kvw, lat, r, r, T);
  backend_->RopeTable(kv, positions_dev, T, 1, RopeSpec{rope, kvw, 0, r, inv_freq, rope_scale, c.rope_interleaved});
  std::vector<AttentionSeq> attn_seqs = AppendKv(layer, batch, kv, nullptr);
  // Absorbed queries: [q_nope . W_uk (r) | q_rope (rope)] per head.
  float* qabs = Scratch(kMlaQAbs, T * nh * kvw);
  backend_->GemmPerHead(q, T, nh, static_cast<int64_t>(nh) * dq, dq, L.kv_b_key, r, qabs,
                        static_cast<int64_t>(nh) * kvw, kvw);
  backend_->Copy2D(qabs + r, kvw, q + nope, dq, rope, T * nh);
  AttentionSpec spec;
  spec.num_heads = nh;
  spec.num_kv_heads = 1;
  spec.qk_dim = kvw;
  spec.v_dim = r;  // the value is the latent part of the cached row
  spec.q_stride = static_cast<int64_t>(nh) * kvw;
  spec.k_stride = spec.v_stride = kvw;
  spec.out_stride = static_cast<int64_t>(nh) * r;
  spec.scale = AttentionSoftmaxScale(c);  // from qk_head_dim, as transformers: the absorption keeps q . k
  float* out_lat = Scratch(kMlaOutLatent, T * nh * r);
  backend_->AttentionEx(qabs, attn_seqs.data(), static_cast<int>(attn_seqs.size()), spec, out_lat);
  float* attn = Scratch(kAttn, T * nh * vd);
  backend_->GemmPerHead(out_lat, T, nh, static_cast<int64_t>(nh) * r, r, L.kv_b_value, vd, attn,
                        static_cast<int64_t>(nh) * vd, vd);
  AddOutputProjection(L, attn, T);
  return Status::Ok();
}

void Engine::Route(const LayerWeights& L, int64_t T, const float* logits, std::vector<int32_t>* ids,
                   std::vector<float>* wts) {
  const ModelConfig& c = config();
  const int E = c.num_experts, K = c.top_k;
  ids->resize(static_cast<size_t>(T * K));
  wts->resize(static_cast<size_t>(T * K));
  if (host_router_) {
    // The router needs more than RouterTopK: its logits come to the host (one copy, like the ids).
    routing_host_.resize(static_cast<size_t>(T * E));
    backend_->CopyToHost(routing_host_.data(), logits, routing_host_.size() * sizeof(float));
    host_router_->Route(routing_host_.data(), T, L.score_correction_bias, ids->data(), wts->data());
    return;
  }
  // ids and weights side by side so one device-to-host copy (one sync) brings both.
  float* routing_dev = Scratch(kRouterIds, 2 * T * K);
  int32_t* ids_dev = reinterpret_cast<int32_t*>(routing_dev);
  float* w_dev = routing_dev + T * K;
  backend_->RouterTopK(logits, T, E, K, c.norm_topk_prob, ids_dev, w_dev);
  routing_host_.resize(static_cast<size_t>(2 * T * K));
  backend_->CopyToHost(routing_host_.data(), routing_dev, routing_host_.size() * sizeof(float));
  std::memcpy(ids->data(), routing_host_.data(), ids->size() * sizeof(int32_t));
  std::memcpy(wts->data(), routing_host_.data() + T * K, wts->size() * sizeof(float));
}

Status Engine::MoeBlock(int layer, int64_t T, const float* h, const uint16_t* h16, float* out,
                        const std::vector<int64_t>& row_seq, const std::vector<int32_t>& row_pos,
                        const std::vector<int32_t>& row_tok) {
  const ModelConfig& c = config();
  const LayerWeights& L = weights_->layer(layer);
  const int E = c.num_experts, K = c.top_k, H = c.hidden_size;
  float* logits = Scratch(kRouterLogits, T * E);
  GemmTwin(h, h16, T, L.router, c.router_bias ? &L.router_bias : nullptr, logits);
  std::vector<int32_t> ids;
  std::vector<float> wts;
  Route(L, T, logits, &ids, &wts);

  LayerRouting routing{layer, *c.MoeLayerOf(layer), static_cast<int>(T), K, ids, wts, row_seq, row_pos, row_tok, {}};
  if (expose_router_inputs_) {
    router_inputs_.resize(static_cast<size_t>(T) * H);
    backend_->CopyToHost(router_inputs_.data(), h, router_inputs_.size() * sizeof(float));
    routing.hidden = router_inputs_;
  }
  for (auto& [id, hook] : hooks_) EF_RETURN_IF_ERROR(hook(routing));
  for (auto& [id, observer] : observers_) EF_RETURN_IF_ERROR(observer(routing));

  EF_RETURN_IF_ERROR(moe_executor_->Run(layer, T, K, h, ids, wts, out));
  if (!L.shared_expert.gate.empty()) {
    float* s = Scratch(kExpertOut, static_cast<size_t>(T) * H);
    EF_RETURN_IF_ERROR(Mlp(L.shared_expert, T, h, s));
    if (c.shared_expert_gated) {
      float* gl = Scratch(kSharedGate, T);
      backend_->Gemm(h, T, L.shared_expert_gate, nullptr, gl, false);
      backend_->AddSigmoidGated(s, gl, T, H, out);
    } else {
      backend_->Add(out, s, static_cast<int64_t>(T) * H);  // deepseek: shared experts always on
    }
  }
  return Status::Ok();
}

Status Engine::Forward(std::span<const SeqChunk> batch, ForwardResult* result) {
  last_forward_out_of_memory_ = OutOfMemory::kNone;
  const ModelConfig& c = config();
  int64_t T = 0;
  std::vector<int64_t> row_seq;
  std::vector<int32_t> row_pos, row_tok;
  for (const SeqChunk& chunk : batch) {
    auto it = seqs_.find(chunk.seq);
    if (it == seqs_.end()) return InvalidArgument("sequence " + std::to_string(chunk.seq) + " was not added");
    if (chunk.tokens.empty()) return InvalidArgument("empty chunk for sequence " + std::to_string(chunk.seq));
    const int len = it->second.length;
    if (len + static_cast<int64_t>(chunk.tokens.size()) > max_seq_len_)
      return OutOfRange("sequence " + std::to_string(chunk.seq) + " would grow to " +
                        std::to_string(len + chunk.tokens.size()) + " tokens, past the context limit of " +
                        std::to_string(max_seq_len_));
    for (size_t i = 0; i < chunk.tokens.size(); ++i) {
      int32_t tok = chunk.tokens[i];
      if (tok < 0 || tok >= c.vocab_size)
        return InvalidArgument("token id " + std::to_string(tok) + " is outside the vocabulary of " +
                               std::to_string(c.vocab_size));
      row_seq.push_back(chunk.seq);
      row_pos.push_back(len + static_cast<int32_t>(i));
      row_tok.push_back(tok);
    }
    T += static_cast<int64_t>(chunk.tokens.size());
  }
  if (T == 0) return InvalidArgument("empty batch");
  if (c.num_moe_layers() > 0 && !local_moe_->expert_source())
    return FailedPrecondition(
        "the engine has no expert weights: it was created with upload_experts = false and no expert source was set "
        "(SetExpertSource, e.g. an expert cache) nor UploadExperts() called");
  int64_t R = 0;  // rows whose logits are wanted
  for (const SeqChunk& chunk : batch) R += chunk.all_logits ? static_cast<int64_t>(chunk.tokens.size()) : 1;
  // Buffers that could not grow are all freed (ReserveScratch) and grow again on the next pass, so
  // a smaller batch after this failure gets what it needs.
  Status scratch = ReserveScratch(T, R);
  if (scratch.code() == StatusCode::kResourceExhausted) last_forward_out_of_memory_ = OutOfMemory::kActivations;
  EF_RETURN_IF_ERROR(scratch);
  if (kv_) {
    Status kv = ReserveKvBlocks(batch);
    if (kv.code() == StatusCode::kResourceExhausted) last_forward_out_of_memory_ = OutOfMemory::kKvBlocks;
    EF_RETURN_IF_ERROR(kv);
  }

  int32_t* tokens_dev = reinterpret_cast<int32_t*>(Scratch(kTokens, T));
  int32_t* pos_dev = reinterpret_cast<int32_t*>(Scratch(kPositions, T));
  backend_->CopyToDevice(tokens_dev, row_tok.data(), T * sizeof(int32_t));
  backend_->CopyToDevice(pos_dev, row_pos.data(), T * sizeof(int32_t));
  // The rows whose logits are wanted (final norm and LM head).
  std::vector<int32_t> rows;
  result->row_offset.clear();
  int64_t row = 0;
  for (const SeqChunk& chunk : batch) {
    result->row_offset.push_back(static_cast<int>(rows.size()));
    const int64_t n = static_cast<int64_t>(chunk.tokens.size());
    if (chunk.all_logits) {
      for (int64_t i = 0; i < n; ++i) rows.push_back(static_cast<int32_t>(row + i));
    } else {
      rows.push_back(static_cast<int32_t>(row + n - 1));
    }
    row += n;
  }
  EF_CHECK(R == static_cast<int64_t>(rows.size()));
  int32_t* rows_dev = reinterpret_cast<int32_t*>(Scratch(kPerm, R));
  backend_->CopyToDevice(rows_dev, rows.data(), R * sizeof(int32_t));

  // A decode step: its sequences' lengths and block tables go to the device once, for every layer.
  step_pass_ = StepPass(batch);
  uint64_t plan = 0;
  if (step_pass_) {
    std::vector<AttentionSeq> seqs;
    seqs.reserve(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
      const int n = static_cast<int>(batch[i].tokens.size());
      const int len = seqs_.at(batch[i].seq).length;
      seqs.push_back(AttentionSeq{nullptr, nullptr, static_cast<int64_t>(i), n, len + n,
                                  block_tables_dev_ + block_table_offset_[i], kv_->block_size()});
    }
    auto fp =
        backend_->UploadStepSeqs(seqs.data(), static_cast<int>(seqs.size()), c.num_heads, c.num_kv_heads, c.head_dim);
    if (!fp.ok()) {
      step_pass_ = false;
      return fp.status();
    }
    plan = *fp;
  }

  // Steps of up to MoeRoutedMaxTokens() rows on resident experts keep the routing on the device:
  // no layer waits for the host (the observers get it once the logits are back).
  Pass pass;
  pass.batch = batch;
  pass.T = T;
  pass.R = R;
  pass.tokens_dev = tokens_dev;
  pass.pos_dev = pos_dev;
  pass.rows_dev = rows_dev;
  const bool any_token = std::any_of(batch.begin(), batch.end(), [](const SeqChunk& ch) { return ch.token_only; });
  const bool all_token = std::all_of(batch.begin(), batch.end(), [](const SeqChunk& ch) { return ch.token_only; });
  if (any_token) pass.tokens_out_dev = reinterpret_cast<int32_t*>(Scratch(kPicked, R));
  // The rows drawn with a temperature: (row, its chunk's sampling).
  std::vector<std::pair<int64_t, const RowSampling*>> sampled;
  for (size_t b = 0; b < batch.size(); ++b) {
    if (!batch[b].token_only || !batch[b].sampling || !SamplesRandomly(*batch[b].sampling)) continue;
    const int64_t end = b + 1 < batch.size() ? result->row_offset[b + 1] : R;
    for (int64_t row = result->row_offset[b]; row < end; ++row) sampled.emplace_back(row, &*batch[b].sampling);
  }
  // A backend that does not sample: the pass picks arg maxes, and the sampled rows are drawn here
  // from their logits.
  const bool host_draws = !sampled.empty() && !(backend_sampling_ && backend_->SamplesRows());
  if (!sampled.empty() && !host_draws) {
    // Every row's parameters (greedy for the other rows), uploaded before the pass so a recorded
    // step reads them where it did.
    std::vector<RowSampling> params(static_cast<size_t>(R));
    for (const auto& [row, sp] : sampled) params[static_cast<size_t>(row)] = *sp;
    float* dev = Scratch(kSampling, params.size() * sizeof(RowSampling) / sizeof(float));
    backend_->CopyToDevice(dev, params.data(), params.size() * sizeof(RowSampling));
    pass.sampling_dev = reinterpret_cast<const RowSampling*>(dev);
  }
  pass.device_routing = DeviceRouting(T);
  pass.row_seq = &row_seq;
  pass.row_pos = &row_pos;
  pass.row_tok = &row_tok;
  Status run = step_pass_ && pass.device_routing && cuda_graphs_ && backend_->Graphs() ? RunGraphed(pass, plan)
                                                                                       : RunLayers(pass);
  step_pass_ = false;
  // The MoE executor's buffers grow during the pass; a pass that failed there committed nothing
  // either (sequence lengths are committed last).
  if (run.code() == StatusCode::kResourceExhausted && backend_->status().ok())
    last_forward_out_of_memory_ = OutOfMemory::kActivations;
  EF_RETURN_IF_ERROR(run);
  result->tokens.clear();
  if (any_token) {
    result->tokens.resize(static_cast<size_t>(R));
    backend_->CopyToHost(result->tokens.data(), pass.tokens_out_dev, result->tokens.size() * sizeof(int32_t));
  }
  if (all_token && !host_draws) {
    result->logits.clear();
  } else {
    float* logits = Scratch(kLogits, R * c.vocab_size);
    result->logits.resize(static_cast<size_t>(R) * c.vocab_size);
    backend_->CopyToHost(result->logits.data(), logits, result->logits.size() * sizeof(float));
  }
  // Ops report failures to the backend, not to their caller: a forward pass with a failed op must
  // not hand out its logits.
  if (Status s = backend_->status(); !s.ok()) {
    s.Prepend("forward pass on " + backend_->name());
    return s;
  }
  (host_draws ? sampling_stats_.on_host : sampling_stats_.on_backend) += static_cast<int64_t>(sampled.size());
  if (host_draws) {
    const size_t V = static_cast<size_t>(c.vocab_size);
    ThreadPool::Default().ParallelFor(
        static_cast<int64_t>(sampled.size()),
        [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const auto [row, s] = sampled[static_cast<size_t>(i)];
            result->tokens[static_cast<size_t>(row)] =
                SampleRow(result->logits.data() + static_cast<size_t>(row) * V, static_cast<int64_t>(V), *s);
          }
        },
        /*min_chunk=*/std::max<int64_t>(1, 65536 / static_cast<int64_t>(V)));
  }
  if (pass.device_routing) EF_RETURN_IF_ERROR(FinishDeviceRouting(T, row_seq, row_pos, row_tok));
  // Committed last: a failed pass leaves every sequence as it was (its KV rows past the length are
  // overwritten by the next pass).
  for (const SeqChunk& chunk : batch) seqs_.at(chunk.seq).length += static_cast<int>(chunk.tokens.size());
  return Status::Ok();
}

bool Engine::StepPass(std::span<const SeqChunk> batch) const {
  const ModelConfig& c = config();
  if (!cuda_graphs_ || !kv_ || !backend_->StepSeqs() || c.mla || c.rope.type != "default" || c.attention_sinks ||
      c.sliding_window != 0)
    return false;
  return std::all_of(batch.begin(), batch.end(), [](const SeqChunk& chunk) { return chunk.tokens.size() == 1; });
}

void Engine::SyncGraphLayout() {
  const std::array<uint64_t, 3> layout = {scratch_generation_, backend_->layout_generation(),
                                          static_cast<uint64_t>(kv_->num_blocks())};
  // Also bounded: a serving mix of batch sizes and context lengths keeps at most this many shapes.
  constexpr size_t kMaxShapes = 512;
  if (layout == graph_layout_ && graphs_.size() < kMaxShapes) return;
  backend_->DropGraphs();
  graphs_.clear();
  graph_layout_ = layout;
}

Status Engine::RunGraphed(const Pass& p, uint64_t plan) {
  SyncGraphLayout();
  const int pick = p.sampling_dev ? 2 : p.tokens_out_dev ? 1 : 0;
  GraphEntry& g = graphs_[{p.T, plan, pick}];
  if (g.id >= 0) {
    EF_RETURN_IF_ERROR(backend_->LaunchGraph(g.id));
    last_device_routed_ = true;
    ++graph_stats_.replayed;
    return Status::Ok();
  }
  if (g.refused || g.steps++ == 0) return RunLayers(p);
  Status began = backend_->BeginGraph();
  Status ran = began.ok() ? RunLayers(p) : began;
  StatusOr<int> id = began.ok() ? backend_->EndGraph() : StatusOr<int>(began);
  if (!ran.ok() || !id.ok()) {
    // (A graph recorded from a pass that failed is not used; the backend frees it with the others.)
    // Nothing ran: the step goes op by op, and this shape from now on.
    g.refused = true;
    ++graph_stats_.refused;
    EF_LOG(DEBUG, ENGINE, "decode step of %lld sequences not recorded: %s", static_cast<long long>(p.T),
           (ran.ok() ? id.status() : ran).ToString().c_str());
    return RunLayers(p);
  }
  g.id = *id;
  ++graph_stats_.recorded;
  EF_RETURN_IF_ERROR(backend_->LaunchGraph(g.id));
  ++graph_stats_.replayed;
  return Status::Ok();
}

Status Engine::RunLayers(const Pass& p) {
  const ModelConfig& c = config();
  const int H = c.hidden_size;
  const int64_t T = p.T, R = p.R;
  float* x = Scratch(kResid, T * H);
  backend_->Embed(p.tokens_dev, static_cast<int>(T), weights_->embed(), x);
  last_device_routed_ = false;
  // Twins of the normalised rows for the GEMMs that read them (q, k and v; the router).
  auto input_twin = [&](const LayerWeights& L) { return c.mla ? nullptr : NormTwin(T, L.q); };
  bool normed = false;  // the layer's input norm ran already (with the previous layer's residual add)
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = weights_->layer(l);
    float* h = Scratch(kNormed, T * H);
    uint16_t* h16 = input_twin(L);
    if (!normed) Norm(x, T, L.input_norm, h, h16);
    normed = false;
    EF_RETURN_IF_ERROR(Attention(l, p.batch, p.pos_dev, T, h16));
    x = Scratch(kResid, T * H);
    h = Scratch(kNormed, T * H);
    h16 = c.IsMoeLayer(l) ? NormTwin(T, L.router) : nullptr;
    Norm(x, T, L.post_attention_norm, h, h16);
    float* out = Scratch(kMoeOut, T * H);
    if (p.device_routing && c.IsMoeLayer(l)) {
      float* logits = Scratch(kRouterLogits, T * c.num_experts);
      GemmTwin(h, h16, T, L.router, c.router_bias ? &L.router_bias : nullptr, logits);
      auto [ids_dev, w_dev] = DeviceRoutingSlot(*c.MoeLayerOf(l), T);
      backend_->RouterTopK(logits, T, c.num_experts, c.top_k, c.norm_topk_prob, ids_dev, w_dev);
      // x += the layer's expert output, summed as SetZero, MoeBlock and Add below sum it.
      if (backend_->MoeRouted(h, T, c.top_k, ids_dev, w_dev, routed_[l], x)) {
        last_device_routed_ = true;
        continue;
      }
      // The backend declined (cannot happen for a batch DeviceRouting admits; kept correct anyway).
      std::vector<int32_t> ids(static_cast<size_t>(T * c.top_k));
      std::vector<float> wts(ids.size());
      backend_->CopyToHost(ids.data(), ids_dev, ids.size() * sizeof(int32_t));
      backend_->CopyToHost(wts.data(), w_dev, wts.size() * sizeof(float));
      backend_->SetZero(out, sizeof(float) * T * H);
      EF_RETURN_IF_ERROR(moe_executor_->Run(l, T, c.top_k, h, ids, wts, out));
    } else if (c.IsMoeLayer(l)) {
      backend_->SetZero(out, sizeof(float) * T * H);
      EF_RETURN_IF_ERROR(MoeBlock(l, T, h, h16, out, *p.row_seq, *p.row_pos, *p.row_tok));
    } else {
      EF_RETURN_IF_ERROR(Mlp(L.dense_mlp, T, h, out));
    }
    if (l + 1 < c.num_layers) {
      // The residual add and the next layer's input norm in one op.
      const LayerWeights& next = weights_->layer(l + 1);
      backend_->AddRmsNorm(x, out, T, H, next.input_norm, c.rms_norm_eps, Scratch(kNormed, T * H), input_twin(next));
      normed = true;
    } else {
      backend_->Add(x, out, T * H);
    }
  }
  // Final norm and LM head on the rows whose logits are wanted.
  float* fin = Scratch(kFinal, R * H);
  backend_->GatherRows(x, p.rows_dev, R, H, fin);
  backend_->RmsNorm(fin, R, H, weights_->final_norm(), c.rms_norm_eps, fin);
  float* logits = Scratch(kLogits, R * c.vocab_size);
  backend_->Gemm(fin, R, weights_->lm_head(), nullptr, logits, false);
  if (p.sampling_dev) {
    backend_->SampleRows(logits, R, c.vocab_size, p.sampling_dev, p.tokens_out_dev);
  } else if (p.tokens_out_dev) {
    backend_->ArgMaxRows(logits, R, c.vocab_size, p.tokens_out_dev);
  }
  return Status::Ok();
}

}  // namespace ef::runtime
