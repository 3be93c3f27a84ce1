// CudaSlotArena: expert cache slots in GPU memory, filled from a PinnedHostTier by asynchronous
// copies on dedicated copy streams, so expert loads overlap compute.
//
// Streams and events (the invariants that make reuse safe without host syncs):
//   - two copy streams: `correction` (highest stream priority) for loads the router needs now,
//     `prefetch` (lowest) for forecast loads.
//   - per load, `gate`: recorded on the compute stream when the load is asked for. The copy
//     waits on it first, so it never overwrites a slot that kernels enqueued earlier still read
//     (the store only reuses a slot once its reader released it, i.e. after those kernels were
//     enqueued).
//   - per slot, `ready`: recorded on the copy stream after each piece of the slot's latest load.
//     A reader makes the compute stream wait on it (WaitReady: cudaStreamWaitEvent, no host
//     sync), so a layer waits only for the slots it reads. A load also waits on it (write after
//     write with an earlier load on the other stream).
//
// Stall accounting covers the compute stream's waits at WaitReady only. A host->device copy that
// the compute stream itself enqueues while expert loads are queued is served by the copy engine
// after them (measured on H200, whole loads or pieces alike; kernels, memsets and device-to-device
// copies are not held): the compute stream then blocks at that copy, untimed, and WaitReady finds
// the loads done. ef_offload_bench zeroed its MoE output with such a copy, which is why its oracle
// rows read 0 ms stall while copy-bound; zeroed with SetZero, as the engine does, the same rows
// read the stall. Keep host->device copies off the compute stream between a layer's routing and
// its expert GEMMs.
//
// Copy queue (max_queued_chunks > 0): a copy thread feeds the copy engine copy_chunk_bytes at a
// time, at most max_queued_chunks pieces enqueued and unfinished, and takes correction pieces
// before prefetch pieces, so a correction waits for at most that many prefetch pieces instead of
// every queued prefetch byte. Off by default (0: every load enqueued whole from the calling
// thread): with one layer of prefetch it measured no different (ef_offload_bench --copy-queues).
//
//   - stall: when WaitReady finds the slot's load not complete it brackets the wait with two
//     timing events on the compute stream (the first recorded before the host waits for the copy
//     thread to enqueue the load's last piece); their elapsed time is the time the compute stream
//     sat blocked on expert copies (HarvestStall, after a sync).
//
// Memory: one allocation of every slot (SlotSpans) through the CUDA backend's allocator, so the slots
// count against its memory budget.
//
// Priority: Load()'s (from the ExpertStore: corrections and Acquire misses kCorrection, prefetches
// kPrefetch) picks the stream; the store is used in sync mode, on the engine thread. Thread safety:
// the public methods are called from one engine thread; the copy thread only touches the copy
// streams, the queue (under a mutex) and the events it owns.
#pragma once

#include <cuda_runtime_api.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
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
  int64_t stalled_waits = 0;   // WaitReady calls that found the load not complete
  double stall_ms = 0;         // compute-stream time blocked on copies (harvested)
};

struct CudaSlotArenaOptions {
  // Piece size of a load; with max_queued_chunks = 0 only prefetches are split.
  size_t copy_chunk_bytes = size_t{8} << 20;
  // Pieces enqueued and unfinished at any time (copy thread); 0: every load enqueued whole at once.
  int max_queued_chunks = 0;
};

class CudaSlotArena final : public SlotArena {
 public:
  // `tier` (shared: its copies must outlive the copies queued from them; may be null: Load is then
  // Unimplemented and the store stages every load through CopyIn); its bytes_per_expert must fit
  // in slot_bytes.
  // slot_sizes: empty (every slot slot_bytes) or one size per slot, each at most slot_bytes (a
  // layer's slots sized for its experts, cache.low_precision_layers).
  static StatusOr<std::unique_ptr<CudaSlotArena>> Create(runtime::CudaBackend* backend,
                                                         std::shared_ptr<const PinnedHostTier> tier, int num_slots,
                                                         size_t slot_bytes, const CudaSlotArenaOptions& options = {},
                                                         std::span<const size_t> slot_sizes = {});
  ~CudaSlotArena() override;  // stops the copy thread, waits for its copy streams, frees events

  int num_slots() const override { return spans_.num_slots(); }
  size_t slot_bytes() const override { return spans_.largest(); }
  size_t slot_size(int slot) const override { return spans_.size(slot); }
  const char* tier() const override { return tier_name_.c_str(); }
  void* data(int slot) override { return static_cast<std::byte*>(buffer_.data()) + spans_.offset(slot); }
  std::span<std::byte> host_view(int slot) override { return {}; }
  // Synchronous generic path (src may be pageable and is free on return).
  Status CopyIn(int slot, std::span<const std::byte> src) override;
  // Queues the copy of (layer, expert) from the pinned tier; returns at once. Unimplemented when
  // the tier holds no pinned copy of it (the store then stages it through CopyIn).
  Status Load(int slot, int layer, int expert, Priority priority) override;

  // Makes the compute stream wait for the slot's latest load (GPU side; the host waits only until
  // the copy thread has enqueued the load's last piece). The copy thread's error, once it failed
  // (sticky: every later wait returns it).
  Status WaitReady(int slot) override;
  // Sums the stall intervals whose events completed (call after a sync of the compute stream).
  void HarvestStall();
  const CudaCopyStats& copy_stats() const { return stats_; }
  const CudaSlotArenaOptions& options() const { return options_; }
  // Blocks until every queued load is enqueued and both copy streams are idle.
  void SynchronizeCopies() override;
  // The first error of the copy thread (a failed CUDA call), or OK.
  Status status() const;

  // Staging: device memory beside the slots for partial loads (cache.cpu_compute splits a miss:
  // the GPU computes the first rows of its intermediate dimension from a partial copy, the host
  // the rest). Not a slot and never resident: it holds one partial expert at a time.
  struct StagedCopy {
    size_t dst_offset = 0;           // into the staging area
    const std::byte* src = nullptr;  // pinned host memory
    size_t src_pitch = 0, dst_pitch = 0, width = 0, height = 1;
  };
  // Allocates `bytes` of staging (through the backend, so it counts against its memory budget).
  Status ReserveStaging(size_t bytes);
  size_t staging_bytes() const { return staging_.bytes(); }
  void* staging() const { return staging_.data(); }
  // Enqueues `copies` on the correction stream (behind the loads enqueued there so far; with the
  // copy queue on, ahead of pieces still queued), after the work the compute stream has enqueued
  // so far (the last reader of the staged expert before). Waits for them are not timed as stall.
  Status LoadStaged(std::span<const StagedCopy> copies);
  // Makes the compute stream wait for the last LoadStaged (GPU side).
  void WaitStaged();

 private:
  struct Job {
    int slot = -1;
    const std::byte* src = nullptr;
    size_t bytes = 0;
    size_t issued = 0;  // bytes enqueued so far
    bool urgent = false;
    bool cancelled = false;
    cudaEvent_t gate = nullptr;
  };
  CudaSlotArena() = default;
  Status Check(cudaError_t e, const char* what);
  // Records a load of `bytes` from `src` into `slot`: enqueued now (direct) or queued for the copy
  // thread.
  Status Enqueue(int slot, const std::byte* src, size_t bytes, bool urgent);
  // Enqueues job's next piece (its first: after the gate and the slot's ready event); returns the
  // piece's bytes. Copy thread, or the caller in direct mode.
  StatusOr<size_t> IssuePiece(Job& job, size_t max_bytes);
  void CopyLoop();
  cudaEvent_t TakeEvent(bool timing);  // from the pools (mu_ held for the untimed one)

  runtime::CudaBackend* backend_ = nullptr;
  std::shared_ptr<const PinnedHostTier> tier_;
  CudaSlotArenaOptions options_;
  std::string tier_name_;
  runtime::Buffer buffer_;
  SlotSpans spans_;
  size_t chunk_ = 0;
  cudaStream_t compute_ = nullptr;     // the backend's
  cudaStream_t correction_ = nullptr;  // owned
  cudaStream_t prefetch_ = nullptr;    // owned
  std::vector<cudaEvent_t> ready_;
  runtime::Buffer staging_;
  cudaEvent_t staged_ = nullptr;  // recorded after the last LoadStaged
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> stall_pending_, stall_pool_;
  CudaCopyStats stats_;

  // Copy queue (max_queued_chunks > 0).
  mutable std::mutex mu_;
  std::condition_variable cv_;                 // a job was queued, a job's last piece enqueued, stop
  std::deque<std::shared_ptr<Job>> queue_[2];  // [0] urgent, [1] prefetch: jobs not fully enqueued
  std::vector<std::shared_ptr<Job>> pending_;  // per slot: its job not fully enqueued, or null
  std::vector<cudaEvent_t> event_pool_;        // untimed events (gates, piece markers)
  Status error_;
  bool stop_ = false;
  std::thread copier_;
};

}  // namespace ef::cache
