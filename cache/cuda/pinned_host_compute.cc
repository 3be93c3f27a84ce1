#include "cache/cuda/pinned_host_compute.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>

#include "cache/cuda/cuda_slot_arena.h"
#include "cache/host_share_plan.h"
#include "runtime/backend/cpu/host_gemv.h"
#include "runtime/core/logging.h"
#include "runtime/core/quant_format.h"
#include "runtime/core/thread_pool.h"

namespace ef::cache {
namespace {

// Split points are multiples of this many intermediate rows: the quantization group (a down row's
// columns are cut between groups) and a whole number of 16-byte vectors in every dtype.
constexpr int64_t kSplitStep = 64;

using StagedCopy = CudaSlotArena::StagedCopy;

// The copies that put rows [0, r) and columns [0, c) of w (host memory) at `dst` in the staging
// area, laid out as an [r, c] weight of w's dtype.
void AppendBlockCopies(const runtime::Weight& w, int64_t r, int64_t c, size_t dst, std::vector<StagedCopy>& out) {
  auto add = [&](size_t to, const std::byte* from, size_t src_pitch, size_t width) {
    if (src_pitch == width) {
      out.push_back({to, from, width * r, width * r, width * r, 1});  // contiguous rows: one copy
    } else {
      out.push_back({to, from, src_pitch, width, width, static_cast<size_t>(r)});
    }
  };
  const auto* src = static_cast<const std::byte*>(w.data);
  if (IsQuantized(w.dtype)) {
    const QuantFormat f = QuantFormat::Of(w.dtype);
    add(dst, src, static_cast<size_t>(f.row_value_bytes(w.cols)), static_cast<size_t>(f.row_value_bytes(c)));
    add(dst + static_cast<size_t>(f.params_offset(r, c)), src + f.params_offset(w.rows, w.cols),
        static_cast<size_t>(f.row_param_bytes(w.cols)), static_cast<size_t>(f.row_param_bytes(c)));
    return;
  }
  const size_t e = DTypeSize(w.dtype);
  add(dst, src, static_cast<size_t>(w.cols) * e, static_cast<size_t>(c) * e);
}

// The host kernel a weight takes, for the log.
const char* KernelName(const runtime::Weight& w) {
  if (!runtime::HostGemvVectorized(w)) return "scalar";
  switch (runtime::HostGemvPath(w)) {
    case runtime::HostPath::kAmx:
      return "amx";
    case runtime::HostPath::kInt8X:
      return "avx512 vnni, x in int8";
    default:
      return "avx512";
  }
}

}  // namespace

StatusOr<std::unique_ptr<PinnedHostCompute>> PinnedHostCompute::Create(std::shared_ptr<const PinnedHostTier> tier,
                                                                       SlotLayout layout, const std::string& mode,
                                                                       int max_rows, int admit) {
  if (mode != "auto" && mode != "whole" && mode != "on" && mode != "split")
    return InvalidArgument("unknown cache.cpu_compute '" + mode + "' (off, auto, whole, on or split)");
  if (max_rows < 1) return InvalidArgument("cache.cpu_compute: cpu_compute_max_rows must be at least 1");
  if (!tier) return InvalidArgument("cache.cpu_compute needs the pinned host tier");
  auto c =
      std::unique_ptr<PinnedHostCompute>(new PinnedHostCompute(std::move(tier), std::move(layout), mode, max_rows));
  // One set of rates per expert size, the largest first.
  const int num_layers = c->tier_->num_layers();
  std::vector<size_t> sizes;
  for (int l = 0; l < num_layers; ++l)
    if (c->tier_->bytes(l) > 0) sizes.push_back(c->tier_->bytes(l));
  std::sort(sizes.begin(), sizes.end(), std::greater<>());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  if (sizes.empty()) return InvalidArgument("cache.cpu_compute: the pinned host tier holds no layer of experts");
  for (size_t n : sizes) {
    Rates r;
    r.bytes = n;
    c->rates_.push_back(std::move(r));
  }
  c->class_of_.assign(static_cast<size_t>(num_layers), -1);
  for (int l = 0; l < num_layers; ++l)
    if (c->tier_->bytes(l) > 0)
      c->class_of_[static_cast<size_t>(l)] =
          static_cast<int>(std::find(sizes.begin(), sizes.end(), c->tier_->bytes(l)) - sizes.begin());
  if (admit < 0 || admit > (1 << 20))
    return InvalidArgument("cache.cpu_compute_admit must be between 0 and 1048576, got " + std::to_string(admit));
  // `on` and `split` (tests) send every eligible miss to the host: no admission.
  if (admit > 0 && (c->mode_ == "auto" || c->mode_ == "whole")) {
    c->admission_ = std::make_unique<MissAdmission>(c->tier_->num_layers(), c->tier_->num_experts(), admit);
    EF_LOG(INFO, CACHE, "cpu compute: a miss used %d steps more than a resident expert of its layer enters the slots",
           admit);
  }
  return c;
}

runtime::ExpertWeights PinnedHostCompute::PartShape(const runtime::ExpertWeights& shape, int64_t split) {
  runtime::ExpertWeights p = shape;
  p.gate.rows = split;
  p.up.rows = split;
  p.down.cols = split;
  return p;
}

double PinnedHostCompute::RowFactor(const Rates& rates, int64_t r) {
  // Piecewise linear through the calibrated points (rows ascending, the first 1 -> 1.0); past the
  // last, proportional to the rows.
  const auto& pts = rates.row_factor;
  if (pts.empty() || r <= pts.front().first) return 1.0;
  for (size_t i = 1; i < pts.size(); ++i)
    if (r <= pts[i].first) {
      const auto [r0, f0] = pts[i - 1];
      const auto [r1, f1] = pts[i];
      return f0 + (f1 - f0) * static_cast<double>(r - r0) / static_cast<double>(r1 - r0);
    }
  return pts.back().second * static_cast<double>(r) / static_cast<double>(pts.back().first);
}

double PinnedHostCompute::HostMs(const Rates& rates, int64_t r, double share) {
  return rates.host_ms * RowFactor(rates, r) * share;
}

Status PinnedHostCompute::CalibrateRates(SlotArena& arena, Rates& rates, const std::vector<std::pair<int, int>>& pinned,
                                         int64_t part_rows, std::string& note) {
  const int layer = pinned.front().first, expert = pinned.front().second;
  using Clock = std::chrono::steady_clock;
  auto ms = [](Clock::time_point a) { return std::chrono::duration<double, std::milli>(Clock::now() - a).count(); };
  // Into a slot that holds this layer's experts (slots may be sized per layer).
  int slot = 0;
  while (slot + 1 < arena.num_slots() && arena.slot_size(slot) < tier_->bytes(layer)) ++slot;
  double copy = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    auto t = Clock::now();
    EF_RETURN_IF_ERROR(arena.CopyIn(slot, {tier_->data(layer, expert), tier_->bytes(layer)}));
    copy = std::min(copy, ms(t));
  }
  const runtime::ExpertWeights shape = layout_.Shape(layer, expert);
  // The host time at 1 row, and relative to it at 4 and at max_rows rows: what more rows cost
  // depends on the kernel (AVX-512 FMAs read the weights once per 4 rows and pay per row; AMX tiles
  // serve 16 rows at once; int8 x pays per row and group), so it is measured, not assumed.
  rates.host_ms = 0;  // Compute leaves the running mean alone while it is 0
  auto time_rows = [&](int64_t r) -> StatusOr<double> {
    std::vector<float> x(static_cast<size_t>(r * shape.gate.cols), 0.01f), y(static_cast<size_t>(r * shape.down.rows));
    std::vector<double> times;
    for (size_t rep = 0; rep < std::max<size_t>(3, pinned.size()); ++rep) {
      const auto [l, e] = pinned[rep % pinned.size()];
      auto t = Clock::now();
      EF_RETURN_IF_ERROR(Compute(l, e, r, x.data(), y.data(), 0));
      times.push_back(ms(t));
    }
    std::nth_element(times.begin(), times.begin() + static_cast<std::ptrdiff_t>(times.size() / 2), times.end());
    return times[times.size() / 2];
  };
  EF_ASSIGN_OR_RETURN(const double host, time_rows(1));
  rates.row_factor = {{1, 1.0}};
  std::string rows_note;
  for (int64_t r : {std::min<int64_t>(4, max_rows_), static_cast<int64_t>(max_rows_)}) {
    if (r <= rates.row_factor.back().first) continue;
    EF_ASSIGN_OR_RETURN(const double t, time_rows(r));
    rates.row_factor.push_back({r, std::max(rates.row_factor.back().second, t / host)});
    rows_note +=
        ", " + std::to_string(r) + " rows " + std::to_string(rates.row_factor.back().second).substr(0, 4) + "x";
  }
  rates.part_copy_ms = 0;
  std::string split_note;
  if (part_rows > 0) {
    auto* cuda = dynamic_cast<CudaSlotArena*>(&arena);
    double part = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      auto t = Clock::now();
      EF_RETURN_IF_ERROR(StartPart(arena, layer, expert, part_rows));
      cuda->SynchronizeCopies();
      part = std::min(part, ms(t));
    }
    EF_RETURN_IF_ERROR(cuda->status());
    rates.part_copy_ms = part * static_cast<double>(shape.gate.rows) / static_cast<double>(part_rows);
    char buf[160];
    std::snprintf(buf, sizeof buf, "; split misses: %.2f ms to copy %lld of %lld intermediate rows", part,
                  static_cast<long long>(part_rows), static_cast<long long>(shape.gate.rows));
    split_note = buf;
  }
  rates.copy_ms = copy;
  rates.host_ms = host;
  rates.calibrated_host_ms = host;
  rates.layer = layer;
  rates.expert = expert;
  char buf[320];
  std::snprintf(buf, sizeof buf, "one %s expert takes %.2f ms on the host for one row%s (%s), %.2f ms to copy%s",
                DTypeName(shape.gate.dtype), host, rows_note.c_str(), KernelName(shape.gate), copy, split_note.c_str());
  note = buf;
  return Status::Ok();
}

Status PinnedHostCompute::Calibrate(SlotArena& arena) {
  // Each expert size is timed on up to 8 distinct experts in turn, the median: one expert computed
  // over and over comes from the CPU's last-level cache when it fits there (a whole int4 Mixtral
  // expert nearly does), where a missed expert comes from memory. The CUDA cache's slot layout
  // gives the experts of a layer one shape and dtype (CudaSlotLayout), so any pinned ones will do.
  constexpr size_t kTimedExperts = 8;
  std::vector<std::vector<std::pair<int, int>>> pinned(rates_.size());
  for (int l = tier_->num_layers() - 1; l >= 0; --l) {
    const int c = class_of_[static_cast<size_t>(l)];
    for (int e = 0; c >= 0 && e < tier_->num_experts() && pinned[c].size() < kTimedExperts; ++e)
      if (tier_->data(l, e)) pinned[c].push_back({l, e});
  }
  if (std::all_of(pinned.begin(), pinned.end(), [](const auto& p) { return p.empty(); }))
    return FailedPrecondition("cache.cpu_compute needs experts pinned in host memory; the host budget holds none");
  // The split: the staging area holds max_fraction_ of an expert's intermediate rows (of the
  // largest part any size needs); a partial copy of that much is timed per size.
  auto* cuda = dynamic_cast<CudaSlotArena*>(&arena);
  // Split parts are copied as row and column slices: dtypes whose rows cut at 64 values (block
  // FP8's 128 x 128 blocks and MXFP4 do not).
  auto sliceable = [](DType t) {
    return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16 || t == DType::kQ8 || t == DType::kQ4;
  };
  std::vector<int64_t> part_rows(rates_.size(), 0);
  size_t staging = 0;
  std::string split_note = splits() && cuda ? "" : "no split";
  for (size_t c = 0; c < rates_.size(); ++c) {
    if (pinned[c].empty() || !splits() || !cuda) continue;
    const runtime::ExpertWeights shape = layout_.Shape(pinned[c][0].first, pinned[c][0].second);
    const int64_t inter = shape.gate.rows;
    const int64_t most = static_cast<int64_t>(static_cast<double>(inter) * max_fraction_) / kSplitStep * kSplitStep;
    if (most >= kSplitStep && inter % kSplitStep == 0 && sliceable(shape.gate.dtype) && sliceable(shape.up.dtype) &&
        sliceable(shape.down.dtype)) {
      part_rows[c] = most;
      staging = std::max(staging, layout_.Bytes(PartShape(shape, most)));
    } else {
      split_note = "no split for experts of intermediate size " + std::to_string(inter) + " in " +
                   DTypeName(shape.gate.dtype) +
                   (shape.gate.dtype == DType::kPbf16 ? " (a slice of a packed block is not a packed block)"
                                                      : " (they do not cut at multiples of 64 rows)");
    }
  }
  if (staging > 0) {
    const Status st = cuda->ReserveStaging(staging);
    if (!st.ok()) {
      // The slots took the memory (e.g. a budget of `auto`): misses go whole to one path or the other.
      split_note = "no split (" + st.message() + ")";
      std::fill(part_rows.begin(), part_rows.end(), 0);
    } else {
      split_note += (split_note.empty() ? "" : "; ") + std::to_string(cuda->staging_bytes()) + " bytes of staging";
    }
  }
  // Timed first, the sizes with pinned experts; a size with none is never computed on the host
  // (nothing to compute from), and its copy time is the timed one scaled by bytes.
  reported_ = -1;
  for (size_t c = 0; c < rates_.size(); ++c) {
    if (pinned[c].empty()) continue;
    std::string note;
    EF_RETURN_IF_ERROR(CalibrateRates(arena, rates_[c], pinned[c], part_rows[c], note));
    EF_LOG(INFO, CACHE, "cpu compute of missed experts (%s, at most %d rows, %d threads): %s", mode_.c_str(), max_rows_,
           ThreadPool::Default().num_threads(), note.c_str());
    if (reported_ < 0) reported_ = static_cast<int>(c);
  }
  if (!split_note.empty()) EF_LOG(INFO, CACHE, "cpu compute of missed experts: %s", split_note.c_str());
  const Rates* timed = &rates_[static_cast<size_t>(reported_)];
  for (Rates& r : rates_) {
    if (r.layer >= 0) continue;
    const double scale = static_cast<double>(r.bytes) / static_cast<double>(timed->bytes);
    r.copy_ms = timed->copy_ms * scale;
    r.host_ms = r.calibrated_host_ms = timed->host_ms * scale;
    r.row_factor = timed->row_factor;
  }
  stats_ = HostComputeStats{};
  stats_.calibrated_copy_ms = timed->copy_ms;
  stats_.calibrated_host_ms = timed->calibrated_host_ms;
  stats_.host_ms_running = timed->host_ms;
  part_started_ = false;
  return Status::Ok();
}

void PinnedHostCompute::Take(int layer, std::vector<int32_t>& experts, std::span<const int64_t> rows,
                             ExpertStore& store, runtime::ExpertSource::HostShare& host) {
  if (layer < 0 || layer >= tier_->num_layers() || class_of_[static_cast<size_t>(layer)] < 0) return;
  const Rates& rates = rates_[static_cast<size_t>(class_of_[static_cast<size_t>(layer)])];
  // Host-computed and split experts never enter the cache: the slots keep what whole loads (the
  // misses the host cannot take, e.g. a prompt's experts of many rows) put there, unless the
  // admission rule (cache.cpu_compute_admit, host_share_plan.h) sends a popular miss to its slot.
  const int32_t admitted = Admit(layer, experts, rows, store);
  std::vector<MissCost> misses;
  for (size_t i = 0; i < experts.size(); ++i) {
    const int32_t e = experts[i];
    if (store.IsResident(layer, e)) continue;  // hits are never taken
    const int64_t r = i < rows.size() ? rows[i] : 1;
    MissCost m;
    m.expert = e;
    m.copy_ms = rates.copy_ms;
    m.part_copy_ms = rates.part_copy_ms;
    m.host_ms = HostMs(rates, std::max<int64_t>(r, 1), 1.0);
    m.eligible = r > 0 && r <= max_rows_ && tier_->data(layer, e) != nullptr && e != admitted;
    misses.push_back(m);
  }
  if (misses.empty()) return;
  HostShareOptions o;
  o.all_on_host = mode_ == "on";
  o.split = rates.part_copy_ms > 0;
  o.max_fraction = max_fraction_;
  o.force_fraction = mode_ == "split" && rates.part_copy_ms > 0 ? 0.5 : 0;
  HostSharePlan plan = PlanHostShare(misses, o);
  host.whole = std::move(plan.host);
  host.split_expert = -1;
  host.split = 0;
  if (plan.split_expert >= 0) {
    const int64_t inter = layout_.Shape(layer, plan.split_expert).gate.rows;
    const int64_t most = static_cast<int64_t>(static_cast<double>(inter) * max_fraction_) / kSplitStep * kSplitStep;
    const int64_t cut = std::llround(plan.split_fraction * static_cast<double>(inter) / kSplitStep) * kSplitStep;
    if (cut <= 0) {
      host.whole.push_back(plan.split_expert);  // too little to copy: the host takes it whole
    } else {
      host.split_expert = plan.split_expert;
      host.split = std::min(cut, most);
    }
  }
  std::erase_if(experts, [&](int32_t e) {
    return e == host.split_expert || std::find(host.whole.begin(), host.whole.end(), e) != host.whole.end();
  });
}

int32_t PinnedHostCompute::Admit(int layer, std::span<const int32_t> experts, std::span<const int64_t> rows,
                                 ExpertStore& store) {
  if (!admission_) return -1;
  // At most one admission per layer and step: each costs a whole copy in this layer.
  const AdmittedMiss a = AdmitMiss(
      *admission_, layer, experts, rows, max_rows_, [this](int l, int e) { return tier_->data(l, e) != nullptr; },
      store);
  if (a.evicted) ++stats_.admitted;  // a free slot is filled as any miss would be: not counted
  return a.expert;
}

Status PinnedHostCompute::Compute(int layer, int expert, int64_t rows, const float* x, float* y, int64_t inter_begin) {
  const std::byte* base = tier_->data(layer, expert);
  if (!base)
    return FailedPrecondition("cpu compute: expert " + std::to_string(expert) + " of layer " + std::to_string(layer) +
                              " has no pinned host copy");
  const runtime::ExpertWeights w = layout_.At(layer, expert, base);
  const int64_t inter = w.gate.rows;
  if (inter_begin < 0 || inter_begin >= inter || inter_begin % kSplitStep != 0)
    return InvalidArgument("cpu compute: intermediate rows from " + std::to_string(inter_begin) + " of " +
                           std::to_string(inter) + " (a multiple of 64 below it)");
  const auto t = std::chrono::steady_clock::now();
  ThreadPool& pool = ThreadPool::Default();
  const int64_t n = inter - inter_begin;
  gate_.resize(static_cast<size_t>(rows * n));
  up_.resize(gate_.size());
  runtime::HostGemv(pool, x, rows, w.gate, gate_.data(), {inter_begin, inter, 0, -1});
  runtime::HostGemv(pool, x, rows, w.up, up_.data(), {inter_begin, inter, 0, -1});
  pool.ParallelFor(
      static_cast<int64_t>(gate_.size()),
      [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const float g = gate_[i];
          gate_[i] = g / (1.0f + std::exp(-g)) * up_[i];
        }
      },
      /*min_chunk=*/4096);
  runtime::HostGemv(pool, gate_.data(), rows, w.down, y, {0, -1, inter_begin, inter});
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
  ++stats_.experts;
  stats_.rows += rows;
  stats_.ms += ms;
  // The running host time per whole expert at one row of this expert's size, for the next plans.
  Rates& rates = rates_[static_cast<size_t>(std::max(0, class_of_[static_cast<size_t>(layer)]))];
  const double share = static_cast<double>(n) / static_cast<double>(inter);
  if (rates.host_ms > 0) {
    rates.host_ms += 0.1 * (ms / (RowFactor(rates, rows) * share) - rates.host_ms);
    if (&rates == &rates_[static_cast<size_t>(std::max(0, reported_))]) stats_.host_ms_running = rates.host_ms;
  }
  return Status::Ok();
}

void PinnedHostCompute::ResetStats() {
  HostComputeStats s;
  s.calibrated_copy_ms = stats_.calibrated_copy_ms;
  s.calibrated_host_ms = stats_.calibrated_host_ms;
  s.host_ms_running = stats_.host_ms_running;
  stats_ = s;
}

Status PinnedHostCompute::StartPart(SlotArena& arena, int layer, int expert, int64_t split) {
  auto* cuda = dynamic_cast<CudaSlotArena*>(&arena);
  if (!cuda || cuda->staging_bytes() == 0) return FailedPrecondition("cpu compute: no staging area for split misses");
  const std::byte* base = tier_->data(layer, expert);
  if (!base)
    return FailedPrecondition("cpu compute: expert " + std::to_string(expert) + " of layer " + std::to_string(layer) +
                              " has no pinned host copy");
  const runtime::ExpertWeights shape = layout_.Shape(layer, expert);
  if (split <= 0 || split >= shape.gate.rows || split % kSplitStep != 0)
    return InvalidArgument("cpu compute: split at " + std::to_string(split) + " of " + std::to_string(shape.gate.rows) +
                           " intermediate rows");
  const runtime::ExpertWeights part = PartShape(shape, split);
  const size_t bytes = layout_.Bytes(part);
  if (bytes > cuda->staging_bytes())
    return InvalidArgument("cpu compute: a part of " + std::to_string(bytes) + " bytes exceeds the staging area");
  const runtime::ExpertWeights src = layout_.At(shape, base);
  const std::vector<size_t> at = layout_.Offsets(part);
  std::vector<StagedCopy> copies;
  AppendBlockCopies(src.gate, split, shape.gate.cols, at[0], copies);
  AppendBlockCopies(src.up, split, shape.up.cols, at[1], copies);
  AppendBlockCopies(src.down, shape.down.rows, split, at[2], copies);
  EF_RETURN_IF_ERROR(cuda->LoadStaged(copies));
  part_ = layout_.At(part, cuda->staging());
  part_started_ = true;
  ++stats_.split_experts;
  stats_.split_copied += static_cast<double>(split) / static_cast<double>(shape.gate.rows);
  for (const StagedCopy& c : copies) stats_.staged_bytes += static_cast<int64_t>(c.width * c.height);
  return Status::Ok();
}

StatusOr<runtime::ExpertWeights> PinnedHostCompute::AcquirePart(SlotArena& arena) {
  auto* cuda = dynamic_cast<CudaSlotArena*>(&arena);
  if (!cuda || !part_started_) return FailedPrecondition("cpu compute: no split expert was started");
  cuda->WaitStaged();
  return part_;
}

}  // namespace ef::cache
