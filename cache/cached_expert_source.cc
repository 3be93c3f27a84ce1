#include "cache/cached_expert_source.h"

#include <algorithm>
#include <cstring>

#include "cache/backend_slot_arena.h"
#include "runtime/core/logging.h"

namespace ef::cache {

StatusOr<std::unique_ptr<CachedExpertSource>> CachedExpertSource::Create(const runtime::ModelWeights& model,
                                                                         runtime::Backend* backend,
                                                                         const CachedExpertSourceOptions& options) {
  const runtime::ModelConfig& c = model.config();
  auto src = std::unique_ptr<CachedExpertSource>(new CachedExpertSource());
  src->model_ = &model;
  src->options_ = options;
  ExpertStoreOptions so;
  so.num_layers = c.num_layers;
  so.num_experts = c.num_experts;
  so.top_k = c.top_k;
  so.slot_bytes = options.tiers ? options.tiers->max_packed_bytes() : model.max_expert_bytes();
  so.policy = options.policy;
  so.async_prefetch = options.async;
  // The store's worker would read peers over UCX while the engine thread progresses the same
  // (single-threaded) worker during exchanges.
  if (options.async && options.tiers && options.tiers->hooks().peer)
    return InvalidArgument("expert cache: asynchronous loads do not combine with the peer tier (UCX) yet");
  if (ExpertTiers* tiers = options.tiers)
    so.loaded_bytes = [tiers](int l, int e) { return tiers->ResidentBytes(l, e); };
  so.policy_config.counts = options.static_counts;
  int num_slots = 0;
  if (options.global_slots > 0) {
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
    so.layer_quotas.assign(c.num_layers, 0);
    for (int l = 0; l < c.num_layers; ++l)
      if (c.IsMoeLayer(l)) so.layer_quotas[l] = std::min(options.slots_per_layer, c.num_experts);
    for (int q : so.layer_quotas) num_slots += q;
  }
  EF_ASSIGN_OR_RETURN(auto arena, BackendSlotArena::Create(backend, num_slots, so.slot_bytes));
  const runtime::ModelWeights* m = &model;
  cache::ExpertSource fill;
  if (ExpertTiers* tiers = options.tiers) {
    fill = [tiers](int l, int e, std::span<std::byte> dst) { return tiers->FillPacked(l, e, dst); };
  } else {
    fill = [m](int l, int e, std::span<std::byte> dst) -> Status {
      const runtime::ExpertWeights& w = m->host_expert(l, e);
      size_t off = 0;
      for (const runtime::Weight* p : w.parts()) {
        std::memcpy(dst.data() + off, p->data, p->nbytes());
        off += p->nbytes();
      }
      return Status::Ok();
    };
  }
  EF_ASSIGN_OR_RETURN(src->store_, ExpertStore::Create(so, std::move(fill), std::move(arena)));
  src->upcoming_.resize(c.num_layers);
  src->pinned_.resize(static_cast<size_t>(c.num_layers) * c.num_experts);
  EF_LOG(INFO, CACHE, "expert cache: %d slots of %zu bytes, policy %s, prefetch %d layer(s)%s", num_slots,
         so.slot_bytes, options.policy.c_str(), options.prefetch_layers, options.async ? ", async" : "");
  return src;
}

void CachedExpertSource::OnRouting(int layer, std::vector<int32_t>& experts) {
  store_->SetCurrentLayer(layer);
  // Hits first: resident experts compute while the misses load.
  std::stable_partition(experts.begin(), experts.end(), [&](int32_t e) { return store_->IsResident(layer, e); });
  if (options_.async) {
    for (int32_t e : experts)
      if (!store_->IsResident(layer, e)) store_->Prefetch(layer, e, Priority::kCorrection).IgnoreError();
  }
  if (options_.prefetch_layers <= 0) return;
  const runtime::ModelConfig& c = model_->config();
  int ahead = 0;
  for (int l = layer + 1; l < c.num_layers && ahead < options_.prefetch_layers; ++l) {
    if (!c.IsMoeLayer(l)) continue;
    ++ahead;
    // Advisory: a failure (every slot pinned) only means the expert loads on demand later.
    store_->PrefetchSet(l, upcoming_[l], Priority::kPrefetch);
  }
}

StatusOr<runtime::ExpertWeights> CachedExpertSource::Acquire(int layer, int expert) {
  EF_ASSIGN_OR_RETURN(SlotRef ref, store_->Acquire(layer, expert));
  const runtime::ExpertWeights& h = model_->host_expert(layer, expert);
  auto* base = static_cast<std::byte*>(ref.data);
  // The layout of what the slot holds (quantized, or the checkpoint's), packed in parts() order.
  runtime::ExpertWeights w = (options_.tiers ? options_.tiers->ResidentLayout(layer, expert) : h).Rebased(base);
  pinned_[static_cast<size_t>(layer) * model_->config().num_experts + expert] = ref;
  return w;
}

void CachedExpertSource::Release(int layer, int expert) {
  SlotRef& ref = pinned_[static_cast<size_t>(layer) * model_->config().num_experts + expert];
  if (ref.slot >= 0) store_->Release(ref);
  ref = SlotRef{};
  // A low-precision copy that turned hot is replaced by the checkpoint's precision (auto).
  if (options_.tiers && options_.tiers->NoteUseWantsUpgrade(layer, expert)) {
    Status s = store_->Refill(layer, expert);
    if (!s.ok()) EF_LOG(WARN, CACHE, "upgrading expert %d of layer %d: %s", expert, layer, s.ToString().c_str());
  }
}

void CachedExpertSource::SetUpcoming(int layer, std::vector<int32_t> experts) {
  if (layer >= 0 && layer < static_cast<int>(upcoming_.size())) upcoming_[layer] = std::move(experts);
}

void CachedExpertSource::ClearUpcoming() {
  for (auto& u : upcoming_) u.clear();
}

}  // namespace ef::cache
