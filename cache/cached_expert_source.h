// CachedExpertSource: the engine's ExpertSource backed by an ExpertStore — a bounded number of
// expert slots in backend memory, filled from the checkpoint's host copy (the mmap'd safetensors,
// or pinned memory; under expert parallelism the tiers of ExpertTiers) on demand and ahead of need.
//
// Per MoE layer, when the router has run (OnRouting):
//   1. correction: every expert the router picked that is not resident is queued at correction
//      priority (ahead of any prefetch);
//   2. the compute order puts resident experts first, so hits compute while misses load (as the
//      ExpertFlow paper does); results do not depend on that order;
//   3. prefetch: the forecast experts of the next `prefetch_layers` MoE layers are queued at
//      prefetch priority (the forecast comes from SetUpcoming: a predictor, or a trace's future
//      routing used as an oracle in benchmarks).
// Slot layout: gate | up | down, each in the checkpoint's dtype.
//
// Thread safety: driven by the engine thread; the store's worker thread performs async loads.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "cache/expert_store.h"
#include "cache/expert_tiers.h"
#include "runtime/engine/expert_source.h"

namespace ef::cache {

struct CachedExpertSourceOptions {
  int slots_per_layer = 0;  // per-layer caches of this many slots, or
  int global_slots = 0;     // one budget shared by all MoE layers (exactly one of the two)
  std::string policy = "lru";
  int prefetch_layers = 0;  // 0: on demand only
  bool async = false;       // load corrections/prefetches on a worker thread
  // static policy: routing counts per (layer, expert), layer-major, e.g. from a routing trace.
  std::vector<int64_t> static_counts;
  // Where misses load from (not owned; must outlive the source); null: the checkpoint mapping.
  ExpertTiers* tiers = nullptr;
};

class CachedExpertSource final : public runtime::ExpertSource {
 public:
  // Validates the budget against the model (fewer slots than top-k in a layer, or more than the
  // backend can hold, is an error naming both numbers).
  static StatusOr<std::unique_ptr<CachedExpertSource>> Create(const runtime::ModelWeights& model,
                                                              runtime::Backend* backend,
                                                              const CachedExpertSourceOptions& options);

  void OnRouting(int layer, std::vector<int32_t>& experts) override;
  StatusOr<runtime::ExpertWeights> Acquire(int layer, int expert) override;
  void Release(int layer, int expert) override;

  // Forecast experts of `layer` for the step being computed (replaces the previous list).
  void SetUpcoming(int layer, std::vector<int32_t> experts);
  void ClearUpcoming();

  ExpertStore& store() { return *store_; }
  ExpertStoreStats stats() const { return store_->stats(); }

 private:
  CachedExpertSource() = default;

  const runtime::ModelWeights* model_ = nullptr;
  CachedExpertSourceOptions options_;
  std::unique_ptr<ExpertStore> store_;
  std::vector<std::vector<int32_t>> upcoming_;  // per layer
  std::vector<SlotRef> pinned_;                 // [layer * E + expert], while acquired
};

}  // namespace ef::cache
