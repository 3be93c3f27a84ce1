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
#include <span>

#include "runtime/core/status.h"

namespace ef::cache {

enum class Priority {
  kCorrection = 0,  // the router picked an expert the plan missed: needed now
  kPrefetch = 1,    // forecast says it will be needed soon
};

class SlotArena {
 public:
  virtual ~SlotArena() = default;
  virtual int num_slots() const = 0;
  virtual size_t slot_bytes() const = 0;
  // "host" or "cuda:N"; for logs and stats.
  virtual const char* tier() const = 0;
  // The address kernels use for the slot (a device pointer on a device arena).
  virtual void* data(int slot) = 0;
  // A host-writable view of the slot, or an empty span when the arena is not host-addressable;
  // then the store stages the bytes on the host and calls CopyIn.
  virtual std::span<std::byte> host_view(int slot) = 0;
  // Copies src (at most slot_bytes()) into the slot and returns once the copy is complete.
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
  // each read; the CUDA arena makes the compute stream wait for the copy, with no host wait).
  virtual void WaitReady(int slot) {}
  // Blocks until every load started so far is complete (before the slots' owner goes away).
  virtual void SynchronizeCopies() {}
};

}  // namespace ef::cache
