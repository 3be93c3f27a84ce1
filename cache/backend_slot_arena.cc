#include "cache/backend_slot_arena.h"

namespace ef::cache {

StatusOr<std::unique_ptr<BackendSlotArena>> BackendSlotArena::Create(runtime::Backend* backend, int num_slots,
                                                                     size_t slot_bytes,
                                                                     std::span<const size_t> slot_sizes) {
  auto a = std::unique_ptr<BackendSlotArena>(new BackendSlotArena());
  EF_ASSIGN_OR_RETURN(a->spans_, SlotSpans::Make(num_slots, slot_bytes, slot_sizes));
  a->backend_ = backend;
  a->host_addressable_ = backend->kind() == runtime::BackendKind::kCpu;
  auto buf = backend->Allocate(a->spans_.total());
  if (!buf.ok()) {
    return ResourceExhausted("expert cache: " + std::to_string(num_slots) + " slots (" +
                             std::to_string(a->spans_.total()) + " bytes) do not fit on " + backend->name() + ": " +
                             buf.status().message());
  }
  a->buffer_ = std::move(buf).value();
  return a;
}

std::span<std::byte> BackendSlotArena::host_view(int slot) {
  if (!host_addressable_) return {};
  return {static_cast<std::byte*>(data(slot)), spans_.size(slot)};
}

Status BackendSlotArena::CopyIn(int slot, std::span<const std::byte> src) {
  if (src.size() > spans_.size(slot)) return InvalidArgument("expert larger than a cache slot");
  backend_->CopyToDevice(data(slot), src.data(), src.size());
  return Status::Ok();
}

}  // namespace ef::cache
