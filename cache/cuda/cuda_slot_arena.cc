#include "cache/cuda/cuda_slot_arena.h"

#include <algorithm>
#include <string>

#include "runtime/core/logging.h"

namespace ef::cache {

Status CudaSlotArena::Check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  return Internal(std::string("cuda slot arena: ") + what + ": " + cudaGetErrorString(e));
}

StatusOr<std::unique_ptr<CudaSlotArena>> CudaSlotArena::Create(runtime::CudaBackend* backend,
                                                               std::shared_ptr<const PinnedHostTier> tier,
                                                               int num_slots, size_t slot_bytes,
                                                               const CudaSlotArenaOptions& options,
                                                               std::span<const size_t> slot_sizes) {
  if (!backend) return InvalidArgument("cuda slot arena: no CUDA backend");
  if (options.max_queued_chunks < 0) return InvalidArgument("cuda slot arena: max_queued_chunks must be >= 0");
  if (tier && tier->bytes_per_expert() > slot_bytes)
    return InvalidArgument("cuda slot arena: host tier experts (" + std::to_string(tier->bytes_per_expert()) +
                           " bytes) are larger than a slot (" + std::to_string(slot_bytes) + ")");
  auto a = std::unique_ptr<CudaSlotArena>(new CudaSlotArena());
  EF_ASSIGN_OR_RETURN(a->spans_, SlotSpans::Make(num_slots, slot_bytes, slot_sizes));
  a->backend_ = backend;
  a->tier_ = std::move(tier);
  a->options_ = options;
  a->chunk_ = std::max<size_t>(options.copy_chunk_bytes, 64 << 10);
  a->tier_name_ = "cuda:" + std::to_string(backend->device());
  a->compute_ = backend->stream();
  auto buf = backend->Allocate(a->spans_.total());
  if (!buf.ok())
    return ResourceExhausted("expert cache: " + std::to_string(num_slots) + " slots (" +
                             std::to_string(a->spans_.total()) + " bytes) do not fit on " + backend->name() + ": " +
                             buf.status().message());
  a->buffer_ = std::move(buf).value();
  // The allocation (and its zero fill) is ordered on the compute stream; copies on the other
  // streams must not start before it.
  backend->Synchronize();
  int least = 0, greatest = 0;
  EF_RETURN_IF_ERROR(a->Check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "stream priority range"));
  EF_RETURN_IF_ERROR(
      a->Check(cudaStreamCreateWithPriority(&a->correction_, cudaStreamNonBlocking, greatest), "correction stream"));
  EF_RETURN_IF_ERROR(
      a->Check(cudaStreamCreateWithPriority(&a->prefetch_, cudaStreamNonBlocking, least), "prefetch stream"));
  a->ready_.assign(num_slots, nullptr);
  for (int s = 0; s < num_slots; ++s)
    EF_RETURN_IF_ERROR(a->Check(cudaEventCreateWithFlags(&a->ready_[s], cudaEventDisableTiming), "event"));
  a->pending_.assign(num_slots, nullptr);
  if (options.max_queued_chunks > 0) a->copier_ = std::thread([p = a.get()] { p->CopyLoop(); });
  EF_LOG(INFO, CACHE,
         "cuda slot arena: %d slots of up to %zu bytes (%zu in all) on %s, copies in pieces of %zu bytes, %s",
         num_slots, slot_bytes, a->spans_.total(), backend->name().c_str(), a->chunk_,
         options.max_queued_chunks > 0
             ? ("at most " + std::to_string(options.max_queued_chunks) + " queued on the copy engine").c_str()
             : "each load queued whole");
  return a;
}

CudaSlotArena::~CudaSlotArena() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    for (auto& q : queue_) {
      for (auto& job : q) event_pool_.push_back(job->gate);
      q.clear();
    }
    for (auto& p : pending_) p.reset();
  }
  cv_.notify_all();
  if (copier_.joinable()) copier_.join();
  if (correction_) cudaStreamSynchronize(correction_);
  if (prefetch_) cudaStreamSynchronize(prefetch_);
  for (auto& p : stall_pending_) stall_pool_.push_back(p);
  for (auto& [a, b] : stall_pool_) {
    cudaEventDestroy(b);
    cudaEventDestroy(a);
  }
  for (auto it = event_pool_.rbegin(); it != event_pool_.rend(); ++it) cudaEventDestroy(*it);
  for (auto it = ready_.rbegin(); it != ready_.rend(); ++it)
    if (*it) cudaEventDestroy(*it);
  if (staged_) cudaEventDestroy(staged_);
  if (prefetch_) cudaStreamDestroy(prefetch_);
  if (correction_) cudaStreamDestroy(correction_);
  // buffer_ frees through the backend (stream-ordered on the compute stream).
}

cudaEvent_t CudaSlotArena::TakeEvent(bool timing) {
  cudaEvent_t e = nullptr;
  if (!timing && !event_pool_.empty()) {
    e = event_pool_.back();
    event_pool_.pop_back();
    return e;
  }
  // Untimed events mark copy pieces, which the copy thread (max_queued_chunks > 0) waits for:
  // blocking, since a polling wait would take a CPU from the experts the host computes meanwhile.
  const unsigned flags = timing ? cudaEventDefault : cudaEventDisableTiming | cudaEventBlockingSync;
  if (cudaEventCreateWithFlags(&e, flags) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return e;
}

Status CudaSlotArena::status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

StatusOr<size_t> CudaSlotArena::IssuePiece(Job& job, size_t max_bytes) {
  cudaStream_t s = job.urgent ? correction_ : prefetch_;
  if (job.issued == 0) {
    EF_RETURN_IF_ERROR(Check(cudaStreamWaitEvent(s, job.gate, 0), "wait gate"));
    EF_RETURN_IF_ERROR(Check(cudaStreamWaitEvent(s, ready_[job.slot], 0), "wait ready"));
  }
  const size_t n = std::min(max_bytes, job.bytes - job.issued);
  auto* dst = static_cast<std::byte*>(data(job.slot)) + job.issued;
  EF_RETURN_IF_ERROR(Check(cudaMemcpyAsync(dst, job.src + job.issued, n, cudaMemcpyHostToDevice, s), "copy"));
  // After every piece, so a later load into the slot also waits for pieces of a load it replaced.
  EF_RETURN_IF_ERROR(Check(cudaEventRecord(ready_[job.slot], s), "record ready"));
  job.issued += n;
  return n;
}

Status CudaSlotArena::Enqueue(int slot, const std::byte* src, size_t bytes, bool urgent) {
  if (bytes > spans_.size(slot))
    return InvalidArgument("expert of " + std::to_string(bytes) + " bytes larger than cache slot " +
                           std::to_string(slot) + " (" + std::to_string(spans_.size(slot)) + " bytes)");
  cudaEvent_t gate;
  {
    std::lock_guard<std::mutex> lock(mu_);
    EF_RETURN_IF_ERROR(error_);
    gate = TakeEvent(false);
  }
  if (!gate) return Internal("cuda slot arena: cannot create an event");
  // Everything enqueued on the compute stream so far, including the last reader of the slot's
  // previous expert (the store reuses a slot only after its Release).
  EF_RETURN_IF_ERROR(Check(cudaEventRecord(gate, compute_), "record gate"));
  stats_.bytes_h2d += static_cast<int64_t>(bytes);
  ++(urgent ? stats_.urgent_loads : stats_.prefetch_loads);
  if (options_.max_queued_chunks == 0) {
    // Direct: the whole load now; corrections in one piece, prefetches in pieces.
    Job job;
    job.slot = slot;
    job.src = src;
    job.bytes = bytes;
    job.urgent = urgent;
    job.gate = gate;
    Status st;
    while (st.ok() && job.issued < job.bytes) st = IssuePiece(job, urgent ? bytes : chunk_).status();
    std::lock_guard<std::mutex> lock(mu_);
    event_pool_.push_back(gate);  // its state was captured by the wait
    return st;
  }
  auto job = std::make_shared<Job>();
  job->slot = slot;
  job->src = src;
  job->bytes = bytes;
  job->urgent = urgent;
  job->gate = gate;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (std::shared_ptr<Job>& old = pending_[slot]) {
      // The slot's previous load was evicted before it was fully enqueued: drop its remaining
      // pieces (the new load waits on the slot's ready event, which covers the ones enqueued).
      old->cancelled = true;
      auto& q = queue_[old->urgent ? 0 : 1];
      q.erase(std::remove(q.begin(), q.end(), old), q.end());
      event_pool_.push_back(old->gate);
    }
    pending_[slot] = job;
    queue_[urgent ? 0 : 1].push_back(std::move(job));
  }
  cv_.notify_all();
  return Status::Ok();
}

void CudaSlotArena::CopyLoop() {
  cudaSetDevice(backend_->device());  // the current device is per host thread
  const size_t max_inflight = static_cast<size_t>(options_.max_queued_chunks);
  std::deque<cudaEvent_t> inflight;  // markers of enqueued, maybe unfinished pieces
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return stop_ || !queue_[0].empty() || !queue_[1].empty(); });
    if (stop_) break;
    // Keep at most max_inflight pieces on the copy engine: wait (copy thread only) for the oldest.
    while (inflight.size() >= max_inflight) {
      lock.unlock();
      const cudaError_t e = cudaEventSynchronize(inflight.front());
      lock.lock();
      if (e != cudaSuccess && error_.ok()) error_ = Check(e, "copy piece");
      event_pool_.push_back(inflight.front());
      inflight.pop_front();
    }
    if (stop_) break;
    // Corrections first; a partly enqueued prefetch resumes after them.
    auto& q = !queue_[0].empty() ? queue_[0] : queue_[1];
    if (q.empty()) continue;
    std::shared_ptr<Job> job = q.front();
    StatusOr<size_t> n = IssuePiece(*job, chunk_);
    cudaEvent_t marker = TakeEvent(false);
    if (n.ok() && marker) {
      if (cudaEventRecord(marker, job->urgent ? correction_ : prefetch_) == cudaSuccess) {
        inflight.push_back(marker);
      } else {
        cudaGetLastError();
        event_pool_.push_back(marker);
      }
    }
    if (!n.ok() && error_.ok()) error_ = n.status();
    if (!n.ok() || job->issued == job->bytes) {
      q.pop_front();
      if (pending_[job->slot] == job) pending_[job->slot].reset();
      event_pool_.push_back(job->gate);
      cv_.notify_all();
    }
  }
  lock.unlock();
  for (cudaEvent_t e : inflight) cudaEventSynchronize(e);
  lock.lock();
  for (cudaEvent_t e : inflight) event_pool_.push_back(e);
}

Status CudaSlotArena::CopyIn(int slot, std::span<const std::byte> src) {
  EF_RETURN_IF_ERROR(Enqueue(slot, src.data(), src.size(), /*urgent=*/true));
  if (options_.max_queued_chunks > 0) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !pending_[slot] || stop_ || !error_.ok(); });
    EF_RETURN_IF_ERROR(error_);
  }
  // src may be pageable memory that the caller frees on return.
  return Check(cudaEventSynchronize(ready_[slot]), "copy in");
}

Status CudaSlotArena::Load(int slot, int layer, int expert, Priority priority) {
  if (!tier_) return Unimplemented("cuda slot arena without a host tier");
  const std::byte* src = tier_->data(layer, expert);
  if (!src)
    return Unimplemented("no pinned host copy of expert " + std::to_string(expert) + " of layer " +
                         std::to_string(layer));
  return Enqueue(slot, src, tier_->bytes(layer), priority == Priority::kCorrection);
}

Status CudaSlotArena::WaitReady(int slot) {
  bool pending = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // The copy thread failed (its loads of this slot, or of one ahead of it, may be missing).
    if (!error_.ok()) return error_;
    pending = pending_[slot] != nullptr;
  }
  if (!pending && cudaEventQuery(ready_[slot]) != cudaErrorNotReady) {
    cudaGetLastError();
    return Status::Ok();  // the load is done (or the slot was never loaded through the copy streams)
  }
  std::pair<cudaEvent_t, cudaEvent_t> ev{nullptr, nullptr};
  if (!stall_pool_.empty()) {
    ev = stall_pool_.back();
    stall_pool_.pop_back();
  } else {
    ev.first = TakeEvent(true);
    ev.second = TakeEvent(true);
  }
  const bool timed = ev.first && ev.second;
  // Recorded before the host waits for the copy thread, so compute-stream idle time during that
  // wait counts as stall (the compute stream reaches it after the work enqueued before it).
  if (timed) cudaEventRecord(ev.first, compute_);
  Status failed;
  if (pending) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !pending_[slot] || stop_ || !error_.ok(); });
    failed = error_;
  }
  cudaStreamWaitEvent(compute_, ready_[slot], 0);
  if (!timed) {
    if (ev.first) cudaEventDestroy(ev.first);
    if (ev.second) cudaEventDestroy(ev.second);
    return failed;  // still correct, just not timed
  }
  ++stats_.stalled_waits;
  cudaEventRecord(ev.second, compute_);
  stall_pending_.push_back(ev);
  return failed;
}

void CudaSlotArena::HarvestStall() {
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> still;
  for (auto& ev : stall_pending_) {
    if (cudaEventQuery(ev.second) != cudaSuccess) {
      cudaGetLastError();
      still.push_back(ev);
      continue;
    }
    float ms = 0;
    if (cudaEventElapsedTime(&ms, ev.first, ev.second) == cudaSuccess) stats_.stall_ms += ms;
    stall_pool_.push_back(ev);
  }
  stall_pending_.swap(still);
}

Status CudaSlotArena::ReserveStaging(size_t bytes) {
  if (bytes <= staging_.bytes()) return Status::Ok();
  staging_ = runtime::Buffer();
  auto buf = backend_->Allocate(bytes);
  if (!buf.ok())
    return ResourceExhausted("expert cache: " + std::to_string(bytes) +
                             " bytes of staging for split misses do not fit on " + backend_->name() + ": " +
                             buf.status().message());
  staging_ = std::move(buf).value();
  if (!staged_) EF_RETURN_IF_ERROR(Check(cudaEventCreateWithFlags(&staged_, cudaEventDisableTiming), "event"));
  backend_->Synchronize();  // the allocation's zero fill is ordered on the compute stream
  return Status::Ok();
}

Status CudaSlotArena::LoadStaged(std::span<const StagedCopy> copies) {
  if (!staged_) return FailedPrecondition("cuda slot arena: no staging reserved");
  cudaEvent_t gate;
  {
    std::lock_guard<std::mutex> lock(mu_);
    EF_RETURN_IF_ERROR(error_);
    gate = TakeEvent(false);
  }
  if (!gate) return Internal("cuda slot arena: cannot create an event");
  // The previous staged expert's readers are on the compute stream, enqueued before this call.
  Status st = Check(cudaEventRecord(gate, compute_), "record gate");
  if (st.ok()) st = Check(cudaStreamWaitEvent(correction_, gate, 0), "wait gate");
  auto* base = static_cast<std::byte*>(staging_.data());
  for (const StagedCopy& c : copies) {
    if (!st.ok()) break;
    if (c.dst_offset + c.dst_pitch * (c.height - 1) + c.width > staging_.bytes()) {
      st = InvalidArgument("cuda slot arena: staged copy past the staging area");
      break;
    }
    st = Check(c.height == 1 ? cudaMemcpyAsync(base + c.dst_offset, c.src, c.width, cudaMemcpyHostToDevice, correction_)
                             : cudaMemcpy2DAsync(base + c.dst_offset, c.dst_pitch, c.src, c.src_pitch, c.width,
                                                 c.height, cudaMemcpyHostToDevice, correction_),
               "staged copy");
    stats_.bytes_h2d += static_cast<int64_t>(c.width * c.height);
  }
  if (st.ok()) st = Check(cudaEventRecord(staged_, correction_), "record staged");
  std::lock_guard<std::mutex> lock(mu_);
  event_pool_.push_back(gate);
  return st;
}

void CudaSlotArena::WaitStaged() {
  if (staged_) cudaStreamWaitEvent(compute_, staged_, 0);
}

void CudaSlotArena::SynchronizeCopies() {
  if (options_.max_queued_chunks > 0) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return stop_ || !error_.ok() || (queue_[0].empty() && queue_[1].empty()); });
  }
  cudaStreamSynchronize(correction_);
  cudaStreamSynchronize(prefetch_);
}

}  // namespace ef::cache
