// SlotArena: the memory behind an ExpertStore's device tier, num_slots() slots of slot_bytes()
// each, allocated once (fixed-size slots never fragment). An interface so the CPU backend (an
// aligned host arena, host_slot_arena.h) and a CUDA device arena (cudaMalloc + H2D copies on a copy
// stream, to come) plug into the same store.
//
// Ownership: the arena owns its memory for its whole life; slot pointers stay valid until it is
// destroyed. Thread safety: distinct slots may be written concurrently; the store never writes a
// slot that is pinned by a reader.
#pragma once

#include <cstddef>
#include <span>

#include "runtime/core/status.h"

namespace ef::cache {

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
  // expert) into the slot itself, with no staging by the store. It may return before the bytes
  // have landed when it orders every reader after the copy itself (the CUDA arena: copy streams and
  // per-slot events). Unimplemented (the default): the store fills the slot through its source.
  virtual Status Load(int slot, int layer, int expert) { return Unimplemented("arena has no host tier of its own"); }
};

}  // namespace ef::cache
