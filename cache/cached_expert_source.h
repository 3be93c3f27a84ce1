// CachedExpertSource: the engine's ExpertSource backed by an ExpertStore - a bounded number of
// expert slots in a SlotArena, filled from the next tier (the checkpoint mapping, the expert
// tiers under expert parallelism or low-precision loads, a pinned host tier on CUDA) on demand and
// ahead of need. One implementation for every backend: what differs (where the slots live, how a
// load is ordered before the compute that reads it, where parts sit in a slot) is in the parts it
// is created with (Backing: the arena, the slot layout, the fill; cuda/cuda_cache_source.h builds
// the CUDA ones).
//
// Per MoE layer, when the router has run (OnRouting):
//   1. hits first: resident experts are put ahead in the compute order (a stable partition), so
//      they compute while the misses load (as the ExpertFlow paper does); results do not depend on
//      the order (the executor accumulates in expert-id order);
//   2. correction: the layer's experts are acquired at once, in that order, while the layer's
//      slots allow, so each miss starts loading now: the CUDA arena enqueues its copy on the
//      correction stream and returns, a host arena loads it before returning, and with `async`
//      the store's worker loads it at correction priority (Acquire waits for it). What does not
//      fit is acquired by Acquire(), after earlier experts of the layer released their slots;
//   3. prefetch: the forecast experts of the next `prefetch_layers` MoE layers are loaded at
//      prefetch priority, wrapping past the last layer to the first layers of the next step (the
//      forecast comes from SetUpcoming: a predictor, or a trace's future routing used as an oracle
//      in benchmarks).
// Acquire(l, e) waits until the expert's slot is readable (SlotArena::WaitReady: on CUDA a wait of
// the compute stream, not of the host); Release(l, e) unpins it and, under cache.miss_precision
// auto, reloads a low-precision copy that turned hot in the checkpoint's precision.
// Hit rate counts an access as a hit only when the expert was resident before its layer's routing
// was known (corrections count as misses).
//
// Thread safety: driven by the engine thread; the store's worker thread performs async loads.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cache/expert_store.h"
#include "cache/expert_tiers.h"
#include "cache/host_expert_compute.h"
#include "cache/slot_layout.h"
#include "runtime/engine/expert_source.h"

namespace ef::cache {

struct CachedExpertSourceOptions {
  int slots_per_layer = 0;  // per-layer caches of this many slots, or
  int global_slots = 0;     // one budget shared by all MoE layers (exactly one of the two)
  // Optional, per decoder layer (0 for dense layers), with slots_per_layer: layer l's cache holds
  // layer_slots[l] slots instead (a byte budget buys more slots of smaller experts).
  std::vector<int> layer_slots;
  // Optional, per decoder layer: the bytes of layer l's slots, each at least the layout's size of
  // that layer's experts (cache.low_precision_layers: int8 layers get int8-sized slots). Empty:
  // every slot holds the largest expert.
  std::vector<size_t> layer_slot_bytes;
  std::string policy = "lru";
  int prefetch_layers = 0;  // 0: on demand only
  // A forecast expert loads ahead only when it is at least this much more probable than the
  // resident it would evict (ExpertStore::PrefetchSet's `need` rule; cache.prefetch_min_prob).
  double prefetch_min_prob = 0;
  // Load corrections/prefetches on the store's worker thread (for arenas whose loads complete
  // before returning; the CUDA arena's are asynchronous already).
  bool async = false;
  // static policy: routing counts per (layer, expert), layer-major, e.g. from a routing trace.
  std::vector<int64_t> static_counts;
  // Where misses load from (not owned; must outlive the source); null: the checkpoint mapping.
  ExpertTiers* tiers = nullptr;
};

// The packed bytes (parts() back to back) of (layer, expert) from `tiers` (in its load precision),
// or from the checkpoint mapping when `tiers` is null; both must outlive the callback.
ExpertSource PackedExpertFill(const runtime::ModelWeights& model, ExpertTiers* tiers);

class CachedExpertSource final : public runtime::ExpertSource {
 public:
  // The backend's parts.
  struct Backing {
    explicit Backing(SlotLayout slot_layout) : layout(std::move(slot_layout)) {}
    SlotLayout layout;
    size_t slot_bytes = 0;  // bytes of the largest expert in `layout`
    // Writes the packed bytes of an expert (PackedExpertFill) for the loads the arena does not
    // perform itself; the source places them at the layout's offsets.
    cache::ExpertSource fill;
    // The arena of the budget's slots.
    // The arena of the budget's slots: num_slots slots of slot_bytes, or of slot_sizes[i] (one per
    // slot, each at most slot_bytes) when not empty.
    std::function<StatusOr<std::unique_ptr<SlotArena>>(int num_slots, size_t slot_bytes,
                                                       std::span<const size_t> slot_sizes)>
        make_arena;
    // Optional (cache.cpu_compute): computes some misses on the host; calibrated at Create.
    std::unique_ptr<HostExpertCompute> host_compute;
  };

  // The MoE layers of `config` over `backing`. Validates the budget against the model (fewer slots
  // than top-k in a layer, or more than the arena can hold, is an error naming both numbers).
  static StatusOr<std::unique_ptr<CachedExpertSource>> Create(const runtime::ModelConfig& config, Backing backing,
                                                              const CachedExpertSourceOptions& options);
  // Slots in `backend`'s memory (BackendSlotArena), parts packed back to back, filled from
  // options.tiers or the checkpoint mapping.
  static StatusOr<std::unique_ptr<CachedExpertSource>> Create(const runtime::ModelWeights& model,
                                                              runtime::Backend* backend,
                                                              const CachedExpertSourceOptions& options);
  ~CachedExpertSource() override;  // releases what it still holds, then waits for pending loads
  CachedExpertSource(const CachedExpertSource&) = delete;
  CachedExpertSource& operator=(const CachedExpertSource&) = delete;

  void OnRouting(int layer, std::vector<int32_t>& experts) override;
  StatusOr<runtime::ExpertWeights> Acquire(int layer, int expert) override;
  void Release(int layer, int expert) override;
  void TakeHostExperts(int layer, std::vector<int32_t>& experts, std::span<const int64_t> rows,
                       HostShare& host) override;
  Status ComputeOnHost(int layer, int expert, int64_t rows, const float* x, float* y, int64_t inter_begin) override;
  Status StartPart(int layer, int expert, int64_t split) override;
  StatusOr<runtime::ExpertWeights> AcquirePart() override;

  // Forecast experts of `layer` for its next run (replaces the previous list), most expected first,
  // and optionally `need`: per expert of the layer, the probability that its next run uses it.
  // Empty `need`: the listed experts are certain and the others not needed (an oracle).
  void SetUpcoming(int layer, std::vector<int32_t> experts, std::vector<float> need = {});
  void ClearUpcoming();
  // The prefetches OnRouting(layer) issues after the layer's experts, for a layer this process
  // computes nothing of (under expert parallelism: no row of any rank's tokens came here).
  void PrefetchAfter(int layer);

  ExpertStore& store() { return *store_; }
  ExpertStoreStats stats() const { return store_->stats(); }
  SlotArena& arena() { return *arena_; }
  const SlotLayout& layout() const { return layout_; }
  // Null unless created with one (cache.cpu_compute).
  const HostExpertCompute* host_compute() const { return host_compute_.get(); }
  HostExpertCompute* host_compute() { return host_compute_.get(); }

 private:
  explicit CachedExpertSource(SlotLayout layout) : layout_(std::move(layout)) {}
  SlotRef& Held(int layer, int expert) { return held_[static_cast<size_t>(layer) * num_experts_ + expert]; }
  // Step 2 of OnRouting: acquires `experts` in order while the layer's slots allow.
  void AcquireInOrder(int layer, const std::vector<int32_t>& experts);
  // Step 3 of OnRouting: prefetches the upcoming experts of the MoE layers after `layer`.
  void PrefetchAhead(int layer);

  CachedExpertSourceOptions options_;
  SlotLayout layout_;
  int num_layers_ = 0;
  int num_experts_ = 0;
  std::vector<bool> moe_layer_;  // [num_layers_]
  std::unique_ptr<HostExpertCompute> host_compute_;
  SlotArena* arena_ = nullptr;  // owned by store_
  std::unique_ptr<ExpertStore> store_;
  std::vector<std::vector<int32_t>> upcoming_;  // per layer
  std::vector<std::vector<float>> need_;        // per layer: [num_experts_], see SetUpcoming
  std::vector<SlotRef> held_;                   // [layer * E + expert]: acquired, not yet released
};

}  // namespace ef::cache
