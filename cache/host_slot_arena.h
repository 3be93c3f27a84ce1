// HostSlotArena: the CPU backend's "device tier": one aligned host allocation cut into slots.
#pragma once

#include <cstddef>
#include <memory>

#include "cache/slot_arena.h"

namespace ef::cache {

class HostSlotArena final : public SlotArena {
 public:
  // alignment: a power of two >= alignof(std::max_align_t); each slot starts on it (slot_bytes is
  // rounded up to it internally, slot_bytes() reports the requested size).
  static StatusOr<std::unique_ptr<HostSlotArena>> Create(int num_slots, size_t slot_bytes, size_t alignment = 256);
  ~HostSlotArena() override;

  int num_slots() const override { return num_slots_; }
  size_t slot_bytes() const override { return slot_bytes_; }
  const char* tier() const override { return "host"; }
  void* data(int slot) override { return base_ + static_cast<size_t>(slot) * stride_; }
  std::span<std::byte> host_view(int slot) override {
    return {base_ + static_cast<size_t>(slot) * stride_, slot_bytes_};
  }
  Status CopyIn(int slot, std::span<const std::byte> src) override;

 private:
  HostSlotArena(std::byte* base, int num_slots, size_t slot_bytes, size_t stride)
      : base_(base), num_slots_(num_slots), slot_bytes_(slot_bytes), stride_(stride) {}
  std::byte* base_;
  int num_slots_;
  size_t slot_bytes_;
  size_t stride_;
};

}  // namespace ef::cache
