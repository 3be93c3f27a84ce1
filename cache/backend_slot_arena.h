// BackendSlotArena: expert cache slots in a compute backend's memory (host memory for the CPU
// backend, device memory for CUDA), allocated once through the backend so they count against its
// memory accounting. Slot contents are written with Backend::CopyToDevice.
#pragma once

#include <memory>
#include <vector>

#include "cache/slot_arena.h"
#include "runtime/backend/backend.h"

namespace ef::cache {

class BackendSlotArena final : public SlotArena {
 public:
  // ResourceExhausted (naming the bytes asked for) when the backend cannot hold num_slots slots.
  // slot_sizes: empty (every slot slot_bytes) or one size per slot, each at most slot_bytes.
  static StatusOr<std::unique_ptr<BackendSlotArena>> Create(runtime::Backend* backend, int num_slots, size_t slot_bytes,
                                                            std::span<const size_t> slot_sizes = {});

  int num_slots() const override { return spans_.num_slots(); }
  size_t slot_bytes() const override { return spans_.largest(); }
  size_t slot_size(int slot) const override { return spans_.size(slot); }
  const char* tier() const override { return host_addressable_ ? "host" : "device"; }
  void* data(int slot) override { return static_cast<std::byte*>(buffer_.data()) + spans_.offset(slot); }
  std::span<std::byte> host_view(int slot) override;
  Status CopyIn(int slot, std::span<const std::byte> src) override;

 private:
  runtime::Backend* backend_ = nullptr;
  runtime::Buffer buffer_;
  SlotSpans spans_;
  bool host_addressable_ = false;
};

}  // namespace ef::cache
