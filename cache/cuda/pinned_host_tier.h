// PinnedHostTier: the host tier of the expert cache on a CUDA device — one page-locked buffer
// per (layer, expert), so host->device copies run asynchronously at full PCIe speed (55 GB/s
// pinned vs 20 GB/s pageable on the H200 machine, ACCELERATOR.md). The pages are cudaHostAlloc's
// or, with EF_PINNED_HUGE_PAGES, transparent huge pages (runtime/backend/cuda/pinned_memory.h).
//
// Ownership: owns every buffer; frees them on destruction, in reverse order.
// Thread safety: immutable after Create/fill; data() may be read from any thread.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <vector>

#include "runtime/backend/cuda/pinned_memory.h"
#include "runtime/core/status.h"

namespace ef::cache {

class PinnedHostTier {
 public:
  // Allocates bytes_per_expert for every (layer, expert) with present[layer] (dense layers hold no
  // routed experts), layer by layer, up to max_bytes in all (0: no limit); the experts past it get
  // no buffer (data() is null: the owner reads them from elsewhere). ResourceExhausted naming the
  // bytes when the host cannot pin that much.
  // `keep` (optional) narrows it further to the experts it returns true for (e.g. those homed on
  // this rank). `layer_bytes` (optional, [num_layers], each at most bytes_per_expert): the bytes of
  // one expert of each layer where layers differ (cache.low_precision_layers: int8 in some layers,
  // the checkpoint's dtype in others); its buffers and every load of it are that long.
  static StatusOr<std::unique_ptr<PinnedHostTier>> Create(int num_layers, int num_experts, size_t bytes_per_expert,
                                                          const std::vector<bool>& present, size_t max_bytes = 0,
                                                          const std::function<bool(int, int)>& keep = {},
                                                          const std::vector<size_t>& layer_bytes = {});
  ~PinnedHostTier();
  PinnedHostTier(const PinnedHostTier&) = delete;
  PinnedHostTier& operator=(const PinnedHostTier&) = delete;

  std::byte* data(int layer, int expert) const { return buffers_[static_cast<size_t>(layer) * num_experts_ + expert]; }
  size_t bytes_per_expert() const { return bytes_; }                                  // the largest expert
  size_t bytes(int layer) const { return layer_bytes_[static_cast<size_t>(layer)]; }  // an expert of `layer`
  int num_pinned() const { return num_pinned_; }
  size_t total_bytes() const { return total_; }  // pinned (huge pages: each buffer rounded up to 2 MiB)
  int num_layers() const { return num_layers_; }
  int num_experts() const { return num_experts_; }

 private:
  PinnedHostTier() = default;
  int num_layers_ = 0;
  int num_experts_ = 0;
  size_t bytes_ = 0;
  std::vector<size_t> layer_bytes_;  // [num_layers]
  size_t total_ = 0;
  int num_pinned_ = 0;
  runtime::cuda::PinnedKind kind_ = runtime::cuda::PinnedKind::kDriver;
  std::vector<std::byte*> buffers_;  // nullptr for dense layers and past max_bytes
};

}  // namespace ef::cache
