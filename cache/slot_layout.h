// SlotLayout: where the parts of an expert (gate, up, down, then the biases of a biased family, in
// ExpertWeights::parts() order) sit inside a cache slot, for every arena. Each part starts at an
// offset rounded up to alignment(): 1 on the CPU backend (back to back: the packed bytes the
// expert tiers write, so a load fills the slot in place), kDeviceSlotAlignment on CUDA (every part
// on a 256-byte boundary, where the device GEMMs' vector loads want their operands).
//
// What a slot of (layer, expert) holds comes from the shape callback: the checkpoint's shapes and
// dtypes, or the expert tiers' resident layout (quantized under cache.miss_precision, and under
// auto whichever precision the last load wrote). Shapes carry no data; At() views a slot.
//
// Thread safety: immutable; the shape callback must be safe to call from the thread that fills
// slots (the store's worker in async mode).
#pragma once

#include <cstddef>
#include <functional>
#include <span>
#include <vector>

#include "runtime/engine/model_weights.h"

namespace ef::cache {

class ExpertTiers;

// Part alignment of the CUDA cache's slots (and of its pinned host copies, which it copies whole).
inline constexpr size_t kDeviceSlotAlignment = 256;

class SlotLayout {
 public:
  using ShapeFn = std::function<runtime::ExpertWeights(int layer, int expert)>;

  // alignment: a power of two.
  SlotLayout(size_t alignment, ShapeFn shape);
  // The slots of `model`'s experts: the tiers' resident layout when `tiers` is set (not owned; must
  // outlive the layout), else the checkpoint's.
  static SlotLayout OfModel(size_t alignment, const runtime::ModelWeights& model, const ExpertTiers* tiers);

  size_t alignment() const { return alignment_; }
  runtime::ExpertWeights Shape(int layer, int expert) const { return shape_(layer, expert); }
  // Bytes from the slot's start to the end of the last part of `shape`.
  size_t Bytes(const runtime::ExpertWeights& shape) const;
  size_t Bytes(int layer, int expert) const { return Bytes(Shape(layer, expert)); }
  // Offset of each of shape.parts() inside the slot.
  std::vector<size_t> Offsets(const runtime::ExpertWeights& shape) const;
  // `shape` viewed in a slot at `base` (a device pointer on a device arena).
  runtime::ExpertWeights At(const runtime::ExpertWeights& shape, const void* base) const;
  runtime::ExpertWeights At(int layer, int expert, const void* base) const { return At(Shape(layer, expert), base); }
  // Copies the parts of `expert` (host memory, any layout) to their offsets in dst; InvalidArgument
  // when dst is shorter than Bytes(expert).
  Status Write(const runtime::ExpertWeights& expert, std::span<std::byte> dst) const;

 private:
  size_t Align(size_t n) const { return (n + alignment_ - 1) & ~(alignment_ - 1); }

  size_t alignment_;
  ShapeFn shape_;
};

}  // namespace ef::cache
