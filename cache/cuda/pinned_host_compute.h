// PinnedHostCompute: cache.cpu_compute on CUDA - a miss of few rows whose host copy is pinned may be
// computed on the host CPU from that copy instead of being copied into a device slot
// (runtime/backend/cpu/host_gemv.h). `auto` gives each miss, in compute order, to whichever path
// would finish it first: the copy engine (queue of this layer's misses so far x copy time per
// expert) or the host (queue x host time for its rows), times calibrated at the cache's creation
// on this machine; `on` computes every eligible miss on the host.
//
// Ownership: shares the pinned tier with the device arena. Thread safety: engine thread only.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "cache/cuda/pinned_host_tier.h"
#include "cache/host_expert_compute.h"
#include "cache/slot_layout.h"

namespace ef::cache {

class PinnedHostCompute final : public HostExpertCompute {
 public:
  // mode: "auto" or "on"; misses of at most max_rows rows are candidates (the host kernel streams
  // the weights once per 4 rows). `layout` says where the parts sit in a pinned copy.
  static StatusOr<std::unique_ptr<PinnedHostCompute>> Create(std::shared_ptr<const PinnedHostTier> tier,
                                                             SlotLayout layout, const std::string& mode, int max_rows);

  // Copies the first pinned expert into slot 0 and computes it for one row, best of 3 each.
  Status Calibrate(SlotArena& arena) override;
  void Take(int layer, std::vector<int32_t>& experts, std::span<const int64_t> rows, const ExpertStore& store,
            std::vector<int32_t>& host) override;
  Status Compute(int layer, int expert, int64_t rows, const float* x, float* y) override;
  const HostComputeStats& stats() const override { return stats_; }

 private:
  PinnedHostCompute(std::shared_ptr<const PinnedHostTier> tier, SlotLayout layout, bool always, int max_rows)
      : tier_(std::move(tier)), layout_(std::move(layout)), always_(always), max_rows_(max_rows) {}

  std::shared_ptr<const PinnedHostTier> tier_;
  SlotLayout layout_;
  bool always_;  // "on"
  int max_rows_;
  HostComputeStats stats_;
  std::vector<float> gate_, up_;  // Compute's scratch
};

}  // namespace ef::cache
