#include "cache/cached_expert_source.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "cache/backend_slot_arena.h"
#include "runtime/core/logging.h"

namespace ef::cache {
namespace {

// The store's fill for slots in `layout`: the packed bytes written in place when the layout is
// packed, else staged and written at the layout's offsets. The shape is read after the fill, which
// decides it under auto precision.
ExpertSource PlacedFill(const SlotLayout& layout, ExpertSource packed) {
  if (layout.alignment() == 1) return packed;
  return [layout, packed = std::move(packed)](int l, int e, std::span<std::byte> dst) -> Status {
    std::vector<std::byte> staging(dst.size());
    EF_RETURN_IF_ERROR(packed(l, e, staging));
    return layout.Write(layout.Shape(l, e).Rebased(staging.data()), dst);
  };
}

}  // namespace

ExpertSource PackedExpertFill(const runtime::ModelWeights& model, ExpertTiers* tiers) {
  if (tiers) return [tiers](int l, int e, std::span<std::byte> dst) { return tiers->FillPacked(l, e, dst); };
  const runtime::ModelWeights* m = &model;
  return [m, packed = SlotLayout::OfModel(1, model, nullptr)](int l, int e, std::span<std::byte> dst) {
    return packed.Write(m->host_expert(l, e), dst);
  };
}

StatusOr<std::unique_ptr<CachedExpertSource>> CachedExpertSource::Create(const runtime::ModelWeights& model,
                                                                         runtime::Backend* backend,
                                                                         const CachedExpertSourceOptions& options) {
  Backing b{SlotLayout::OfModel(1, model, options.tiers)};
  b.slot_bytes = options.tiers ? options.tiers->max_packed_bytes() : model.max_expert_bytes();
  b.fill = PackedExpertFill(model, options.tiers);
  b.make_arena = [backend](int num_slots, size_t slot_bytes,
                           std::span<const size_t> slot_sizes) -> StatusOr<std::unique_ptr<SlotArena>> {
    EF_ASSIGN_OR_RETURN(auto arena, BackendSlotArena::Create(backend, num_slots, slot_bytes, slot_sizes));
    return std::unique_ptr<SlotArena>(std::move(arena));
  };
  return Create(model.config(), std::move(b), options);
}

StatusOr<std::unique_ptr<CachedExpertSource>> CachedExpertSource::Create(const runtime::ModelConfig& c, Backing backing,
                                                                         const CachedExpertSourceOptions& options) {
  if (c.num_moe_layers() == 0) return InvalidArgument("expert cache: the model has no MoE layer");
  // The store's worker would read peers over UCX while the engine thread progresses the same
  // (single-threaded) worker during exchanges.
  if (options.async && options.tiers && options.tiers->hooks().peer)
    return InvalidArgument("expert cache: asynchronous loads do not combine with the peer tier (UCX) yet");
  auto src = std::unique_ptr<CachedExpertSource>(new CachedExpertSource(std::move(backing.layout)));
  src->options_ = options;
  src->num_layers_ = c.num_layers;
  src->num_experts_ = c.num_experts;
  for (int l = 0; l < c.num_layers; ++l) src->moe_layer_.push_back(c.IsMoeLayer(l));
  ExpertStoreOptions so;
  so.num_layers = c.num_layers;
  so.num_experts = c.num_experts;
  so.top_k = c.top_k;
  so.slot_bytes = backing.slot_bytes;
  so.policy = options.policy;
  so.async_prefetch = options.async;
  // What a load moves: the expert in the slot layout (under auto precision, in the precision the
  // load chose).
  so.loaded_bytes = [layout = src->layout_](int l, int e) { return layout.Bytes(l, e); };
  so.policy_config.counts = options.static_counts;
  int num_slots = 0;
  if (options.global_slots > 0) {
    if (!options.layer_slots.empty())
      return InvalidArgument("expert cache: per-layer slot counts with one budget shared by all layers");
    if (options.global_slots < c.top_k)
      return InvalidArgument("cache budget of " + std::to_string(options.global_slots) +
                             " expert slots is smaller than one layer's top-k (" + std::to_string(c.top_k) + ")");
    so.global_slots = options.global_slots;
    num_slots = options.global_slots;
  } else {
    if (options.slots_per_layer < c.top_k)
      return InvalidArgument("cache budget of " + std::to_string(options.slots_per_layer) +
                             " expert slots per layer is smaller than the model's top-k (" + std::to_string(c.top_k) +
                             ")");
    // Dense layers (mlp_only) get no slots: quotas per layer.
    if (!options.layer_slots.empty() && options.layer_slots.size() != static_cast<size_t>(c.num_layers))
      return InvalidArgument("expert cache: " + std::to_string(options.layer_slots.size()) +
                             " per-layer slot counts for " + std::to_string(c.num_layers) + " layers");
    so.layer_quotas.assign(c.num_layers, 0);
    for (int l = 0; l < c.num_layers; ++l) {
      if (!c.IsMoeLayer(l)) continue;
      const int want = options.layer_slots.empty() ? options.slots_per_layer : options.layer_slots[l];
      if (want < c.top_k)
        return InvalidArgument("cache budget of " + std::to_string(want) + " expert slots in layer " +
                               std::to_string(l) + " is smaller than the model's top-k (" + std::to_string(c.top_k) +
                               ")");
      so.layer_quotas[l] = std::min(want, c.num_experts);
    }
    for (int q : so.layer_quotas) num_slots += q;
  }
  // Slots sized per layer: the store's partitions lie in layer order (SlotCache), so do the sizes.
  std::vector<size_t> slot_sizes;
  if (!options.layer_slot_bytes.empty()) {
    if (options.layer_slot_bytes.size() != static_cast<size_t>(c.num_layers) || so.layer_quotas.empty())
      return InvalidArgument("expert cache: slot sizes per layer need one size per layer and per-layer caches");
    for (int l = 0; l < c.num_layers; ++l) {
      if (so.layer_quotas[l] == 0) continue;
      // (the budget rounds slots up to 256 bytes; the arena does that itself)
      const size_t n = std::min(options.layer_slot_bytes[l], so.slot_bytes);
      for (int e = 0; e < c.num_experts; ++e)
        if (src->layout_.Bytes(l, e) > n)
          return InvalidArgument("expert cache: slots of " + std::to_string(n) + " bytes in layer " +
                                 std::to_string(l) + " do not hold its expert " + std::to_string(e) + " (" +
                                 std::to_string(src->layout_.Bytes(l, e)) + " bytes)");
      slot_sizes.insert(slot_sizes.end(), static_cast<size_t>(so.layer_quotas[l]), n);
    }
  }
  EF_ASSIGN_OR_RETURN(std::unique_ptr<SlotArena> arena, backing.make_arena(num_slots, so.slot_bytes, slot_sizes));
  if (backing.host_compute) EF_RETURN_IF_ERROR(backing.host_compute->Calibrate(*arena));
  src->host_compute_ = std::move(backing.host_compute);
  src->arena_ = arena.get();
  EF_ASSIGN_OR_RETURN(src->store_,
                      ExpertStore::Create(so, PlacedFill(src->layout_, std::move(backing.fill)), std::move(arena)));
  src->upcoming_.resize(c.num_layers);
  src->need_.resize(c.num_layers);
  src->held_.resize(static_cast<size_t>(c.num_layers) * c.num_experts);
  EF_LOG(INFO, CACHE, "expert cache: %d slots of %s%zu bytes on %s, policy %s, prefetch %d layer(s)%s", num_slots,
         slot_sizes.empty() ? "" : "up to ", so.slot_bytes, src->arena_->tier(), options.policy.c_str(),
         options.prefetch_layers, options.async ? ", async" : "");
  return src;
}

CachedExpertSource::~CachedExpertSource() {
  if (!store_) return;
  for (SlotRef& r : held_)
    if (r.slot >= 0) store_->Release(r);
  arena_->SynchronizeCopies();
}

void CachedExpertSource::OnRouting(int layer, std::vector<int32_t>& experts) {
  store_->SetCurrentLayer(layer);
  // A pass that failed part way through this layer (a failed load, copy or allocation) released
  // none of the experts it had not computed yet: those pins are released here, or they would hold
  // the layer's slots for good (every later routing to other experts: slots exhausted).
  int stale = 0;
  for (int e = 0; e < num_experts_; ++e) {
    SlotRef& ref = Held(layer, e);
    if (ref.slot < 0 || std::find(experts.begin(), experts.end(), e) != experts.end()) continue;
    store_->Release(ref);
    ref = SlotRef{};
    ++stale;
  }
  if (stale > 0) EF_LOG(DEBUG, CACHE, "layer %d: released %d expert(s) held by an unfinished pass", layer, stale);
  std::stable_partition(experts.begin(), experts.end(), [&](int32_t e) { return store_->IsResident(layer, e); });
  AcquireInOrder(layer, experts);
  PrefetchAhead(layer);
}

void CachedExpertSource::AcquireInOrder(int layer, const std::vector<int32_t>& experts) {
  for (int32_t e : experts) {
    SlotRef& ref = Held(layer, e);
    if (ref.slot >= 0) continue;
    if (options_.async && !store_->IsResident(layer, e)) {
      // The worker loads it, ahead of any prefetch; Acquire waits for that load.
      store_->Prefetch(layer, e, Priority::kCorrection).IgnoreError();
      continue;
    }
    auto r = store_->Acquire(layer, e);
    if (!r.ok()) break;  // every slot of the layer held: the rest load in Acquire
    ref = *r;
  }
}

void CachedExpertSource::PrefetchAfter(int layer) {
  if (layer < 0 || layer >= num_layers_) return;
  store_->SetCurrentLayer(layer);
  PrefetchAhead(layer);
}

void CachedExpertSource::PrefetchAhead(int layer) {
  int ahead = 0;
  for (int step = 1; step < num_layers_ && ahead < options_.prefetch_layers; ++step) {
    // Past the last layer: the first layers of the next step, whose upcoming lists forecast it.
    const int l = (layer + step) % num_layers_;
    if (!moe_layer_[l]) continue;
    ++ahead;
    // Advisory: a failure (every slot pinned) only means the expert loads on demand later.
    store_->PrefetchSet(l, upcoming_[l], Priority::kPrefetch, need_[l], options_.prefetch_min_prob);
  }
}

StatusOr<runtime::ExpertWeights> CachedExpertSource::Acquire(int layer, int expert) {
  SlotRef& ref = Held(layer, expert);
  if (ref.slot < 0) {
    EF_ASSIGN_OR_RETURN(ref, store_->Acquire(layer, expert));
  }
  if (Status s = arena_->WaitReady(ref.slot); !s.ok())
    return s.Prepend("expert " + std::to_string(expert) + " of layer " + std::to_string(layer) + ": ");
  return layout_.At(layer, expert, ref.data);
}

void CachedExpertSource::Release(int layer, int expert) {
  SlotRef& ref = Held(layer, expert);
  if (ref.slot < 0) return;
  store_->Release(ref);
  ref = SlotRef{};
  // A low-precision copy that turned hot is replaced by the checkpoint's precision (auto).
  if (options_.tiers && options_.tiers->NoteUseWantsUpgrade(layer, expert)) {
    Status s = store_->Refill(layer, expert);
    if (!s.ok()) EF_LOG(WARN, CACHE, "upgrading expert %d of layer %d: %s", expert, layer, s.ToString().c_str());
  }
}

void CachedExpertSource::TakeHostExperts(int layer, std::vector<int32_t>& experts, std::span<const int64_t> rows,
                                         HostShare& host) {
  if (host_compute_) host_compute_->Take(layer, experts, rows, *store_, host);
}

Status CachedExpertSource::ComputeOnHost(int layer, int expert, int64_t rows, const float* x, float* y,
                                         int64_t inter_begin) {
  if (!host_compute_) return Unimplemented("this expert cache computes no expert on the host (cache.cpu_compute off)");
  return host_compute_->Compute(layer, expert, rows, x, y, inter_begin);
}

Status CachedExpertSource::StartPart(int layer, int expert, int64_t split) {
  if (!host_compute_) return Unimplemented("this expert cache splits no expert (cache.cpu_compute off)");
  return host_compute_->StartPart(*arena_, layer, expert, split);
}

StatusOr<runtime::ExpertWeights> CachedExpertSource::AcquirePart() {
  if (!host_compute_) return Unimplemented("this expert cache splits no expert (cache.cpu_compute off)");
  return host_compute_->AcquirePart(*arena_);
}

void CachedExpertSource::SetUpcoming(int layer, std::vector<int32_t> experts, std::vector<float> need) {
  if (layer < 0 || layer >= static_cast<int>(upcoming_.size())) return;
  if (need.size() != static_cast<size_t>(num_experts_)) {
    need.assign(static_cast<size_t>(num_experts_), 0.f);
    for (int32_t e : experts)
      if (e >= 0 && e < num_experts_) need[e] = 1.f;
  }
  upcoming_[layer] = std::move(experts);
  need_[layer] = std::move(need);
}

void CachedExpertSource::ClearUpcoming() {
  for (auto& u : upcoming_) u.clear();
  for (auto& n : need_) n.clear();
}

}  // namespace ef::cache
