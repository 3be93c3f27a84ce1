// SlotArena: the memory behind an ExpertStore's device tier, num_slots() slots of slot_bytes()
// each, allocated once (fixed-size slots never fragment). An interface so the CPU backend (an
// aligned host arena, host_slot_arena.h / backend_slot_arena.h) and the CUDA device arena
// (cuda/cuda_slot_arena.h: cudaMalloc + H2D copies on copy streams) plug into the same store and
// the same cache source (cached_expert_source.h).
//
// Ownership: the arena owns its memory for its whole life; slot pointers stay valid until it is
// destroyed. Thread safety: distinct slots may be written concurrently; the store never writes a
// slot that is pinned by a reader.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "runtime/core/status.h"

namespace ef::cache {

enum class Priority {
  kCorrection = 0,  // the router picked an expert the plan missed: needed now
  kPrefetch = 1,    // forecast says it will be needed soon
};

// Where an arena's slots lie in its one allocation: num_slots slots of slot_bytes each, or slots
// of their own sizes (cache.low_precision_layers: the slots of a layer whose experts load in int8
// are about half as large as those of a layer in the checkpoint's dtype), each starting on a
// 256-byte boundary.
class SlotSpans {
 public:
  // sizes: empty (every slot slot_bytes), or num_slots sizes, each in (0, slot_bytes].
  static StatusOr<SlotSpans> Make(int num_slots, size_t slot_bytes, std::span<const size_t> sizes = {}) {
    if (num_slots < 1 || slot_bytes == 0) return InvalidArgument("expert arena needs at least one non-empty slot");
    if (!sizes.empty() && sizes.size() != static_cast<size_t>(num_slots))
      return InvalidArgument("expert arena: " + std::to_string(sizes.size()) + " slot sizes for " +
                             std::to_string(num_slots) + " slots");
    SlotSpans s;
    s.largest_ = slot_bytes;
    s.offsets_.reserve(static_cast<size_t>(num_slots) + 1);
    size_t at = 0;
    for (int i = 0; i < num_slots; ++i) {
      const size_t n = sizes.empty() ? slot_bytes : sizes[static_cast<size_t>(i)];
      if (n == 0 || n > slot_bytes)
        return InvalidArgument("expert arena: slot " + std::to_string(i) + " of " + std::to_string(n) +
                               " bytes (each slot between 1 and " + std::to_string(slot_bytes) + ")");
      s.offsets_.push_back(at);
      s.sizes_.push_back(n);
      const size_t stride = (n + 255) / 256 * 256;
      if (at > SIZE_MAX - stride) return InvalidArgument("expert arena: slots larger than the address space");
      at += stride;
    }
    s.offsets_.push_back(at);
    return s;
  }
  int num_slots() const { return static_cast<int>(sizes_.size()); }
  size_t offset(int slot) const { return offsets_[static_cast<size_t>(slot)]; }
  size_t size(int slot) const { return sizes_[static_cast<size_t>(slot)]; }
  size_t largest() const { return largest_; }       // the bound on every slot (slot_bytes)
  size_t total() const { return offsets_.back(); }  // bytes of the allocation

 private:
  size_t largest_ = 0;
  std::vector<size_t> offsets_, sizes_;
};

class SlotArena {
 public:
  virtual ~SlotArena() = default;
  virtual int num_slots() const = 0;
  virtual size_t slot_bytes() const = 0;  // the largest slot
  // Bytes of one slot (at most slot_bytes(); smaller in arenas of slots of their own sizes).
  virtual size_t slot_size(int slot) const { return slot_bytes(); }
  // "host" or "cuda:N"; for logs and stats.
  virtual const char* tier() const = 0;
  // The address kernels use for the slot (a device pointer on a device arena).
  virtual void* data(int slot) = 0;
  // A host-writable view of the slot, or an empty span when the arena is not host-addressable;
  // then the store stages the bytes on the host and calls CopyIn.
  virtual std::span<std::byte> host_view(int slot) = 0;
  // Copies src (at most slot_size(slot)) into the slot and returns once the copy is complete.
  virtual Status CopyIn(int slot, std::span<const std::byte> src) = 0;
  // Optional: an arena with its own copy of every expert (a pinned host tier) loads (layer,
  // expert) into the slot itself, with no staging by the store, ahead of loads of a lower
  // priority. It may return before the bytes have landed when it orders every reader after the
  // copy itself (WaitReady). Unimplemented (the default): the store fills the slot through its
  // source.
  virtual Status Load(int slot, int layer, int expert, Priority priority) {
    return Unimplemented("arena has no host tier of its own");
  }

  // The hooks below are no-ops for an arena whose loads are complete when Load/CopyIn return.
  // Orders the computation that reads `slot` next after the slot's latest load (called before
  // each read; the CUDA arena makes the compute stream wait for the copy, with no host wait). An
  // error: a load failed after Load returned (the slot's bytes must not be read).
  virtual Status WaitReady(int slot) { return Status::Ok(); }
  // Blocks until every load started so far is complete (before the slots' owner goes away).
  virtual void SynchronizeCopies() {}
};

}  // namespace ef::cache
