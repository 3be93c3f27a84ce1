#include "cache/cuda/cuda_cache_source.h"

#include <algorithm>
#include <functional>
#include <vector>

#include "cache/cuda/pinned_host_compute.h"
#include "cache/slot_fill.h"
#include "runtime/backend/cuda/cuda_backend.h"
#include "runtime/core/check.h"
#include "runtime/core/logging.h"
#include "runtime/core/progress.h"

namespace ef::cache {
namespace {

// What the two entry points share: the device arena over `tier`, cpu compute, the source.
// `fallback` fills the packed bytes of experts the tier holds no pinned copy of.
StatusOr<std::unique_ptr<CachedExpertSource>> Build(const runtime::ModelConfig& config, SlotLayout layout,
                                                    size_t expert_bytes, std::shared_ptr<const PinnedHostTier> tier,
                                                    ExpertSource fallback, runtime::Backend* backend,
                                                    const CachedExpertSourceOptions& options,
                                                    const CudaCacheOptions& cuda) {
  auto* cb = dynamic_cast<runtime::CudaBackend*>(backend);
  if (!cb) return InvalidArgument("cuda expert cache needs the CUDA backend, got " + backend->name());
  if (!tier || tier->bytes_per_expert() < expert_bytes)
    return InvalidArgument("cuda expert cache: host tier missing or smaller than the expert layout");
  if (options.async)
    return InvalidArgument(
        "cuda expert cache: its loads are asynchronous already (copy streams); async is for host "
        "arenas");
  CachedExpertSource::Backing b{layout};
  b.slot_bytes = expert_bytes;
  b.fill = std::move(fallback);
  CudaSlotArenaOptions ao;
  ao.copy_chunk_bytes = cuda.copy_chunk_bytes;
  ao.max_queued_chunks = cuda.max_queued_chunks;
  b.make_arena = [cb, tier, ao](int num_slots, size_t slot_bytes,
                                std::span<const size_t> slot_sizes) -> StatusOr<std::unique_ptr<SlotArena>> {
    EF_ASSIGN_OR_RETURN(auto arena, CudaSlotArena::Create(cb, tier, num_slots, slot_bytes, ao, slot_sizes));
    return std::unique_ptr<SlotArena>(std::move(arena));
  };
  if (cuda.cpu_compute != "off") {
    EF_ASSIGN_OR_RETURN(b.host_compute, PinnedHostCompute::Create(tier, std::move(layout), cuda.cpu_compute,
                                                                  cuda.cpu_compute_max_rows, cuda.cpu_compute_admit));
  }
  return CachedExpertSource::Create(config, std::move(b), options);
}

// Refuses the models whose experts the device slots cannot hold, naming why.
Status CheckDeviceExperts(const runtime::ModelWeights& model, const ExpertTiers* tiers,
                          const std::string& cpu_compute) {
  const runtime::ModelConfig& c = model.config();
  const std::vector<int> moe = c.MoeLayers();
  if (moe.empty()) return InvalidArgument("cuda expert cache: the model has no MoE layer");
  if (tiers && tiers->precision() == LoadPrecision::kAuto)
    return Unimplemented(
        "cache.miss_precision auto (mixed precisions per slot) runs on the cpu backend; on cuda use int8 or int4");
  if (tiers && tiers->num_unquantizable() > 0 && tiers->precision() == LoadPrecision::kLossless)
    return Unimplemented(
        "cuda expert cache: lossless loads (cache.miss_precision or cache.high_precision lossless) "
        "pack bf16 experts only; this model's are " +
        std::string(DTypeName(model.expert_dtype())) +
        " (or biased, or of widths not a multiple of 128): use cache.miss_precision and "
        "cache.high_precision native");
  if (tiers && tiers->num_unquantizable() > 0)
    return Unimplemented("cuda expert cache: cache.miss_precision " +
                         std::string(LoadPrecisionName(tiers->precision())) +
                         " on a model with experts that stay in the checkpoint's dtype (" +
                         std::to_string(tiers->num_unquantizable()) + " experts: " + DTypeName(model.expert_dtype()) +
                         ", biased, or widths the quantization group does not divide); use miss_precision native");
  const runtime::ExpertWeights& w0 = model.host_expert(moe[0], 0);
  // Biased experts (gpt_oss) keep their biases in the slot after down (SlotLayout); the host
  // compute of misses has no biases, so it refuses them.
  if (w0.has_bias() && cpu_compute != "off")
    return Unimplemented("cache.cpu_compute " + cpu_compute +
                         ": the host path computes experts without biases; this model's experts have them (use off)");
  auto same = [](const runtime::Weight& a, const runtime::Weight& b) {
    return a.dtype == b.dtype && a.rows == b.rows && a.cols == b.cols;
  };
  for (int l : moe)
    for (int e = 0; e < c.num_experts; ++e) {
      const runtime::ExpertWeights& w = model.host_expert(l, e);
      if (!same(w.gate, w0.gate) || !same(w.up, w0.up) || !same(w.down, w0.down))
        return Unimplemented("cuda expert cache: experts of different shapes or dtypes");
    }
  return Status::Ok();
}

}  // namespace

SlotLayout CudaSlotLayout(const runtime::ExpertWeights& shape) {
  return SlotLayout(kDeviceSlotAlignment, [shape](int, int) { return shape; });
}

CudaSlotArena& CudaArenaOf(CachedExpertSource& source) {
  auto* arena = dynamic_cast<CudaSlotArena*>(&source.arena());
  EF_CHECK_MSG(arena, "the expert cache source was not built by CreateCudaCacheSource");
  return *arena;
}

StatusOr<std::unique_ptr<CachedExpertSource>> CreateCudaCacheSource(const runtime::ModelWeights& model,
                                                                    runtime::Backend* backend,
                                                                    const CachedExpertSourceOptions& options,
                                                                    const CudaCacheOptions& cuda) {
  ExpertTiers* tiers = options.tiers;
  EF_RETURN_IF_ERROR(CheckDeviceExperts(model, tiers, cuda.cpu_compute));
  if (tiers) tiers->set_keep_quantized(false);  // the pinned tier below is the host tier
  const runtime::ModelConfig& c = model.config();
  const std::vector<int> moe = c.MoeLayers();
  SlotLayout layout = SlotLayout::OfModel(kDeviceSlotAlignment, model, tiers);
  // One shape per layer; under cache.low_precision_layers layers differ in precision: the pinned
  // copies are each layer's size, and so are the device slots when the budget sized them per layer
  // (options.layer_slot_bytes); otherwise a slot holds the largest.
  std::vector<size_t> layer_bytes(c.num_layers, 0);
  std::vector<bool> present(c.num_layers, false);
  for (int l : moe) {
    present[l] = true;
    layer_bytes[l] = layout.Bytes(l, 0);
  }
  const size_t bytes = *std::max_element(layer_bytes.begin(), layer_bytes.end());
  std::function<bool(int, int)> keep;
  if (tiers && tiers->hooks().host) keep = [tiers](int l, int e) { return tiers->HasHostCopy(l, e); };
  EF_ASSIGN_OR_RETURN(
      std::shared_ptr<PinnedHostTier> tier,
      PinnedHostTier::Create(c.num_layers, c.num_experts, bytes, present, cuda.host_budget_bytes, keep, layer_bytes));
  // The checkpoint's experts (quantized on the way when the tiers load low), at the slot offsets,
  // written on all cores.
  {
    std::vector<SlotFill> fills;
    int64_t fill_bytes = 0;
    for (int l : moe)
      for (int e = 0; e < c.num_experts; ++e)
        if (std::byte* dst = tier->data(l, e)) {
          fills.push_back({l, e, {dst, layer_bytes[l]}});
          fill_bytes += static_cast<int64_t>(layer_bytes[l]);
        }
    Progress bar(tiers && tiers->precision() != LoadPrecision::kNative
                     ? std::string("pinning experts in host memory (") + LoadPrecisionName(tiers->precision()) + ")"
                     : std::string("pinning experts in host memory"),
                 fill_bytes);
    EF_RETURN_IF_ERROR(
        WriteExpertSlots(model, layout, fills, &bar, 0, tiers ? tiers->precision_options().calibrated.get() : nullptr));
  }
  const int total = c.num_experts * static_cast<int>(moe.size());
  if (tier->num_pinned() < total && !(tiers && tiers->hooks().host))
    EF_LOG(WARN, CACHE,
           "cuda expert cache: %d of %d experts pinned in host memory (host budget %zu bytes); the rest load from the "
           "checkpoint mapping, synchronously",
           tier->num_pinned(), total, cuda.host_budget_bytes);
  // Not pinned here: a peer's shard or the checkpoint (quantized on the way when asked).
  return Build(c, std::move(layout), bytes, std::move(tier), PackedExpertFill(model, tiers), backend, options, cuda);
}

StatusOr<std::unique_ptr<CachedExpertSource>> CreateCudaCacheSource(
    const runtime::ModelConfig& config, const runtime::ExpertWeights& shape, std::shared_ptr<const PinnedHostTier> tier,
    runtime::Backend* backend, const CachedExpertSourceOptions& options, const CudaCacheOptions& cuda) {
  // The caller filled every expert of the tier: there is nothing to stage from.
  ExpertSource none = [](int l, int e, std::span<std::byte>) -> Status {
    return FailedPrecondition("cuda expert cache: no host copy of expert " + std::to_string(e) + " of layer " +
                              std::to_string(l));
  };
  SlotLayout layout = CudaSlotLayout(shape);
  const size_t bytes = layout.Bytes(shape);
  return Build(config, std::move(layout), bytes, std::move(tier), std::move(none), backend, options, cuda);
}

}  // namespace ef::cache
