#include "cache/cuda/pinned_host_compute.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "runtime/backend/cpu/host_gemv.h"
#include "runtime/core/logging.h"
#include "runtime/core/thread_pool.h"

namespace ef::cache {

StatusOr<std::unique_ptr<PinnedHostCompute>> PinnedHostCompute::Create(std::shared_ptr<const PinnedHostTier> tier,
                                                                       SlotLayout layout, const std::string& mode,
                                                                       int max_rows) {
  if (mode != "auto" && mode != "on")
    return InvalidArgument("unknown cache.cpu_compute '" + mode + "' (off, auto or on)");
  if (max_rows < 1) return InvalidArgument("cache.cpu_compute: cpu_compute_max_rows must be at least 1");
  if (!tier) return InvalidArgument("cache.cpu_compute needs the pinned host tier");
  return std::unique_ptr<PinnedHostCompute>(
      new PinnedHostCompute(std::move(tier), std::move(layout), mode == "on", max_rows));
}

Status PinnedHostCompute::Calibrate(SlotArena& arena) {
  int layer = -1, expert = -1;
  for (int l = 0; l < tier_->num_layers() && layer < 0; ++l)
    for (int e = 0; e < tier_->num_experts() && layer < 0; ++e)
      if (tier_->data(l, e)) layer = l, expert = e;
  if (layer < 0)
    return FailedPrecondition("cache.cpu_compute needs experts pinned in host memory; the host budget holds none");
  using Clock = std::chrono::steady_clock;
  auto ms = [](Clock::time_point a) { return std::chrono::duration<double, std::milli>(Clock::now() - a).count(); };
  double copy = 1e30, host = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    auto t = Clock::now();
    EF_RETURN_IF_ERROR(arena.CopyIn(0, {tier_->data(layer, expert), tier_->bytes_per_expert()}));
    copy = std::min(copy, ms(t));
  }
  const runtime::ExpertWeights shape = layout_.Shape(layer, expert);
  std::vector<float> x(static_cast<size_t>(shape.gate.cols), 0.01f), y(static_cast<size_t>(shape.down.rows));
  for (int rep = 0; rep < 3; ++rep) {
    auto t = Clock::now();
    EF_RETURN_IF_ERROR(Compute(layer, expert, 1, x.data(), y.data()));
    host = std::min(host, ms(t));
  }
  stats_ = HostComputeStats{};
  stats_.calibrated_copy_ms = copy;
  stats_.calibrated_host_ms = host;
  EF_LOG(INFO, CACHE,
         "cpu compute of missed experts (%s, at most %d rows): one expert takes %.2f ms on the host (%d threads, %s), "
         "%.2f ms to copy",
         always_ ? "on" : "auto", max_rows_, host, ThreadPool::Default().num_threads(),
         runtime::HostGemvVectorized(shape.gate) ? "avx512" : "scalar", copy);
  return Status::Ok();
}

void PinnedHostCompute::Take(int layer, std::vector<int32_t>& experts, std::span<const int64_t> rows,
                             const ExpertStore& store, std::vector<int32_t>& host) {
  if (layer < 0 || layer >= tier_->num_layers()) return;
  const double copy = stats_.calibrated_copy_ms, base = stats_.calibrated_host_ms;
  double copy_done = 0, host_done = 0;  // this layer's queues (ms)
  std::vector<int32_t> keep;
  keep.reserve(experts.size());
  for (size_t i = 0; i < experts.size(); ++i) {
    const int32_t e = experts[i];
    const int64_t r = i < rows.size() ? rows[i] : 1;
    const bool candidate = r > 0 && r <= max_rows_ && !store.IsResident(layer, e) && tier_->data(layer, e) != nullptr;
    if (!candidate) {
      keep.push_back(e);
      continue;
    }
    // The host kernel reads the weights once per block of 4 rows; each row adds its multiply-adds.
    const double h = base * std::ceil(r / 4.0) * (1.0 + 0.15 * static_cast<double>(std::min<int64_t>(r, 4) - 1));
    if (always_ || host_done + h < copy_done + copy) {
      host_done += h;
      host.push_back(e);
    } else {
      copy_done += copy;
      keep.push_back(e);
    }
  }
  experts.swap(keep);
}

Status PinnedHostCompute::Compute(int layer, int expert, int64_t rows, const float* x, float* y) {
  const std::byte* base = tier_->data(layer, expert);
  if (!base)
    return FailedPrecondition("cpu compute: expert " + std::to_string(expert) + " of layer " + std::to_string(layer) +
                              " has no pinned host copy");
  const runtime::ExpertWeights w = layout_.At(layer, expert, base);
  const auto t = std::chrono::steady_clock::now();
  ThreadPool& pool = ThreadPool::Default();
  const int64_t inter = w.gate.rows;
  gate_.resize(static_cast<size_t>(rows * inter));
  up_.resize(gate_.size());
  runtime::HostGemv(pool, x, rows, w.gate, gate_.data());
  runtime::HostGemv(pool, x, rows, w.up, up_.data());
  for (size_t i = 0; i < gate_.size(); ++i) {
    const float g = gate_[i];
    gate_[i] = g / (1.0f + std::exp(-g)) * up_[i];
  }
  runtime::HostGemv(pool, gate_.data(), rows, w.down, y);
  ++stats_.experts;
  stats_.rows += rows;
  stats_.ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
  return Status::Ok();
}

}  // namespace ef::cache
