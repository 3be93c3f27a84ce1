#include "cache/host_slot_arena.h"

#include <cstdlib>
#include <cstring>
#include <string>

namespace ef::cache {

StatusOr<std::unique_ptr<HostSlotArena>> HostSlotArena::Create(int num_slots, size_t slot_bytes, size_t alignment) {
  if (num_slots <= 0 || slot_bytes == 0)
    return InvalidArgument("host slot arena: need at least one slot of at least one byte (got " +
                           std::to_string(num_slots) + " slots of " + std::to_string(slot_bytes) + " bytes)");
  if (alignment < alignof(std::max_align_t) || (alignment & (alignment - 1)) != 0)
    return InvalidArgument("host slot arena: alignment " + std::to_string(alignment) +
                           " is not a power of two >= " + std::to_string(alignof(std::max_align_t)));
  const size_t stride = (slot_bytes + alignment - 1) / alignment * alignment;
  if (stride > SIZE_MAX / static_cast<size_t>(num_slots))
    return ResourceExhausted("host slot arena: " + std::to_string(num_slots) + " slots of " +
                             std::to_string(slot_bytes) + " bytes overflow the address space");
  void* p = std::aligned_alloc(alignment, stride * num_slots);
  if (!p)
    return ResourceExhausted("host slot arena: cannot allocate " + std::to_string(stride * num_slots) + " bytes (" +
                             std::to_string(num_slots) + " slots)");
  return std::unique_ptr<HostSlotArena>(new HostSlotArena(static_cast<std::byte*>(p), num_slots, slot_bytes, stride));
}

HostSlotArena::~HostSlotArena() { std::free(base_); }

Status HostSlotArena::CopyIn(int slot, std::span<const std::byte> src) {
  if (slot < 0 || slot >= num_slots_ || src.size() > slot_bytes_)
    return OutOfRange("host slot arena: copy of " + std::to_string(src.size()) + " bytes into slot " +
                      std::to_string(slot) + " of " + std::to_string(num_slots_) + " x " + std::to_string(slot_bytes_));
  std::memcpy(data(slot), src.data(), src.size());
  return Status::Ok();
}

}  // namespace ef::cache
