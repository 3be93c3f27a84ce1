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
  static StatusOr<std::unique_ptr<BackendSlotArena>> Create(runtime::Backend* backend, int num_slots,
                                                            size_t slot_bytes);

  int num_slots() const override { return num_slots_; }
  size_t slot_bytes() const override { return slot_bytes_; }
  const char* tier() const override { return host_addressable_ ? "host" : "device"; }
  void* data(int slot) override { return static_cast<std::byte*>(buffer_.data()) + stride_ * slot; }
  std::span<std::byte> host_view(int slot) override;
  Status CopyIn(int slot, std::span<const std::byte> src) override;

 private:
  runtime::Backend* backend_ = nullptr;
  runtime::Buffer buffer_;
  int num_slots_ = 0;
  size_t slot_bytes_ = 0;
  size_t stride_ = 0;
  bool host_addressable_ = false;
};

}  // namespace ef::cache
