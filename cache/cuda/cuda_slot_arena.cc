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
                                                               const PinnedHostTier* tier, int num_slots,
                                                               size_t slot_bytes, size_t copy_chunk_bytes) {
  if (!backend) return InvalidArgument("cuda slot arena: no CUDA backend");
  if (num_slots < 1 || slot_bytes == 0) return InvalidArgument("cuda slot arena needs at least one non-empty slot");
  if (tier && tier->bytes_per_expert() > slot_bytes)
    return InvalidArgument("cuda slot arena: host tier experts (" + std::to_string(tier->bytes_per_expert()) +
                           " bytes) are larger than a slot (" + std::to_string(slot_bytes) + ")");
  auto a = std::unique_ptr<CudaSlotArena>(new CudaSlotArena());
  a->backend_ = backend;
  a->tier_ = tier;
  a->num_slots_ = num_slots;
  a->slot_bytes_ = slot_bytes;
  a->stride_ = (slot_bytes + 255) / 256 * 256;
  a->chunk_ = std::max<size_t>(copy_chunk_bytes, 1 << 20);
  a->tier_name_ = "cuda:" + std::to_string(backend->device());
  a->compute_ = backend->stream();
  auto buf = backend->Allocate(a->stride_ * num_slots);
  if (!buf.ok())
    return ResourceExhausted("expert cache: " + std::to_string(num_slots) + " slots of " + std::to_string(slot_bytes) +
                             " bytes do not fit on " + backend->name() + ": " + buf.status().message());
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
  a->released_.assign(num_slots, nullptr);
  for (int s = 0; s < num_slots; ++s) {
    EF_RETURN_IF_ERROR(a->Check(cudaEventCreateWithFlags(&a->ready_[s], cudaEventDisableTiming), "event"));
    EF_RETURN_IF_ERROR(a->Check(cudaEventCreateWithFlags(&a->released_[s], cudaEventDisableTiming), "event"));
  }
  EF_LOG(INFO, CACHE, "cuda slot arena: %d slots of %zu bytes on %s, copy chunks of %zu bytes", num_slots, slot_bytes,
         backend->name().c_str(), a->chunk_);
  return a;
}

CudaSlotArena::~CudaSlotArena() {
  if (correction_) cudaStreamSynchronize(correction_);
  if (prefetch_) cudaStreamSynchronize(prefetch_);
  for (auto& p : stall_pending_) stall_pool_.push_back(p);
  for (auto& [a, b] : stall_pool_) {
    cudaEventDestroy(b);
    cudaEventDestroy(a);
  }
  for (int s = num_slots_ - 1; s >= 0; --s) {
    if (s < static_cast<int>(released_.size()) && released_[s]) cudaEventDestroy(released_[s]);
    if (s < static_cast<int>(ready_.size()) && ready_[s]) cudaEventDestroy(ready_[s]);
  }
  if (prefetch_) cudaStreamDestroy(prefetch_);
  if (correction_) cudaStreamDestroy(correction_);
  // buffer_ frees through the backend (stream-ordered on the compute stream).
}

Status CudaSlotArena::CopyIn(int slot, std::span<const std::byte> src) {
  if (src.size() > slot_bytes_) return InvalidArgument("expert larger than a cache slot");
  cudaStream_t s = correction_;
  EF_RETURN_IF_ERROR(Check(cudaStreamWaitEvent(s, released_[slot], 0), "wait released"));
  EF_RETURN_IF_ERROR(Check(cudaStreamWaitEvent(s, ready_[slot], 0), "wait ready"));
  EF_RETURN_IF_ERROR(Check(cudaMemcpyAsync(data(slot), src.data(), src.size(), cudaMemcpyHostToDevice, s), "copy"));
  EF_RETURN_IF_ERROR(Check(cudaEventRecord(ready_[slot], s), "record ready"));
  stats_.bytes_h2d += static_cast<int64_t>(src.size());
  ++stats_.urgent_loads;
  // src may be pageable memory that the caller frees on return.
  return Check(cudaStreamSynchronize(s), "copy in");
}

Status CudaSlotArena::Load(int slot, int layer, int expert) {
  if (!tier_) return Unimplemented("cuda slot arena without a host tier");
  const std::byte* src = tier_->data(layer, expert);
  if (!src)
    return FailedPrecondition("no host copy of expert " + std::to_string(expert) + " of layer " +
                              std::to_string(layer));
  const size_t bytes = tier_->bytes_per_expert();
  cudaStream_t s = urgent_ ? correction_ : prefetch_;
  EF_RETURN_IF_ERROR(Check(cudaStreamWaitEvent(s, released_[slot], 0), "wait released"));
  EF_RETURN_IF_ERROR(Check(cudaStreamWaitEvent(s, ready_[slot], 0), "wait ready"));
  auto* dst = static_cast<std::byte*>(data(slot));
  // Corrections go in one piece; prefetches in chunks, so a correction can slip in between.
  const size_t chunk = urgent_ ? bytes : chunk_;
  for (size_t off = 0; off < bytes; off += chunk)
    EF_RETURN_IF_ERROR(
        Check(cudaMemcpyAsync(dst + off, src + off, std::min(chunk, bytes - off), cudaMemcpyHostToDevice, s), "copy"));
  EF_RETURN_IF_ERROR(Check(cudaEventRecord(ready_[slot], s), "record ready"));
  stats_.bytes_h2d += static_cast<int64_t>(bytes);
  ++(urgent_ ? stats_.urgent_loads : stats_.prefetch_loads);
  return Status::Ok();
}

void CudaSlotArena::WaitReady(int slot) {
  if (cudaEventQuery(ready_[slot]) != cudaErrorNotReady) {
    cudaGetLastError();
    return;  // the load is done (or the slot was never loaded through the copy streams)
  }
  std::pair<cudaEvent_t, cudaEvent_t> ev{nullptr, nullptr};
  if (!stall_pool_.empty()) {
    ev = stall_pool_.back();
    stall_pool_.pop_back();
  } else if (cudaEventCreate(&ev.first) != cudaSuccess || cudaEventCreate(&ev.second) != cudaSuccess) {
    cudaStreamWaitEvent(compute_, ready_[slot], 0);  // still correct, just not timed
    return;
  }
  ++stats_.stalled_waits;
  cudaEventRecord(ev.first, compute_);
  cudaStreamWaitEvent(compute_, ready_[slot], 0);
  cudaEventRecord(ev.second, compute_);
  stall_pending_.push_back(ev);
}

void CudaSlotArena::MarkReleased(int slot) { cudaEventRecord(released_[slot], compute_); }

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

void CudaSlotArena::SynchronizeCopies() {
  cudaStreamSynchronize(correction_);
  cudaStreamSynchronize(prefetch_);
}

}  // namespace ef::cache
