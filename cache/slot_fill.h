// Filling expert slots from the checkpoint: the host copies an expert cache keeps (the CUDA pinned
// tier) are written here, each expert straight from the checkpoint's bytes into its slot, quantized
// on the way when the tiers load low precision, experts spread over threads.
//
// Loading a 32-layer Mixtral-8x7B into the pinned tier is 90 GB of bf16; copied one expert at a
// time through a staging buffer it took minutes. Here no byte is staged, and each thread quantizes
// or copies whole experts (the quantizer itself runs on one thread then).
#pragma once

#include <cstddef>
#include <span>

#include "cache/expert_tiers.h"
#include "cache/slot_layout.h"
#include "runtime/core/progress.h"
#include "runtime/core/status.h"
#include "runtime/engine/model_weights.h"

namespace ef::cache {

// Writes expert (layer, expert) of `model` into dst in `layout`'s form: the checkpoint's bytes, or
// quantized when layout.Shape names a quantized dtype (the tiers' load precision). Bytes between the
// parts are left as they are. The same bytes as tiers->PackFromCheckpoint then layout.Write.
// quant_threads: Quantize's max_threads (0: its own choice). Errors name the expert.
// calibrated (may be null): blocks quantized ahead of time, taken instead of rounding
// (QuantizeExpertPart).
[[nodiscard]] Status WriteExpertSlot(const runtime::ModelWeights& model, const SlotLayout& layout, int layer,
                                     int expert, std::span<std::byte> dst, int quant_threads = 0,
                                     const QuantizedExperts* calibrated = nullptr);

struct SlotFill {
  int layer = 0;
  int expert = 0;
  std::span<std::byte> dst;
};

// WriteExpertSlot for every fill, on up to `threads` threads (0: the process's CPUs, at most 16), each
// taking the next expert when it finishes one. progress (may be null) advances by each dst's size.
// Returns the first error to happen (experts no thread has started are not written).
[[nodiscard]] Status WriteExpertSlots(const runtime::ModelWeights& model, const SlotLayout& layout,
                                      std::span<const SlotFill> fills, Progress* progress, int threads = 0,
                                      const QuantizedExperts* calibrated = nullptr);

}  // namespace ef::cache
