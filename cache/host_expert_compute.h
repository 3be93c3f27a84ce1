// HostExpertCompute: an optional part of the cache source (cache.cpu_compute) that computes some
// of a layer's missed experts on the host CPU from a host copy instead of loading them into the
// slots: on CUDA, misses of few rows from the pinned host tier (cuda/pinned_host_compute.h). The
// source offers it each layer's experts before routing (runtime::ExpertSource::TakeHostExperts);
// what it takes is computed by Compute and never acquired, so the cache holds what it held.
//
// Thread safety: driven by the engine thread.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "cache/expert_store.h"
#include "cache/slot_arena.h"
#include "runtime/core/status.h"
#include "runtime/engine/expert_source.h"

namespace ef::cache {

// Experts computed on the host, and the calibration the choice used.
struct HostComputeStats {
  int64_t experts = 0;  // expert computations on the host
  int64_t rows = 0;
  double ms = 0;                                          // host wall time in them
  double calibrated_host_ms = 0, calibrated_copy_ms = 0;  // one expert, one row
  // Split experts (part copied, part computed on the host; also counted in experts and rows above).
  int64_t split_experts = 0;
  double split_copied = 0;     // sum of their copied fractions
  int64_t staged_bytes = 0;    // bytes of their partial copies
  double host_ms_running = 0;  // the host time per expert at one row the plans use (running mean)
  int64_t admitted = 0;        // misses the admission rule (cache.cpu_compute_admit) loaded in a victim's place
};

class HostExpertCompute {
 public:
  virtual ~HostExpertCompute() = default;
  // Times the host path against a load into `arena` (slot 0: called before the store hands out
  // any slot).
  virtual Status Calibrate(SlotArena& arena) = 0;
  // Moves from `experts` (compute order; rows[i]: experts[i]'s rows this step) into `host` the
  // experts it computes whole or in part; `store` says which are resident (hits are never taken),
  // and an admission rule may evict from it to make room for a miss it leaves to the copy path.
  virtual void Take(int layer, std::vector<int32_t>& experts, std::span<const int64_t> rows, ExpertStore& store,
                    runtime::ExpertSource::HostShare& host) = 0;
  // y[rows, hidden] = the expert over intermediate rows [inter_begin, inter) of x[rows, hidden] (not
  // scaled by the gate), x and y in host memory.
  virtual Status Compute(int layer, int expert, int64_t rows, const float* x, float* y, int64_t inter_begin) = 0;
  // The split expert's first `split` intermediate rows into `arena`'s staging (runtime::ExpertSource
  // StartPart / AcquirePart).
  virtual Status StartPart(SlotArena& arena, int layer, int expert, int64_t split) = 0;
  virtual StatusOr<runtime::ExpertWeights> AcquirePart(SlotArena& arena) = 0;
  virtual const HostComputeStats& stats() const = 0;
  // Zeroes the counters; the calibration and the running host time stay.
  virtual void ResetStats() = 0;
};

}  // namespace ef::cache
