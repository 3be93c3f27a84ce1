// PinnedHostCompute: cache.cpu_compute on CUDA - a miss of few rows whose host copy is pinned may be
// computed on the host CPU from that copy instead of being copied into a device slot
// (runtime/backend/cpu/host_gemv.h). `whole` gives each miss, in compute order, to whichever path
// would finish it first: the copy engine (queue of this layer's misses so far x copy time per
// expert) or the host (queue x host time for its rows). `auto` does the same, then splits one
// expert of the path that ends last between the two (host_share_plan.h): its first intermediate
// rows are copied into the arena's staging area (half a slot) and computed by the GPU, the rest
// on the host, so both paths end together. Copy times are calibrated at the cache's creation on
// this machine (a whole expert, and half of one as a partial copy); the host time is a running
// mean of the host computations. Layers whose experts differ in size (cache.low_precision_layers:
// int8 in some layers, the checkpoint's dtype in others) are timed and planned apart, one set of
// rates per expert size. `on` computes every eligible miss on the host; `split`
// (tests) splits the first eligible miss of each layer in half and computes the others on the host.
// Where a miss is computed (and where a split cuts it) follows measured times, so outputs agree
// with the all-GPU run to fp32 rounding, not bit for bit from run to run.
//
// Ownership: shares the pinned tier with the device arena. Thread safety: engine thread only.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cache/cuda/pinned_host_tier.h"
#include "cache/host_expert_compute.h"
#include "cache/host_share_plan.h"
#include "cache/slot_layout.h"

namespace ef::cache {

class PinnedHostCompute final : public HostExpertCompute {
 public:
  // mode: "auto", "whole", "on" or "split"; misses of at most max_rows rows are candidates (what
  // more rows cost is measured by Calibrate). `layout` says where the parts sit in a pinned copy.
  // admit > 0 (auto and whole): the admission rule of host_share_plan.h with that margin.
  static StatusOr<std::unique_ptr<PinnedHostCompute>> Create(std::shared_ptr<const PinnedHostTier> tier,
                                                             SlotLayout layout, const std::string& mode, int max_rows,
                                                             int admit);

  // For each expert size: copies a pinned expert into a slot of its size (and half of it into the
  // staging area, which it reserves for auto and split) and computes it for 1, 4 and max_rows rows,
  // best of 3 each.
  Status Calibrate(SlotArena& arena) override;
  void Take(int layer, std::vector<int32_t>& experts, std::span<const int64_t> rows, ExpertStore& store,
            runtime::ExpertSource::HostShare& host) override;
  Status Compute(int layer, int expert, int64_t rows, const float* x, float* y, int64_t inter_begin) override;
  Status StartPart(SlotArena& arena, int layer, int expert, int64_t split) override;
  StatusOr<runtime::ExpertWeights> AcquirePart(SlotArena& arena) override;
  const HostComputeStats& stats() const override { return stats_; }
  void ResetStats() override;

 private:
  PinnedHostCompute(std::shared_ptr<const PinnedHostTier> tier, SlotLayout layout, std::string mode, int max_rows)
      : tier_(std::move(tier)), layout_(std::move(layout)), mode_(std::move(mode)), max_rows_(max_rows) {}
  bool splits() const { return mode_ == "auto" || mode_ == "split"; }
  // The expert of `shape` cut to intermediate rows [0, split) (gate, up rows; down columns).
  static runtime::ExpertWeights PartShape(const runtime::ExpertWeights& shape, int64_t split);
  // The measured rates of the layers whose experts have one size.
  struct Rates {
    size_t bytes = 0;         // of one expert (the pinned copy)
    double copy_ms = 0;       // a whole expert into a slot (calibrated)
    double part_copy_ms = 0;  // a whole expert as partial copies run (calibrated; 0: no split)
    double host_ms = 0;       // on the host at one row, whole (running mean)
    double calibrated_host_ms = 0;
    std::vector<std::pair<int64_t, double>> row_factor;  // (rows, host time over one row's)
    int layer = -1, expert = -1;                         // the timed expert's key; -1: none pinned
  };
  // Host time of an expert of `rates` (one row, whole) for r rows and a share of its intermediate rows.
  static double HostMs(const Rates& rates, int64_t r, double share);
  // Host time for r rows over that for one row, from the calibrated points.
  static double RowFactor(const Rates& rates, int64_t r);
  // Times one class of layers (its pinned experts); part_rows > 0: also a partial copy of that many
  // intermediate rows into the staging area.
  Status CalibrateRates(SlotArena& arena, Rates& rates, const std::vector<std::pair<int, int>>& pinned,
                        int64_t part_rows, std::string& note);
  // The admission rule's step of `layer` (experts: the step's, in compute order, with their rows):
  // the miss it sends whole to the copy path, into the slot it freed (or a free one), or -1.
  int32_t Admit(int layer, std::span<const int32_t> experts, std::span<const int64_t> rows, ExpertStore& store);

  std::shared_ptr<const PinnedHostTier> tier_;
  SlotLayout layout_;
  std::string mode_;
  int max_rows_;
  double max_fraction_ = 0.5;                 // of an expert's intermediate rows the staging area holds
  std::vector<Rates> rates_;                  // one per expert size, the largest first
  std::vector<int> class_of_;                 // per layer: its rates_ index, -1 for a layer of no experts
  int reported_ = -1;                         // the rates stats_ reports: the largest size with a pinned expert
  HostComputeStats stats_;                    // calibrated and running times: rates_[reported_]
  std::unique_ptr<MissAdmission> admission_;  // cache.cpu_compute_admit > 0, auto and whole
  std::vector<float> gate_, up_;              // Compute's scratch
  runtime::ExpertWeights part_;               // the staged part (device pointers), after StartPart
  bool part_started_ = false;
};

}  // namespace ef::cache
