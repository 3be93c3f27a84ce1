#include "cache/backend_slot_arena.h"

namespace ef::cache {

StatusOr<std::unique_ptr<BackendSlotArena>> BackendSlotArena::Create(runtime::Backend* backend, int num_slots,
                                                                     size_t slot_bytes) {
  if (num_slots < 1 || slot_bytes == 0) return InvalidArgument("expert arena needs at least one non-empty slot");
  auto a = std::unique_ptr<BackendSlotArena>(new BackendSlotArena());
  a->backend_ = backend;
  a->num_slots_ = num_slots;
  a->slot_bytes_ = slot_bytes;
  a->stride_ = (slot_bytes + 255) / 256 * 256;
  a->host_addressable_ = backend->kind() == runtime::BackendKind::kCpu;
  auto buf = backend->Allocate(a->stride_ * num_slots);
  if (!buf.ok()) {
    return ResourceExhausted("expert cache: " + std::to_string(num_slots) + " slots of " + std::to_string(slot_bytes) +
                             " bytes do not fit on " + backend->name() + ": " + buf.status().message());
  }
  a->buffer_ = std::move(buf).value();
  return a;
}

std::span<std::byte> BackendSlotArena::host_view(int slot) {
  if (!host_addressable_) return {};
  return {static_cast<std::byte*>(data(slot)), slot_bytes_};
}

Status BackendSlotArena::CopyIn(int slot, std::span<const std::byte> src) {
  if (src.size() > slot_bytes_) return InvalidArgument("expert larger than a cache slot");
  backend_->CopyToDevice(data(slot), src.data(), src.size());
  return Status::Ok();
}

}  // namespace ef::cache
