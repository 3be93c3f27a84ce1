#include "cache/slot_layout.h"

#include <cstring>
#include <string>
#include <utility>

#include "cache/expert_tiers.h"
#include "runtime/core/check.h"

namespace ef::cache {

SlotLayout::SlotLayout(size_t alignment, ShapeFn shape) : alignment_(alignment), shape_(std::move(shape)) {
  EF_CHECK(alignment_ > 0 && (alignment_ & (alignment_ - 1)) == 0);
}

SlotLayout SlotLayout::OfModel(size_t alignment, const runtime::ModelWeights& model, const ExpertTiers* tiers) {
  if (tiers) {
    return SlotLayout(alignment,
                      [tiers](int l, int e) -> runtime::ExpertWeights { return tiers->ResidentLayout(l, e); });
  }
  const runtime::ModelWeights* m = &model;
  return SlotLayout(alignment, [m](int l, int e) { return m->host_expert(l, e); });
}

std::vector<size_t> SlotLayout::Offsets(const runtime::ExpertWeights& shape) const {
  std::vector<size_t> off;
  size_t at = 0;
  for (const runtime::Weight* p : shape.parts()) {
    off.push_back(at);
    at = Align(at + p->nbytes());
  }
  return off;
}

size_t SlotLayout::Bytes(const runtime::ExpertWeights& shape) const {
  const std::vector<const runtime::Weight*> parts = shape.parts();
  return Offsets(shape).back() + parts.back()->nbytes();
}

runtime::ExpertWeights SlotLayout::At(const runtime::ExpertWeights& shape, const void* base) const {
  runtime::ExpertWeights w = shape;
  const std::vector<size_t> off = Offsets(shape);
  const std::vector<runtime::Weight*> parts = w.parts();
  for (size_t i = 0; i < parts.size(); ++i) parts[i]->data = static_cast<const std::byte*>(base) + off[i];
  return w;
}

Status SlotLayout::Write(const runtime::ExpertWeights& expert, std::span<std::byte> dst) const {
  if (dst.size() < Bytes(expert))
    return InvalidArgument("expert slot layout: " + std::to_string(dst.size()) + " bytes for an expert that spans " +
                           std::to_string(Bytes(expert)));
  const std::vector<size_t> off = Offsets(expert);
  const std::vector<const runtime::Weight*> parts = expert.parts();
  for (size_t i = 0; i < parts.size(); ++i) std::memcpy(dst.data() + off[i], parts[i]->data, parts[i]->nbytes());
  return Status::Ok();
}

}  // namespace ef::cache
