#include "cache/cuda/cuda_expert_source.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "runtime/backend/cpu/host_gemv.h"
#include "runtime/core/logging.h"
#include "runtime/core/progress.h"
#include "runtime/core/thread_pool.h"
#include "runtime/engine/model_weights.h"

namespace ef::cache {

StatusOr<std::unique_ptr<CudaExpertSource>> CudaExpertSource::Create(const runtime::ModelWeights& model,
                                                                     runtime::Backend* backend,
                                                                     const CudaExpertSourceOptions& options) {
  const runtime::ModelConfig& c = model.config();
  ExpertLayout layout;
  layout.num_layers = c.num_layers;
  layout.num_experts = c.num_experts;
  layout.top_k = c.top_k;
  layout.moe_layer.assign(c.num_layers, false);
  int first = -1;
  for (int l = 0; l < c.num_layers; ++l)
    if (c.IsMoeLayer(l)) {
      layout.moe_layer[l] = true;
      if (first < 0) first = l;
    }
  if (first < 0) return InvalidArgument("cuda expert cache: the model has no MoE layer");
  // The load precision's layout (the tiers quantize when cache.miss_precision asks for it).
  ExpertTiers* tiers = options.tiers;
  if (tiers) tiers->set_keep_quantized(false);  // the pinned tier below is the host tier
  if (tiers && tiers->num_unquantizable() > 0)
    return Unimplemented("cuda expert cache: cache.miss_precision " +
                         std::string(LoadPrecisionName(tiers->precision())) +
                         " on a model with experts that stay in the checkpoint's dtype (" +
                         std::to_string(tiers->num_unquantizable()) + " experts: " + DTypeName(model.expert_dtype()) +
                         ", biased, or widths the quantization group does not divide); use miss_precision native");
  const runtime::ExpertWeights& w0 = model.host_expert(first, 0);
  layout.gate_bias = w0.gate_bias;
  layout.up_bias = w0.up_bias;
  layout.down_bias = w0.down_bias;
  if (tiers) {
    const PackedLayout p = tiers->Layout(first, 0);
    layout.gate = p.gate;
    layout.up = p.up;
    layout.down = p.down;
  } else {
    layout.gate = w0.gate;
    layout.up = w0.up;
    layout.down = w0.down;
  }
  auto same = [](const runtime::Weight& a, const runtime::Weight& b) {
    return a.dtype == b.dtype && a.rows == b.rows && a.cols == b.cols;
  };
  for (int l = 0; l < c.num_layers; ++l) {
    if (!layout.moe_layer[l]) continue;
    for (int e = 0; e < c.num_experts; ++e) {
      const runtime::ExpertWeights& w = model.host_expert(l, e);
      if (!same(w.gate, w0.gate) || !same(w.up, w0.up) || !same(w.down, w0.down))
        return Unimplemented("cuda expert cache: experts of different shapes or dtypes");
    }
  }
  std::function<bool(int, int)> keep;
  if (tiers && tiers->hooks().host) keep = [tiers](int l, int e) { return tiers->HasHostCopy(l, e); };
  EF_ASSIGN_OR_RETURN(auto tier, PinnedHostTier::Create(c.num_layers, c.num_experts, layout.bytes(), layout.moe_layer,
                                                        options.host_budget_bytes, keep));
  // Packed bytes (the parts back to back) -> the slot layout's 256-byte-aligned offsets.
  auto place = [layout](std::span<const std::byte> packed, std::span<std::byte> dst) {
    const runtime::ExpertWeights shapes = layout.Shapes();
    size_t src = 0, i = 0;
    for (const runtime::Weight* p : shapes.parts()) {
      std::memcpy(dst.data() + layout.offset(i++), packed.data() + src, p->nbytes());
      src += p->nbytes();
    }
  };
  auto fill = [&model, layout, tiers, place](int l, int e, std::span<std::byte> dst) -> Status {
    if (dst.size() < layout.bytes()) return Internal("cuda expert cache: staging smaller than an expert");
    if (tiers) {
      std::vector<std::byte> packed(tiers->Layout(l, e).bytes());
      EF_RETURN_IF_ERROR(tiers->PackFromCheckpoint(l, e, packed));
      place(packed, dst);
      return Status::Ok();
    }
    size_t i = 0;
    for (const runtime::Weight* p : model.host_expert(l, e).parts())
      std::memcpy(dst.data() + layout.offset(i++), p->data, p->nbytes());
    return Status::Ok();
  };
  {
    Progress bar(tiers && tiers->precision() != LoadPrecision::kNative
                     ? std::string("pinning experts in host memory (") + LoadPrecisionName(tiers->precision()) + ")"
                     : std::string("pinning experts in host memory"),
                 static_cast<int64_t>(tier->total_bytes()));
    for (int l = 0; l < c.num_layers; ++l) {
      if (!layout.moe_layer[l]) continue;
      for (int e = 0; e < c.num_experts; ++e) {
        if (std::byte* dst = tier->data(l, e)) {
          EF_RETURN_IF_ERROR(fill(l, e, {dst, layout.bytes()}));
          bar.Advance(static_cast<int64_t>(layout.bytes()));
        }
      }
    }
  }
  cache::ExpertSource fallback = fill;
  if (tiers) {
    // Not pinned here: a peer's shard or the checkpoint (quantized on the way when asked), packed,
    // then laid out at the slot offsets.
    fallback = [tiers, layout, place](int l, int e, std::span<std::byte> dst) -> Status {
      if (dst.size() < layout.bytes()) return Internal("cuda expert cache: staging smaller than an expert");
      std::vector<std::byte> packed(tiers->Layout(l, e).bytes());
      EF_RETURN_IF_ERROR(tiers->FillPacked(l, e, packed));
      place(packed, dst);
      return Status::Ok();
    };
  }
  const int total =
      layout.num_experts * static_cast<int>(std::count(layout.moe_layer.begin(), layout.moe_layer.end(), true));
  if (tier->num_pinned() < total && !(tiers && tiers->hooks().host))
    EF_LOG(WARN, CACHE,
           "cuda expert cache: %d of %d experts pinned in host memory (host budget %zu bytes); the rest load from the "
           "checkpoint mapping, synchronously",
           tier->num_pinned(), total, options.host_budget_bytes);
  return Create(layout, std::shared_ptr<const PinnedHostTier>(std::move(tier)), std::move(fallback), backend, options);
}

StatusOr<std::unique_ptr<CudaExpertSource>> CudaExpertSource::Create(const ExpertLayout& layout,
                                                                     std::shared_ptr<const PinnedHostTier> tier,
                                                                     runtime::Backend* backend,
                                                                     const CudaExpertSourceOptions& options) {
  // The caller filled every expert of the tier: there is nothing to stage from.
  cache::ExpertSource none = [](int l, int e, std::span<std::byte>) -> Status {
    return FailedPrecondition("cuda expert cache: no host copy of expert " + std::to_string(e) + " of layer " +
                              std::to_string(l));
  };
  return Create(layout, std::move(tier), std::move(none), backend, options);
}

StatusOr<std::unique_ptr<CudaExpertSource>> CudaExpertSource::Create(const ExpertLayout& layout,
                                                                     std::shared_ptr<const PinnedHostTier> tier,
                                                                     cache::ExpertSource fallback,
                                                                     runtime::Backend* backend,
                                                                     const CudaExpertSourceOptions& options) {
  auto* cuda = dynamic_cast<runtime::CudaBackend*>(backend);
  if (!cuda) return InvalidArgument("cuda expert cache needs the CUDA backend, got " + backend->name());
  if (!tier || tier->bytes_per_expert() < layout.bytes())
    return InvalidArgument("cuda expert cache: host tier missing or smaller than the expert layout");
  if (options.slots_per_layer < layout.top_k)
    return InvalidArgument("cache budget of " + std::to_string(options.slots_per_layer) +
                           " expert slots per layer is smaller than the model's top-k (" +
                           std::to_string(layout.top_k) + ")");
  if (options.cpu_compute != "off" && options.cpu_compute != "auto" && options.cpu_compute != "on")
    return InvalidArgument("unknown cache.cpu_compute '" + options.cpu_compute + "' (off, auto or on)");
  if (options.cpu_compute != "off" && options.cpu_compute_max_rows < 1)
    return InvalidArgument("cache.cpu_compute: cpu_compute_max_rows must be at least 1");
  if (options.cpu_compute != "off" && layout.has_bias())
    return Unimplemented("cache.cpu_compute " + options.cpu_compute +
                         ": the host path computes experts without biases; this model's experts have them (use off)");
  auto src = std::unique_ptr<CudaExpertSource>(new CudaExpertSource());
  src->layout_ = layout;
  src->options_ = options;
  src->tier_ = std::move(tier);
  ExpertStoreOptions so;
  so.num_layers = layout.num_layers;
  so.num_experts = layout.num_experts;
  so.top_k = layout.top_k;
  so.slot_bytes = layout.bytes();
  so.policy = options.policy;
  so.async_prefetch = false;  // the arena's loads are asynchronous already
  so.policy_config.counts = options.static_counts;
  so.layer_quotas.assign(layout.num_layers, 0);
  int num_slots = 0;
  for (int l = 0; l < layout.num_layers; ++l)
    if (layout.moe_layer[l]) num_slots += so.layer_quotas[l] = std::min(options.slots_per_layer, layout.num_experts);
  CudaSlotArenaOptions ao;
  ao.copy_chunk_bytes = options.copy_chunk_bytes;
  ao.max_queued_chunks = options.max_queued_chunks;
  EF_ASSIGN_OR_RETURN(auto arena, CudaSlotArena::Create(cuda, src->tier_.get(), num_slots, so.slot_bytes, ao));
  src->arena_ = arena.get();
  // Called only for experts without a pinned copy (SlotArena::Load is Unimplemented for them).
  EF_ASSIGN_OR_RETURN(src->store_, ExpertStore::Create(so, std::move(fallback), std::move(arena)));
  src->upcoming_.resize(layout.num_layers);
  src->pinned_.resize(static_cast<size_t>(layout.num_layers) * layout.num_experts);
  EF_LOG(INFO, CACHE, "cuda expert cache: %d slots of %zu bytes, policy %s, prefetch %d layer(s)", num_slots,
         so.slot_bytes, options.policy.c_str(), options.prefetch_layers);
  if (options.cpu_compute != "off") EF_RETURN_IF_ERROR(src->CalibrateHostCompute());
  return src;
}

CudaExpertSource::~CudaExpertSource() {
  if (!store_) return;
  for (SlotRef& r : pinned_)
    if (r.slot >= 0) store_->Release(r);
  if (arena_) arena_->SynchronizeCopies();
}

void CudaExpertSource::OnRouting(int layer, std::vector<int32_t>& experts) {
  store_->SetCurrentLayer(layer);
  std::stable_partition(experts.begin(), experts.end(), [&](int32_t e) { return store_->IsResident(layer, e); });
  // Acquire now, in compute order, while the layer's slots allow: misses start their copies on the
  // correction stream at once. What does not fit is acquired later, after earlier experts release.
  arena_->set_urgent(true);
  const int E = layout_.num_experts;
  for (int32_t e : experts) {
    SlotRef& ref = pinned_[static_cast<size_t>(layer) * E + e];
    if (ref.slot >= 0) continue;
    auto r = store_->Acquire(layer, e);
    if (!r.ok()) break;  // every slot of the layer pinned: the rest load on demand
    ref = *r;
  }
  if (options_.prefetch_layers <= 0) return;
  arena_->set_urgent(false);
  int ahead = 0;
  for (int step = 1; step < layout_.num_layers && ahead < options_.prefetch_layers; ++step) {
    const int l = (layer + step) % layout_.num_layers;
    if (!layout_.moe_layer[l]) continue;
    ++ahead;
    // Advisory: a failure (every slot pinned) only means the expert loads on demand later.
    store_->PrefetchSet(l, upcoming_[l], Priority::kPrefetch);
  }
  arena_->set_urgent(true);
}

StatusOr<runtime::ExpertWeights> CudaExpertSource::Acquire(int layer, int expert) {
  SlotRef& ref = pinned_[static_cast<size_t>(layer) * layout_.num_experts + expert];
  if (ref.slot < 0) {
    arena_->set_urgent(true);
    EF_ASSIGN_OR_RETURN(ref, store_->Acquire(layer, expert));
  }
  arena_->WaitReady(ref.slot);
  return layout_.At(static_cast<const std::byte*>(ref.data));
}

void CudaExpertSource::Release(int layer, int expert) {
  SlotRef& ref = pinned_[static_cast<size_t>(layer) * layout_.num_experts + expert];
  if (ref.slot < 0) return;
  store_->Release(ref);
  ref = SlotRef{};
}

runtime::ExpertWeights CudaExpertSource::HostWeights(int layer, int expert) const {
  const std::byte* base = tier_->data(layer, expert);
  return base ? layout_.At(base) : runtime::ExpertWeights{};
}

Status CudaExpertSource::CalibrateHostCompute() {
  // The first expert with a pinned copy, timed both ways (best of 3): into slot 0, which the store
  // has not handed out yet, and through the host kernel with one row of x.
  int layer = -1, expert = -1;
  for (int l = 0; l < layout_.num_layers && layer < 0; ++l)
    for (int e = 0; e < layout_.num_experts && layer < 0; ++e)
      if (layout_.moe_layer[l] && tier_->data(l, e)) layer = l, expert = e;
  if (layer < 0)
    return FailedPrecondition("cache.cpu_compute needs experts pinned in host memory; the host budget holds none");
  using Clock = std::chrono::steady_clock;
  auto ms = [](Clock::time_point a) { return std::chrono::duration<double, std::milli>(Clock::now() - a).count(); };
  double copy = 1e30, host = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    auto t = Clock::now();
    EF_RETURN_IF_ERROR(arena_->CopyIn(0, {tier_->data(layer, expert), layout_.bytes()}));
    copy = std::min(copy, ms(t));
  }
  std::vector<float> x(static_cast<size_t>(layout_.gate.cols), 0.01f), y(x.size());
  for (int rep = 0; rep < 3; ++rep) {
    auto t = Clock::now();
    EF_RETURN_IF_ERROR(ComputeOnHost(layer, expert, 1, x.data(), y.data()));
    host = std::min(host, ms(t));
  }
  host_stats_ = HostComputeStats{};
  host_stats_.calibrated_copy_ms = copy;
  host_stats_.calibrated_host_ms = host;
  EF_LOG(INFO, CACHE,
         "cpu compute of missed experts (%s, at most %d rows): one expert takes %.2f ms on the host (%d threads, %s), "
         "%.2f ms to copy",
         options_.cpu_compute.c_str(), options_.cpu_compute_max_rows, host, ThreadPool::Default().num_threads(),
         runtime::HostGemvVectorized(layout_.gate) ? "avx512" : "scalar", copy);
  return Status::Ok();
}

void CudaExpertSource::TakeHostExperts(int layer, std::vector<int32_t>& experts, std::span<const int64_t> rows,
                                       std::vector<int32_t>& host) {
  if (options_.cpu_compute == "off" || layer < 0 || layer >= layout_.num_layers) return;
  const bool always = options_.cpu_compute == "on";
  const double copy = host_stats_.calibrated_copy_ms, base = host_stats_.calibrated_host_ms;
  double copy_done = 0, host_done = 0;  // this layer's queues (ms)
  std::vector<int32_t> keep;
  keep.reserve(experts.size());
  for (size_t i = 0; i < experts.size(); ++i) {
    const int32_t e = experts[i];
    const int64_t r = i < rows.size() ? rows[i] : 1;
    const bool candidate = r > 0 && r <= options_.cpu_compute_max_rows && !store_->IsResident(layer, e) &&
                           tier_->data(layer, e) != nullptr;
    if (!candidate) {
      keep.push_back(e);
      continue;
    }
    // The host kernel reads the weights once per block of 4 rows; each row adds its multiply-adds.
    const double h = base * std::ceil(r / 4.0) * (1.0 + 0.15 * static_cast<double>(std::min<int64_t>(r, 4) - 1));
    if (always || host_done + h < copy_done + copy) {
      host_done += h;
      host.push_back(e);
    } else {
      copy_done += copy;
      keep.push_back(e);
    }
  }
  experts.swap(keep);
}

Status CudaExpertSource::ComputeOnHost(int layer, int expert, int64_t rows, const float* x, float* y) {
  const runtime::ExpertWeights w = HostWeights(layer, expert);
  if (w.gate.empty())
    return FailedPrecondition("cpu compute: expert " + std::to_string(expert) + " of layer " + std::to_string(layer) +
                              " has no pinned host copy");
  const auto t = std::chrono::steady_clock::now();
  ThreadPool& pool = ThreadPool::Default();
  const int64_t inter = w.gate.rows;
  host_gate_.resize(static_cast<size_t>(rows * inter));
  host_up_.resize(host_gate_.size());
  runtime::HostGemv(pool, x, rows, w.gate, host_gate_.data());
  runtime::HostGemv(pool, x, rows, w.up, host_up_.data());
  for (size_t i = 0; i < host_gate_.size(); ++i) {
    const float g = host_gate_[i];
    host_gate_[i] = g / (1.0f + std::exp(-g)) * host_up_[i];
  }
  runtime::HostGemv(pool, host_gate_.data(), rows, w.down, y);
  ++host_stats_.experts;
  host_stats_.rows += rows;
  host_stats_.ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
  return Status::Ok();
}

void CudaExpertSource::SetUpcoming(int layer, std::vector<int32_t> experts) {
  if (layer >= 0 && layer < static_cast<int>(upcoming_.size())) upcoming_[layer] = std::move(experts);
}

void CudaExpertSource::ClearUpcoming() {
  for (auto& u : upcoming_) u.clear();
}

}  // namespace ef::cache
