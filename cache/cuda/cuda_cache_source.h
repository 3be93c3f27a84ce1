// The expert cache's source on a CUDA device: a CachedExpertSource whose slots live in a
// CudaSlotArena (device memory, asynchronous copies on copy streams, per-slot events) filled from a
// PinnedHostTier (every routed expert, up to a host budget, in pinned host memory), its parts at
// 256-byte-aligned offsets (SlotLayout, kDeviceSlotAlignment) in the dtype the tiers load (the
// checkpoint's, or int8 / int4), optionally with cache.cpu_compute (PinnedHostCompute). Experts past
// the pinned host budget (or, under expert parallelism, homed on other ranks) load through the
// expert tiers' peer and checkpoint tiers, staged and copied synchronously.
//
// A miss acquired at routing enqueues its copy on the high-priority correction stream at once; the
// compute stream waits for a slot's copy only when the expert computes (GPU-side wait); prefetches
// go on the low-priority prefetch stream (cached_expert_source.h has the per-layer steps).
#pragma once

#include <memory>
#include <string>

#include "cache/cached_expert_source.h"
#include "cache/cuda/cuda_slot_arena.h"
#include "cache/cuda/pinned_host_tier.h"

namespace ef::cache {

struct CudaCacheOptions {
  // Copy pieces and how many may sit on the copy engine (cuda_slot_arena.h explains why few).
  size_t copy_chunk_bytes = CudaSlotArenaOptions{}.copy_chunk_bytes;
  int max_queued_chunks = CudaSlotArenaOptions{}.max_queued_chunks;
  // Pinned host memory for experts (from a model); 0: every expert. Experts past it are copied from
  // the checkpoint mapping when loaded (staged, synchronous).
  size_t host_budget_bytes = 0;
  // cache.cpu_compute: "off", "auto", "whole", "on" or "split" (pinned_host_compute.h); misses of at most
  // cpu_compute_max_rows rows are candidates; cpu_compute_admit: the admission margin
  // (host_share_plan.h; 0 off).
  std::string cpu_compute = "off";
  int cpu_compute_max_rows = 4;
  int cpu_compute_admit = 3;
};

// From a loaded model: copies every routed expert (up to cuda.host_budget_bytes; under expert
// parallelism those options.tiers keeps a host copy of) into pinned host memory, in the tiers' load
// precision. `backend` must be the CUDA backend the engine uses. Refuses what the device slots do
// not hold: experts with biases, experts of different shapes, cache.miss_precision auto.
StatusOr<std::unique_ptr<CachedExpertSource>> CreateCudaCacheSource(const runtime::ModelWeights& model,
                                                                    runtime::Backend* backend,
                                                                    const CachedExpertSourceOptions& options,
                                                                    const CudaCacheOptions& cuda);
// Synthetic models: every routed expert of `config`'s MoE layers has `shape` (data unused), and the
// caller wrote each into `tier` in the device slot layout (CudaSlotLayout(shape)).
StatusOr<std::unique_ptr<CachedExpertSource>> CreateCudaCacheSource(
    const runtime::ModelConfig& config, const runtime::ExpertWeights& shape, std::shared_ptr<const PinnedHostTier> tier,
    runtime::Backend* backend, const CachedExpertSourceOptions& options, const CudaCacheOptions& cuda);

// The device slot layout of experts that all have `shape`.
SlotLayout CudaSlotLayout(const runtime::ExpertWeights& shape);
// The arena of a source CreateCudaCacheSource built (copy counters, stall harvest, copy errors).
CudaSlotArena& CudaArenaOf(CachedExpertSource& source);

}  // namespace ef::cache
