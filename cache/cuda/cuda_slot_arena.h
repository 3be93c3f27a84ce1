// CudaSlotArena: expert cache slots in GPU memory, filled from a PinnedHostTier by asynchronous
// copies on dedicated copy streams, so expert loads overlap compute.
//
// Streams and events (the invariants that make reuse safe without host syncs):
//   - two copy streams: `correction` (highest stream priority) for loads the router needs now,
//     `prefetch` (lowest) for forecast loads. A correction never queues behind prefetches in a
//     stream FIFO; prefetch copies are split into chunks (copy_chunk_bytes) so the copy engines can
//     interleave a correction between them.
//   - per slot, `ready`: recorded on the copy stream after the slot's latest load. A reader makes
//     the compute stream wait on it (WaitReady: cudaStreamWaitEvent, no host sync), so a layer
//     waits only for the slots it reads, never for other layers' prefetches.
//   - per slot, `released`: recorded on the compute stream after the last kernel that read the
//     slot was enqueued (MarkReleased). A load into the slot first makes its copy stream wait on
//     `released` (write after read) and on `ready` (write after write: an earlier load on the
//     other stream).
//   - stall: when WaitReady finds the slot's load still in flight it brackets the wait with two
//     timing events on the compute stream; their elapsed time is the time the compute stream sat
//     blocked on copies (HarvestStall, after a sync).
//
// Memory: one allocation of num_slots x stride through the CUDA backend's allocator, so the slots
// count against its memory budget.
//
// Priority: Load() has no priority argument (SlotArena interface); the owner sets the class of the
// next loads with set_urgent() before calling into the ExpertStore (the store is used in sync mode,
// on the engine thread). Thread safety: not thread-safe; one engine thread drives it.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <utility>
#include <vector>

#include "cache/cuda/pinned_host_tier.h"
#include "cache/slot_arena.h"
#include "runtime/backend/cuda/cuda_backend.h"

namespace ef::cache {

struct CudaCopyStats {
  int64_t urgent_loads = 0;    // loads on the correction stream
  int64_t prefetch_loads = 0;  // loads on the prefetch stream
  int64_t bytes_h2d = 0;       // bytes copied host -> device
  int64_t stalled_waits = 0;   // WaitReady calls that found the load in flight
  double stall_ms = 0;         // compute-stream time blocked on copies (harvested)
};

class CudaSlotArena final : public SlotArena {
 public:
  // `tier` (not owned) must outlive the arena; its bytes_per_expert must fit in slot_bytes.
  static StatusOr<std::unique_ptr<CudaSlotArena>> Create(runtime::CudaBackend* backend, const PinnedHostTier* tier,
                                                         int num_slots, size_t slot_bytes,
                                                         size_t copy_chunk_bytes = size_t{64} << 20);
  ~CudaSlotArena() override;  // waits for its copy streams, then frees events and streams

  int num_slots() const override { return num_slots_; }
  size_t slot_bytes() const override { return slot_bytes_; }
  const char* tier() const override { return tier_name_.c_str(); }
  void* data(int slot) override { return static_cast<std::byte*>(buffer_.data()) + stride_ * slot; }
  std::span<std::byte> host_view(int slot) override { return {}; }
  // Synchronous generic path (src may be pageable and is free on return).
  Status CopyIn(int slot, std::span<const std::byte> src) override;
  // Enqueues the copy of (layer, expert) from the pinned tier; returns at once.
  Status Load(int slot, int layer, int expert) override;

  void set_urgent(bool urgent) { urgent_ = urgent; }
  // Makes the compute stream wait for the slot's latest load (GPU side).
  void WaitReady(int slot);
  // The kernels reading the slot are enqueued: later loads into it wait for them.
  void MarkReleased(int slot);
  // Sums the stall intervals whose events completed (call after a sync of the compute stream).
  void HarvestStall();
  const CudaCopyStats& copy_stats() const { return stats_; }
  // Blocks until both copy streams are idle.
  void SynchronizeCopies();

 private:
  CudaSlotArena() = default;
  Status Check(cudaError_t e, const char* what);

  runtime::CudaBackend* backend_ = nullptr;
  const PinnedHostTier* tier_ = nullptr;
  std::string tier_name_;
  runtime::Buffer buffer_;
  int num_slots_ = 0;
  size_t slot_bytes_ = 0;
  size_t stride_ = 0;
  size_t chunk_ = 0;
  bool urgent_ = true;
  cudaStream_t compute_ = nullptr;     // the backend's
  cudaStream_t correction_ = nullptr;  // owned
  cudaStream_t prefetch_ = nullptr;    // owned
  std::vector<cudaEvent_t> ready_, released_;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> stall_pending_, stall_pool_;
  CudaCopyStats stats_;
};

}  // namespace ef::cache
