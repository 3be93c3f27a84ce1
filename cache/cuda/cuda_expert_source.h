// CudaExpertSource: the engine's ExpertSource on a CUDA device with a bounded expert cache — an
// ExpertStore (the real policies and counters) over a CudaSlotArena (device slots, async copies
// on copy streams, per-slot events) backed by a PinnedHostTier (every routed expert in pinned host
// memory).
//
// Per MoE layer, when the router has run (OnRouting):
//   1. hits first: resident experts are put ahead in the compute order, so they compute while the
//      misses load;
//   2. correction: the layer's experts are acquired at once (in that order, while the layer's
//      slots allow): a miss enqueues its copy on the high-priority correction stream right away;
//      the compute stream waits for a slot's copy only when the expert computes (GPU-side wait);
//   3. cpu compute (cache.cpu_compute, before 1 and 2): a miss of few rows whose host copy is
//      pinned may be computed on the host CPU from that copy instead of being copied
//      (TakeHostExperts/ComputeOnHost; runtime/backend/cpu/host_gemv.h). `auto` gives each miss, in
//      compute order, to whichever path would finish it first: the copy engine (queue of this
//      layer's misses so far x copy time per expert) or the host (queue x host time for its rows),
//      times calibrated at Create on this machine; `on` computes every eligible miss on the host.
//      Host-computed experts are not loaded, so the cache holds what it held;
//   4. prefetch: the upcoming experts of the next `prefetch_layers` MoE layers (wrapping to the
//      first layers of the next step) are loaded on the low-priority prefetch stream.
// SetUpcoming(l, experts) gives the forecast of the next time layer l runs (a predictor's, or a
// trace's future routing used as an oracle by the benchmark).
//
// Slot layout: gate | up | down (| gate_bias | up_bias | down_bias for biased experts), each at a
// 256-byte-aligned offset, in the dtype the host tier holds (the checkpoint's: packed MXFP4 or
// block FP8 experts at their stored size). Experts past the pinned host budget are staged from the checkpoint
// mapping and copied synchronously when loaded. Hit rate counts an access as a hit only when the expert was resident
// before its layer's routing was known (corrections count as misses).
//
// Thread safety: not thread-safe; driven by the engine thread (the store runs in sync mode: its
// loads only enqueue copies).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "cache/cuda/cuda_slot_arena.h"
#include "cache/cuda/pinned_host_tier.h"
#include "cache/expert_store.h"
#include "cache/expert_tiers.h"
#include "runtime/engine/expert_source.h"

namespace ef::cache {

struct CudaExpertSourceOptions {
  int slots_per_layer = 0;  // per-layer caches of this many device slots (>= top-k)
  std::string policy = "lru";
  int prefetch_layers = 0;  // 0: on demand only
  // Copy pieces and how many may sit on the copy engine (cuda_slot_arena.h explains why few).
  size_t copy_chunk_bytes = CudaSlotArenaOptions{}.copy_chunk_bytes;
  int max_queued_chunks = CudaSlotArenaOptions{}.max_queued_chunks;
  // Pinned host memory for experts (Create from a model); 0: every expert. Experts past it are
  // copied from the checkpoint mapping when loaded (staged, synchronous).
  size_t host_budget_bytes = 0;
  // static policy: routing counts per (layer, expert), layer-major.
  std::vector<int64_t> static_counts;
  // Under expert parallelism (Create from a model): only experts with a host copy in `tiers`
  // (those homed on this rank) are pinned; the others load through tiers' peer and checkpoint
  // tiers, staged. Not owned; must outlive the source. Null: every expert may be pinned.
  ExpertTiers* tiers = nullptr;
  // cache.cpu_compute: "off", "auto" or "on" (see above); misses of at most cpu_compute_max_rows
  // rows are candidates (the host kernel streams the weights once per 4 rows). The host path
  // computes SiLU experts without biases; biased experts (gpt_oss) need "off".
  std::string cpu_compute = "off";
  int cpu_compute_max_rows = 4;
};

// Experts computed on the host (cache.cpu_compute), and the calibration the choice used.
struct HostComputeStats {
  int64_t experts = 0;  // expert computations on the host
  int64_t rows = 0;
  double ms = 0;                                          // host wall time in them
  double calibrated_host_ms = 0, calibrated_copy_ms = 0;  // one expert, one row
};

// The shape of every routed expert (all experts of a model have the same shape here).
struct ExpertLayout {
  int num_layers = 0;
  int num_experts = 0;
  int top_k = 0;
  std::vector<bool> moe_layer;     // [num_layers]
  runtime::Weight gate, up, down;  // dtype, rows, cols (data unused)
  // Biased experts (gpt_oss): the biases follow down in a slot. Empty (cols 0) when there are none.
  runtime::Weight gate_bias, up_bias, down_bias;
  bool has_bias() const { return gate_bias.cols > 0; }

  // The parts' shapes in packed order (runtime::ExpertWeights::parts(): biases only when present).
  runtime::ExpertWeights Shapes() const { return {gate, up, down, gate_bias, up_bias, down_bias}; }
  // Offset in a slot of part i of Shapes().parts(): each part starts 256-byte aligned.
  size_t offset(size_t i) const {
    const runtime::ExpertWeights shapes = Shapes();
    size_t o = 0;
    const std::vector<const runtime::Weight*> parts = shapes.parts();
    for (size_t j = 0; j < i && j < parts.size(); ++j) o += Align(parts[j]->nbytes());
    return o;
  }
  size_t gate_offset() const { return offset(0); }
  size_t up_offset() const { return offset(1); }
  size_t down_offset() const { return offset(2); }
  size_t bytes() const {
    const runtime::ExpertWeights shapes = Shapes();
    const size_t n = shapes.parts().size();
    return offset(n - 1) + shapes.parts().back()->nbytes();
  }
  // The expert laid out at `base` (a slot, or a pinned host copy).
  runtime::ExpertWeights At(const std::byte* base) const {
    runtime::ExpertWeights w = Shapes();
    size_t i = 0;
    for (runtime::Weight* p : w.parts()) p->data = base + offset(i++);
    return w;
  }
  static size_t Align(size_t n) { return (n + 255) / 256 * 256; }
};

class CudaExpertSource final : public runtime::ExpertSource {
 public:
  // From a loaded model: copies every routed expert (up to host_budget_bytes) into pinned host
  // memory. `backend` must be the CUDA backend the engine uses.
  static StatusOr<std::unique_ptr<CudaExpertSource>> Create(const runtime::ModelWeights& model,
                                                            runtime::Backend* backend,
                                                            const CudaExpertSourceOptions& options);
  // From a layout and a filled host tier (synthetic models: the caller writes tier->data(l, e)).
  static StatusOr<std::unique_ptr<CudaExpertSource>> Create(const ExpertLayout& layout,
                                                            std::shared_ptr<const PinnedHostTier> tier,
                                                            runtime::Backend* backend,
                                                            const CudaExpertSourceOptions& options);
  ~CudaExpertSource() override;
  CudaExpertSource(const CudaExpertSource&) = delete;
  CudaExpertSource& operator=(const CudaExpertSource&) = delete;

  void OnRouting(int layer, std::vector<int32_t>& experts) override;
  void TakeHostExperts(int layer, std::vector<int32_t>& experts, std::span<const int64_t> rows,
                       std::vector<int32_t>& host) override;
  Status ComputeOnHost(int layer, int expert, int64_t rows, const float* x, float* y) override;
  StatusOr<runtime::ExpertWeights> Acquire(int layer, int expert) override;
  void Release(int layer, int expert) override;

  void SetUpcoming(int layer, std::vector<int32_t> experts);
  void ClearUpcoming();

  ExpertStore& store() { return *store_; }
  CudaSlotArena& arena() { return *arena_; }
  ExpertStoreStats stats() const { return store_->stats(); }
  const ExpertLayout& layout() const { return layout_; }
  const HostComputeStats& host_stats() const { return host_stats_; }

 private:
  CudaExpertSource() = default;
  // `fallback` fills a staging buffer for experts the tier holds no pinned copy of.
  static StatusOr<std::unique_ptr<CudaExpertSource>> Create(const ExpertLayout& layout,
                                                            std::shared_ptr<const PinnedHostTier> tier,
                                                            cache::ExpertSource fallback, runtime::Backend* backend,
                                                            const CudaExpertSourceOptions& options);

  // Times one expert's copy into a slot and its host computation for one row (cpu_compute).
  Status CalibrateHostCompute();
  // (layer, expert)'s weights in the pinned tier, as host Weights; empty gate when not pinned.
  runtime::ExpertWeights HostWeights(int layer, int expert) const;

  ExpertLayout layout_;
  CudaExpertSourceOptions options_;
  HostComputeStats host_stats_;
  std::vector<float> host_gate_, host_up_;  // ComputeOnHost scratch
  std::shared_ptr<const PinnedHostTier> tier_;
  CudaSlotArena* arena_ = nullptr;  // owned by store_
  std::unique_ptr<ExpertStore> store_;
  std::vector<std::vector<int32_t>> upcoming_;  // per layer
  std::vector<SlotRef> pinned_;                 // [layer * E + expert], while acquired
};

}  // namespace ef::cache
