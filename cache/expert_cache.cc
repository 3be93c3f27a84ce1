#include "cache/expert_cache.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "cache/cache_policy.h"
#include "cache/low_precision_layers.h"
#include "cache/slot_layout.h"
#include "placement/frequency_predictor.h"
#include "placement/predictor_file.h"
#include "runtime/core/logging.h"
#if EF_HAVE_CUDA_CACHE
#include "cache/cuda/cuda_cache_source.h"
#include "runtime/backend/cuda/cuda_backend.h"
#endif

namespace ef::cache {
namespace {

size_t Align256(size_t n) { return (n + 255) / 256 * 256; }

std::string Bytes(uint64_t b) {
  char buf[64];
  if (b >= (uint64_t{1} << 40)) {
    std::snprintf(buf, sizeof buf, "%.2f TiB", static_cast<double>(b) / (uint64_t{1} << 40));
  } else if (b >= (uint64_t{1} << 30)) {
    std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(b) / (1 << 30));
  } else if (b >= (uint64_t{1} << 20)) {
    std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(b) / (1 << 20));
  } else if (b >= (uint64_t{1} << 10)) {
    std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / (1 << 10));
  } else {
    std::snprintf(buf, sizeof buf, "%llu bytes", static_cast<unsigned long long>(b));
  }
  return buf;
}

// Per decoder layer (0 for dense layers): the device bytes of a slot that holds any expert of that
// layer on the engine's backend, as the source lays experts out (SlotLayout: gate, up, down and a
// biased family's biases at 256-byte-aligned offsets on CUDA, back to back on the CPU); both arenas
// align slots to 256 bytes.
std::vector<size_t> LayerSlotBytes(const runtime::ModelWeights& w, bool cuda, LoadPrecision precision,
                                   const std::vector<uint8_t>& low_layers = {},
                                   LoadPrecision high = LoadPrecision::kNative) {
  if (precision == LoadPrecision::kAuto) precision = LoadPrecision::kNative;  // mixed: room for native
  const runtime::ModelConfig& c = w.config();
  const SlotLayout layout(cuda ? kDeviceSlotAlignment : 1, [&](int l, int e) -> runtime::ExpertWeights {
    const bool low = low_layers.empty() || (l < static_cast<int>(low_layers.size()) && low_layers[l]);
    PackedLayout p = PackedExpertLayout(w.host_expert(l, e), low ? precision : LoadPrecision::kNative);
    // What the low precision leaves in the checkpoint's precision, packed (ExpertTiers does the same).
    if (high == LoadPrecision::kLossless && !CacheConverts(p.gate.dtype))
      p = PackedExpertLayout(w.host_expert(l, e), LoadPrecision::kLossless);
    return p;
  });
  std::vector<size_t> bytes(static_cast<size_t>(c.num_layers), 0);
  size_t first = 0;
  for (int l : c.MoeLayers()) {
    if (cuda && low_layers.empty() && first > 0) {
      bytes[l] = first;  // the CUDA cache's experts share one shape when every layer loads alike
      continue;
    }
    for (int e = 0; e < c.num_experts; ++e) {
      bytes[l] = std::max(bytes[l], Align256(layout.Bytes(l, e)));
      if (cuda) break;  // the CUDA cache's experts of a layer share one shape
    }
    if (first == 0) first = bytes[l];
  }
  return bytes;
}

// The largest of them: the slot of every layer where layers load alike.
size_t SlotBytes(const runtime::ModelWeights& w, bool cuda, LoadPrecision precision,
                 const std::vector<uint8_t>& low_layers = {}) {
  const std::vector<size_t> bytes = LayerSlotBytes(w, cuda, precision, low_layers);
  return *std::max_element(bytes.begin(), bytes.end());
}

// cache.miss_precision and cache.high_precision, checked together: the load precision and how
// full-precision loads move. native or lossless with high lossless is lossless in every layer
// (cache.low_precision_layers then selects nothing: no load is lossy).
struct Precisions {
  LoadPrecision precision = LoadPrecision::kNative;
  LoadPrecision high = LoadPrecision::kNative;
  bool every_layer = false;  // low_precision_layers does not apply
};
StatusOr<Precisions> ResolvePrecisions(const ExpertCacheOptions& o) {
  Precisions p;
  EF_ASSIGN_OR_RETURN(p.precision, ParseLoadPrecision(o.miss_precision));
  if (o.high_precision == "native" || o.high_precision == "bf16") {
    p.high = LoadPrecision::kNative;
  } else if (o.high_precision == "lossless") {
    p.high = LoadPrecision::kLossless;
  } else {
    return InvalidArgument("unknown cache.high_precision '" + o.high_precision +
                           "' (native or bf16: the checkpoint's bytes; lossless: packed bit-exactly)");
  }
  if (p.high == LoadPrecision::kLossless && p.precision == LoadPrecision::kAuto)
    return InvalidArgument(
        "cache.high_precision lossless does not combine with cache.miss_precision auto (whose slots hold either "
        "precision); use int8 or int4 with cache.low_precision_layers");
  if (p.high == LoadPrecision::kLossless &&
      (p.precision == LoadPrecision::kNative || p.precision == LoadPrecision::kLossless)) {
    p.precision = LoadPrecision::kLossless;
    p.every_layer = true;
  }
  if (p.precision == LoadPrecision::kLossless) p.high = LoadPrecision::kNative;
  return p;
}

// Routing counts per (decoder layer, expert) for the static policy: from the trace, else from a
// trained frequency predictor.
StatusOr<std::vector<int64_t>> StaticCounts(const runtime::ModelConfig& c, const ExpertCacheOptions& o) {
  const std::vector<int> moe = c.MoeLayers();
  std::vector<int64_t> counts(static_cast<size_t>(c.num_layers) * c.num_experts, 0);
  if (o.trace) {
    for (const auto& t : o.trace->tokens)
      for (size_t m = 0; m < moe.size(); ++m)
        for (int j = 0; j < o.trace->top_k(); ++j) {
          const int e = t.experts[m * o.trace->top_k() + j];
          if (e >= 0 && e < c.num_experts) ++counts[static_cast<size_t>(moe[m]) * c.num_experts + e];
        }
    return counts;
  }
  if (o.predictor == "frequency" && !o.predictor_path.empty()) {
    auto loaded = placement::LoadPredictor(o.predictor_path);
    if (!loaded.ok()) {
      Status s = loaded.status();
      return s.Prepend("predictor.path");
    }
    const auto* f = dynamic_cast<const placement::FrequencyPredictor*>(loaded->predictor.get());
    if (!f || f->num_layers() != static_cast<int>(moe.size()) || f->num_experts() != c.num_experts)
      return InvalidArgument("predictor file " + o.predictor_path +
                             " is not a frequency predictor of the model's shape (the static policy's counts)");
    for (size_t m = 0; m < moe.size(); ++m) {
      const std::vector<float> p = f->LayerProbs(static_cast<int>(m));
      for (int e = 0; e < c.num_experts; ++e)
        counts[static_cast<size_t>(moe[m]) * c.num_experts + e] = static_cast<int64_t>(p[e] * 1e6f);
    }
    return counts;
  }
  return InvalidArgument(
      "cache.policy static keeps the most used experts and needs routing counts up front: a routing trace, or "
      "predictor.kind frequency with a trained predictor.path");
}

}  // namespace

std::string ExpertCache::DefaultCpuCompute(const runtime::Engine& engine, const ExpertCacheOptions& options) {
  if (options.cpu_compute != "default") return options.cpu_compute;
  const bool hooks = options.tiers.host || options.tiers.peer || options.tiers.computes;
  if (engine.backend().kind() != runtime::BackendKind::kCuda || hooks || options.miss_precision == "auto") return "off";
  const std::vector<int> moe = engine.config().MoeLayers();
  if (moe.empty() || engine.weights().host_expert(moe[0], 0).has_bias()) return "off";
  ExpertCacheOptions o = options;
  o.cpu_compute = "off";
  auto plain = PlanBudget(engine, o);
  // Every expert in a slot (in int8/int4 where not natively) leaves no miss once warm; a host
  // budget below one expert pins none for the host to compute from.
  if (!plain.ok() || plain->slots_per_layer >= plain->num_experts) return "off";
  if (o.host_budget_bytes > 0 && o.host_budget_bytes < plain->slot_bytes) return "off";
  o.cpu_compute = "auto";
  auto split = PlanBudget(engine, o);
  if (!split.ok()) return "whole";
  // Slots sized per layer: the staging area comes out of the layers with the most slots, where one
  // slot fewer costs least; auto while it costs at most one slot of the whole cache.
  if (!plain->layer_slots.empty()) return split->total_slots() + 1 >= plain->total_slots() ? "auto" : "whole";
  return split->slots_per_layer == plain->slots_per_layer ? "auto" : "whole";
}

int64_t CacheBudget::total_slots() const {
  int64_t n = 0;
  for (int l : moe_layers) n += std::min(slots(l), num_experts);
  return n;
}

uint64_t CacheBudget::total_bytes() const {
  uint64_t n = 0;
  for (int l : moe_layers) n += static_cast<uint64_t>(std::min(slots(l), num_experts)) * slot_bytes_of(l);
  return n;
}

StatusOr<CacheBudget> ExpertCache::PlanBudget(const runtime::Engine& engine, const ExpertCacheOptions& options) {
  if (options.cpu_compute == "default") {
    ExpertCacheOptions resolved = options;
    resolved.cpu_compute = DefaultCpuCompute(engine, options);
    return PlanBudget(engine, resolved);
  }
  const ExpertCacheOptions& o = options;
  const runtime::ModelConfig& c = engine.config();
  const runtime::Backend& backend = engine.backend();
  const bool cuda = backend.kind() == runtime::BackendKind::kCuda;
  const int given =
      (o.device_budget_bytes > 0) + (o.device_budget_slots > 0) + (o.slots_per_layer > 0) + (o.experts_percent > 0);
  if (given != 1)
    return InvalidArgument(given == 0 ? "expert cache: no cache.device_budget given"
                                      : "expert cache: give the budget once (bytes, slots, slots per layer or a "
                                        "percentage of the experts)");
  if (o.experts_percent > 100)
    return InvalidArgument("cache.device_budget of " + std::to_string(o.experts_percent) +
                           "% of the experts: at most 100%");
  CacheBudget b;
  b.num_moe_layers = c.num_moe_layers();
  b.moe_layers = c.MoeLayers();
  b.num_experts = c.num_experts;
  b.top_k = c.top_k;
  if (b.num_moe_layers < 1) return InvalidArgument("expert cache: the model has no MoE layer");
  EF_ASSIGN_OR_RETURN(const Precisions precisions, ResolvePrecisions(o));
  const LoadPrecision precision = precisions.precision, high = precisions.high;
  EF_ASSIGN_OR_RETURN(std::vector<uint8_t> low_layers, ResolveLowPrecisionLayers(o.low_precision_layers, c));
  if (precisions.every_layer) low_layers.clear();
  // Slots sized per layer where layers load in different precisions (not under auto, whose slots
  // hold either precision).
  const bool per_layer_sizes =
      !low_layers.empty() && precision != LoadPrecision::kNative && precision != LoadPrecision::kAuto;
  {
    std::vector<size_t> bytes = LayerSlotBytes(engine.weights(), cuda, precision, low_layers, high);
    b.slot_bytes = *std::max_element(bytes.begin(), bytes.end());
    if (per_layer_sizes) b.layer_slot_bytes = std::move(bytes);
  }
  b.device_name = backend.name();
  if (cuda) {
#if EF_HAVE_CUDA_CACHE
    const auto& cb = static_cast<const runtime::CudaBackend&>(backend);
    const size_t in_use = cb.bytes_in_use();
    b.device_bytes = cb.memory_budget() > in_use ? cb.memory_budget() - in_use : 0;
    b.device_name += " (memory budget " + Bytes(cb.memory_budget()) + ", " + Bytes(in_use) + " in use)";
#else
    return Unimplemented("expert cache on " + backend.name() + ": this build has no CUDA expert cache");
#endif
  } else {
    b.device_bytes = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
    b.device_name += " (host memory)";
  }
  const int M = b.num_moe_layers, E = b.num_experts;
  // cache.cpu_compute auto (and split) splits misses through a staging area of half a slot: a budget
  // in bytes pays for it, a budget in slots gets it on top (cuda/pinned_host_compute.h).
  const uint64_t staging = cuda && (o.cpu_compute == "auto" || o.cpu_compute == "split") ? b.slot_bytes / 2 + 1024 : 0;
  // One slot in every MoE layer.
  uint64_t one_each = 0;
  for (int l : b.moe_layers) one_each += b.slot_bytes_of(l);
  uint64_t asked = 0;  // device bytes the budget asks for
  int per_layer = 0;
  if (o.device_budget_bytes > 0) {
    b.requested = Bytes(o.device_budget_bytes);
    asked = o.device_budget_bytes;
    const uint64_t slots_bytes = o.device_budget_bytes > staging ? o.device_budget_bytes - staging : 0;
    per_layer = static_cast<int>(std::min<uint64_t>(slots_bytes / b.slot_bytes / M, 1 << 20));
    {
      // Every MoE layer gets the same bytes; a layer of smaller experts buys more slots with them.
      // Then what is left buys slots for the layers with the fewest (with one slot size, the bytes
      // short of a slot in every layer add up to slots for some), and the staging area comes out
      // of the layers with the most.
      std::vector<int>& q = b.layer_slots;
      q.assign(static_cast<size_t>(c.num_layers), 0);
      uint64_t used = 0;
      for (int l : b.moe_layers) {
        q[l] = static_cast<int>(std::min<uint64_t>(o.device_budget_bytes / M / b.slot_bytes_of(l), E));
        used += static_cast<uint64_t>(q[l]) * b.slot_bytes_of(l);
      }
      while (true) {
        int to = -1;
        for (int l : b.moe_layers)
          if (q[l] < E && used + staging + b.slot_bytes_of(l) <= o.device_budget_bytes && (to < 0 || q[l] < q[to]))
            to = l;
        if (to < 0) break;
        ++q[to];
        used += b.slot_bytes_of(to);
      }
      while (used + staging > o.device_budget_bytes) {
        int from = -1;
        for (int l : b.moe_layers)
          if (q[l] > 0 && (from < 0 || q[l] >= q[from])) from = l;
        if (from < 0) break;
        --q[from];
        used -= b.slot_bytes_of(from);
      }
      per_layer = E;
      for (int l : b.moe_layers) per_layer = std::min(per_layer, q[l]);
      // As many slots in every layer: one count says it.
      if (!per_layer_sizes &&
          std::all_of(b.moe_layers.begin(), b.moe_layers.end(), [&](int l) { return q[l] == per_layer; }))
        q.clear();
    }
  } else if (o.device_budget_slots > 0) {
    b.requested = std::to_string(o.device_budget_slots) + " slots";
    per_layer = o.device_budget_slots / M;
    asked = per_layer_sizes ? static_cast<uint64_t>(std::min(per_layer, E)) * one_each + staging
                            : static_cast<uint64_t>(std::min(o.device_budget_slots, M * E)) * b.slot_bytes + staging;
  } else {
    per_layer = o.slots_per_layer;
    b.requested = std::to_string(o.slots_per_layer) + " slots per layer";
    if (o.experts_percent > 0) {
      per_layer = static_cast<int>(std::lround(o.experts_percent * E / 100.0));
      char pct[32];
      std::snprintf(pct, sizeof pct, "%g%%", o.experts_percent);
      b.requested = std::string(pct) + " of the experts (" + std::to_string(per_layer) + " of " + std::to_string(E) +
                    " slots per layer)";
    }
    asked = static_cast<uint64_t>(std::min(per_layer, E)) * one_each + staging;
  }
  if (asked > b.device_bytes)
    return InvalidArgument("cache.device_budget of " + b.requested + " (" + Bytes(asked) + " of expert slots" +
                           (staging ? " and staging for split misses" : "") + ") is larger than " + b.device_name +
                           " can give them: " + Bytes(b.device_bytes));
  if (per_layer < c.top_k && per_layer_sizes) {
    int fewest = b.moe_layers.front();
    for (int l : b.moe_layers)
      if (b.layer_slots[l] < b.layer_slots[fewest]) fewest = l;
    return InvalidArgument("cache.device_budget of " + b.requested + " gives each of " + std::to_string(M) +
                           " MoE layers " + Bytes((asked > staging ? asked - staging : 0) / M) + ": " +
                           std::to_string(per_layer) + " slots of " + Bytes(b.slot_bytes_of(fewest)) + " in layer " +
                           std::to_string(fewest) + ", fewer than the model's top-k (" + std::to_string(c.top_k) +
                           "); the smallest budget is " + Bytes(static_cast<uint64_t>(c.top_k) * one_each + staging));
  }
  if (per_layer < c.top_k) {
    const int64_t total =
        o.device_budget_slots > 0 ? o.device_budget_slots : static_cast<int64_t>(asked / b.slot_bytes);
    return InvalidArgument("cache.device_budget of " + b.requested + " holds " + std::to_string(total) +
                           " expert slots of " + Bytes(b.slot_bytes) + ", " + std::to_string(per_layer) +
                           " per MoE layer over " + std::to_string(M) + " MoE layers, fewer than the model's top-k (" +
                           std::to_string(c.top_k) + "); the smallest budget is " + std::to_string(c.top_k * M) +
                           " slots (" + Bytes(static_cast<uint64_t>(c.top_k) * M * b.slot_bytes) + ")");
  }
  b.slots_per_layer = std::min(per_layer, E);
  if (per_layer_sizes && b.layer_slots.empty()) {
    b.layer_slots.assign(static_cast<size_t>(c.num_layers), 0);
    for (int l : b.moe_layers) b.layer_slots[l] = b.slots_per_layer;
  }
  if (precision != LoadPrecision::kNative && precision != LoadPrecision::kAuto)
    b.native_fits = static_cast<uint64_t>(SlotBytes(engine.weights(), cuda, LoadPrecision::kNative)) * E * M <= asked;
  return b;
}

StatusOr<std::unique_ptr<ExpertCache>> ExpertCache::Create(runtime::Engine* engine, const ExpertCacheOptions& options) {
  ExpertCacheOptions o = options;
  if (o.cpu_compute == "default") {
    o.cpu_compute = DefaultCpuCompute(*engine, options);
    if (o.cpu_compute != "off")
      EF_LOG(INFO, CACHE, "cache.cpu_compute %s (the default on one CUDA process; off turns it off)",
             o.cpu_compute.c_str());
  }
  const runtime::ModelConfig& c = engine->config();
  if (o.policy == "belady")
    return InvalidArgument(
        "cache.policy belady needs the whole future routing: it is for offline analysis (expertflow replay), not a "
        "running engine");
  {
    PolicyConfig pc;
    pc.num_layers = c.num_layers;
    pc.num_experts = c.num_experts;
    pc.counts.assign(static_cast<size_t>(c.num_layers) * c.num_experts, 0);
    auto p = MakeCachePolicy(o.policy, pc);
    if (!p.ok()) return p.status();
  }
  if (o.prefetch_layers < 0)
    return InvalidArgument("cache.prefetch_layers must be >= 0, got " + std::to_string(o.prefetch_layers));
  // A layer prefetches the MoE layers after it (wrapping into the next step), never itself.
  const int moe_layers = c.num_moe_layers();
  if (o.prefetch_layers >= moe_layers && moe_layers > 0) {
    // The default (2) on a model of one or two MoE layers is cut without a word.
    if (o.prefetch_layers != ExpertCacheOptions{}.prefetch_layers)
      EF_LOG(WARN, CACHE, "cache.prefetch_layers %d: the model has %d MoE layers, so at most %d ahead; using %d",
             o.prefetch_layers, moe_layers, moe_layers - 1, moe_layers - 1);
    o.prefetch_layers = moe_layers - 1;
  }
  if (!(o.prefetch_min_prob >= 0 && o.prefetch_min_prob <= 1))
    return InvalidArgument("cache.prefetch_min_prob must be in [0, 1], got " + std::to_string(o.prefetch_min_prob));
  static const char* kPredictors[] = {"none", "lookahead", "frequency", "path", "affinity", "hybrid"};
  if (std::find(std::begin(kPredictors), std::end(kPredictors), o.predictor) == std::end(kPredictors))
    return InvalidArgument("unknown predictor '" + o.predictor +
                           "' (none, lookahead, frequency, path, affinity, hybrid)");
  if (o.trace) {
    Status s = placement::CheckTraceShape(*o.trace, c.num_moe_layers(), c.num_experts, c.top_k);
    if (!s.ok()) return s.Prepend("routing trace for the expert cache");
  }
  EF_ASSIGN_OR_RETURN(CacheBudget budget, PlanBudget(*engine, o));
  auto cache = std::unique_ptr<ExpertCache>(new ExpertCache());
  cache->engine_ = engine;
  cache->options_ = o;
  cache->budget_ = budget;
  // The precision options first: a mistake in them (a quantized-experts file that does not fit) is
  // reported even when the budget holds every expert and no low-precision copy is ever made.
  PrecisionOptions po;
  EF_ASSIGN_OR_RETURN(const Precisions precisions, ResolvePrecisions(o));
  po.precision = precisions.precision;
  po.high = precisions.high;
  EF_ASSIGN_OR_RETURN(po.low, ParseLoadPrecision(o.low_precision));
  if (po.low != LoadPrecision::kInt8 && po.low != LoadPrecision::kInt4)
    return InvalidArgument("cache.low_precision must be int8 or int4, got '" + o.low_precision + "'");
  if (!(o.low_precision_gate >= 0 && o.low_precision_gate <= 1))
    return InvalidArgument("cache.low_precision_gate must be in [0, 1], got " + std::to_string(o.low_precision_gate));
  if (o.upgrade_uses < 0) return InvalidArgument("cache.upgrade_uses must be >= 0");
  po.low_gate = o.low_precision_gate;
  po.upgrade_uses = o.upgrade_uses;
  EF_ASSIGN_OR_RETURN(po.low_layers, ResolveLowPrecisionLayers(o.low_precision_layers, c));
  if (po.precision == LoadPrecision::kNative && !po.low_layers.empty())
    EF_LOG(WARN, CACHE, "cache.low_precision_layers '%s' has no effect: cache.miss_precision is native",
           o.low_precision_layers.c_str());
  if (precisions.every_layer && !po.low_layers.empty()) {
    EF_LOG(WARN, CACHE,
           "cache.low_precision_layers '%s' has no effect: with cache.high_precision lossless and "
           "cache.miss_precision %s every load is lossless",
           o.low_precision_layers.c_str(), o.miss_precision.c_str());
    po.low_layers.clear();
  }
  if (!o.quantized_experts.empty()) {
    const LoadPrecision low = po.precision == LoadPrecision::kAuto ? po.low : po.precision;
    if (low == LoadPrecision::kNative || low == LoadPrecision::kLossless)
      return InvalidArgument(
          std::string("cache.quantized_experts applies to int8/int4 loads; cache.miss_precision is ") +
          LoadPrecisionName(low));
    EF_ASSIGN_OR_RETURN(po.calibrated, QuantizedExperts::Open(o.quantized_experts, engine->weights()));
    const DType want = low == LoadPrecision::kInt4 ? DType::kQ4 : DType::kQ8;
    if (po.calibrated->dtype() != want)
      return InvalidArgument("cache.quantized_experts " + o.quantized_experts + " holds " +
                             (po.calibrated->dtype() == DType::kQ4 ? "int4" : "int8") + " experts; the cache loads " +
                             LoadPrecisionName(low));
    EF_LOG(INFO, CACHE, "low-precision copies of %d experts from %s (%s)", po.calibrated->num_experts_held(),
           o.quantized_experts.c_str(), po.calibrated->method().c_str());
  }
  if (budget.holds_all()) {
    // Every expert fits: a cache would only add copies.
    EF_RETURN_IF_ERROR(engine->UploadExperts());
    EF_LOG(INFO, CACHE, "%s", cache->Describe().c_str());
    return cache;
  }
  if (engine->experts_resident())
    EF_LOG(WARN, CACHE,
           "expert cache on an engine whose experts are all uploaded already: create it with "
           "EngineOptions::upload_experts = false so the budget bounds expert memory");
  std::vector<int64_t> counts;
  if (o.policy == "static") {
    EF_ASSIGN_OR_RETURN(counts, StaticCounts(c, o));
  }

  const bool cuda = engine->backend().kind() == runtime::BackendKind::kCuda;
  if (o.cpu_compute != "off" && o.cpu_compute != "auto" && o.cpu_compute != "whole" && o.cpu_compute != "on" &&
      o.cpu_compute != "split")
    return InvalidArgument("cache.cpu_compute must be default, off, auto, whole or on, got '" + o.cpu_compute + "'");
  if (!cuda && o.cpu_compute != "off")
    return InvalidArgument("cache.cpu_compute " + o.cpu_compute + " applies to the cuda backend; the " +
                           engine->backend().name() + " backend computes every expert on the host already");
  cache->tiers_ = std::make_unique<ExpertTiers>(&engine->weights(), o.tiers, po);
  CachedExpertSourceOptions so;
  so.slots_per_layer = budget.slots_per_layer;
  so.layer_slots = budget.layer_slots;
  so.layer_slot_bytes = budget.layer_slot_bytes;
  so.policy = o.policy;
  so.prefetch_layers = o.prefetch_layers;
  so.prefetch_min_prob = o.prefetch_min_prob;
  so.static_counts = counts;
  so.tiers = cache->tiers_.get();
  if (cuda) {
#if EF_HAVE_CUDA_CACHE
    // The pinned host tier holds the experts in the load precision; the arena loads from it.
    CudaCacheOptions co;
    co.host_budget_bytes = o.host_budget_bytes;
    co.cpu_compute = o.cpu_compute;
    co.cpu_compute_max_rows = o.cpu_compute_max_rows;
    co.cpu_compute_admit = o.cpu_compute_admit;
    EF_ASSIGN_OR_RETURN(cache->source_, CreateCudaCacheSource(engine->weights(), &engine->backend(), so, co));
    cache->pinned_tier_ = true;
#else
    return Unimplemented("expert cache on " + engine->backend().name() + ": this build has no CUDA expert cache");
#endif
  } else {
    // The host tier of quantized copies, made once (the CUDA source pins its own).
    EF_RETURN_IF_ERROR(cache->tiers_->Prepare(/*progress=*/true));
    EF_ASSIGN_OR_RETURN(cache->source_, CachedExpertSource::Create(engine->weights(), &engine->backend(), so));
  }
  cache->store_ = &cache->source_->store();

  if (o.predictor != "none" && (o.prefetch_layers > 0 || o.policy == "expertflow")) {
    PredictorPrefetcherOptions po;
    po.kind = o.predictor;
    po.path = o.predictor_path;
    po.depth = std::max(1, o.prefetch_layers);
    po.min_prob = o.prefetch_min_prob;
    po.capacity.assign(c.num_layers, 0);
    for (int l = 0; l < c.num_layers; ++l)
      if (c.IsMoeLayer(l)) po.capacity[l] = budget.slots(l);
    po.trace = o.trace;
    ExpertCache* self = cache.get();
    cache->own_.resize(c.num_layers);
    PredictorPrefetcher::ForecastSink forecast;
    if (o.policy == "expertflow")
      forecast = [self](const placement::RoutingForecast& f) { self->store_->SetForecast(f); };
    EF_ASSIGN_OR_RETURN(cache->prefetcher_, PredictorPrefetcher::Create(
                                                engine->weights(), po,
                                                [self](int layer, std::vector<int32_t> e, std::vector<float> need) {
                                                  self->own_[layer] = {need, e};
                                                  self->SetUpcoming(layer, std::move(e), std::move(need));
                                                },
                                                std::move(forecast)));
  }
  engine->SetExpertSource(cache->source_.get());
  if (po.precision == LoadPrecision::kAuto) {
    ExpertTiers* tiers = cache->tiers_.get();
    cache->precision_hook_id_ = engine->AddRoutingHook([tiers](runtime::LayerRouting& r) {
      tiers->OnLayerRouting(r.layer, r.ids, r.weights);
      return Status::Ok();
    });
  }
  if (cache->prefetcher_) {
    if (cache->prefetcher_->needs_router_inputs() && !engine->expose_router_inputs()) {
      engine->set_expose_router_inputs(true);
      cache->exposed_router_inputs_ = true;
    }
    PredictorPrefetcher* p = cache->prefetcher_.get();
    cache->hook_id_ = engine->AddRoutingHook([p](runtime::LayerRouting& r) { return p->OnRouting(r); });
  }
  EF_LOG(INFO, CACHE, "%s", cache->Describe().c_str());
  return cache;
}

ExpertCache::~ExpertCache() {
  if (engine_) {
    if (hook_id_ >= 0) engine_->RemoveRoutingHook(hook_id_);
    if (precision_hook_id_ >= 0) engine_->RemoveRoutingHook(precision_hook_id_);
    if (source_) engine_->SetExpertSource(nullptr);
    if (exposed_router_inputs_) engine_->set_expose_router_inputs(false);
  }
  prefetcher_.reset();
  source_.reset();
  tiers_.reset();
}

std::string ExpertCache::Describe() const {
  const CacheBudget& b = budget_;
  if (!active())
    return "expert cache off: the budget (" + b.requested + ") holds every expert (" + std::to_string(b.num_experts) +
           " per MoE layer), all resident on " + engine_->backend().name();
  char pct[32];
  std::snprintf(pct, sizeof pct, "%.0f%%",
                100.0 * static_cast<double>(b.total_slots()) / (static_cast<double>(b.num_experts) * b.num_moe_layers));
  std::string s;
  if (b.layer_slots.empty()) {
    s = "expert cache: " + std::to_string(b.slots_per_layer) + " of " + std::to_string(b.num_experts) +
        " slots per MoE layer (" + pct + " of the experts; " + std::to_string(b.total_slots()) + " slots x " +
        Bytes(b.slot_bytes) + " = " + Bytes(b.total_bytes()) + " on " + engine_->backend().name() + "), ";
  } else {
    // Slots per layer (and of each layer's size): list the layers by (slots, slot size).
    std::vector<std::pair<std::pair<int, size_t>, std::vector<uint8_t>>> groups;
    for (int l : b.moe_layers) {
      const std::pair<int, size_t> key{b.slots(l), b.slot_bytes_of(l)};
      auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
      if (it == groups.end()) {
        groups.push_back({key, std::vector<uint8_t>(static_cast<size_t>(engine_->config().num_layers), 0)});
        it = groups.end() - 1;
      }
      it->second[static_cast<size_t>(l)] = 1;
    }
    s = "expert cache: ";
    for (size_t i = 0; i < groups.size(); ++i)
      s += (i ? ", " : "") + std::to_string(groups[i].first.first) + " of " + std::to_string(b.num_experts) +
           " slots of " + Bytes(groups[i].first.second) + " in MoE " + DescribeLayers(groups[i].second);
    s += " (" + std::string(pct) + " of the experts; " + std::to_string(b.total_slots()) + " slots, " +
         Bytes(b.total_bytes()) + " on " + engine_->backend().name() + "), ";
  }
  s += "policy " + options_.policy + ", ";
  if (tiers_ && tiers_->precision() == LoadPrecision::kAuto) {
    const PrecisionOptions& p = tiers_->precision_options();
    char a[160];
    if (p.upgrade_uses > 0)
      std::snprintf(a, sizeof a, "misses of gate weight < %.2f load in %s (upgraded after %d uses), ", p.low_gate,
                    LoadPrecisionName(p.low), p.upgrade_uses);
    else
      std::snprintf(a, sizeof a, "misses of gate weight < %.2f load in %s (never upgraded), ", p.low_gate,
                    LoadPrecisionName(p.low));
    s += a;
  } else if (tiers_ && tiers_->precision() != LoadPrecision::kNative) {
    s += std::string("loads in ") + LoadPrecisionName(tiers_->precision()) + ", ";
  }
  const bool packed_high = tiers_ && tiers_->num_packed_high() > 0;
  if (tiers_ && tiers_->num_native_layers() > 0)
    s += "low precision in MoE " + DescribeLayers(tiers_->precision_options().low_layers) + " only (" +
         std::to_string(tiers_->num_native_layers()) +
         (tiers_->num_native_layers() == 1 ? " MoE layer" : " MoE layers") +
         (packed_high ? " lossless), " : " in the checkpoint's dtype), ");
  else if (packed_high)
    s += "full-precision loads lossless, ";
  if (options_.prefetch_layers == 0) {
    s += "no prefetch";
  } else {
    s += "prefetch " + std::to_string(options_.prefetch_layers) + " MoE layer(s) ahead";
    if (options_.prefetch_min_prob > 0) {
      char p[48];
      std::snprintf(p, sizeof p, " (experts forecast >= %.2f)", options_.prefetch_min_prob);
      s += p;
    }
  }
  s += prefetcher_ ? ", predictor " + prefetcher_->description()
                   : (options_.predictor == "none" ? ", no predictor" : std::string());
  if (options_.cpu_compute != "off") {
    s += ", misses of up to " + std::to_string(options_.cpu_compute_max_rows) + " rows shared with the host CPU (" +
         options_.cpu_compute;
    if (options_.cpu_compute == "auto" || options_.cpu_compute == "whole")
      s += options_.cpu_compute_admit > 0
               ? ", popular misses enter the slots at " + std::to_string(options_.cpu_compute_admit) + " uses ahead"
               : ", misses the host takes never enter the slots";
    s += ")";
  }
  return s;
}

std::string ExpertCache::StatsSummary() const {
  if (!active()) return "expert cache off: all experts resident";
  const ExpertStoreStats st = stats();
  const ExpertCounters& t = st.total;
  char buf[512];
  // Experts computed on the host never reach the slots: the hit rate counts them as uses the slots
  // did not serve, as it counts the misses they replace ("misses" stay the slots' own).
  const HostExpertCompute* hc = source_->host_compute();
  const int64_t host_uses = hc ? hc->stats().experts : 0;
  const int64_t uses = t.hits + t.misses + host_uses;
  const std::string on_host = hc ? ", " + std::to_string(host_uses) + " computed on the host" : "";
  std::snprintf(buf, sizeof buf,
                "expert cache: %lld uses, %lld hits, %lld misses%s (hit rate %.3f), %s loaded, prefetch %lld issued / "
                "%lld used / %lld wasted / %lld declined",
                static_cast<long long>(uses), static_cast<long long>(t.hits), static_cast<long long>(t.misses),
                on_host.c_str(), uses ? static_cast<double>(t.hits) / static_cast<double>(uses) : 0.0,
                Bytes(static_cast<uint64_t>(t.bytes_from_host)).c_str(), static_cast<long long>(t.prefetch_issued),
                static_cast<long long>(t.prefetch_used), static_cast<long long>(t.prefetch_wasted),
                static_cast<long long>(t.prefetch_declined));
  std::string s = buf;
  if (!pinned_tier_ && tiers_->precision() != LoadPrecision::kNative) {
    const auto loads = tiers_->loads_by_precision();
    std::snprintf(buf, sizeof buf, "; %lld loads in %s, %lld in the checkpoint's precision%s, %lld upgraded",
                  static_cast<long long>(loads[1]),
                  LoadPrecisionName(tiers_->precision_options().precision == LoadPrecision::kAuto
                                        ? tiers_->precision_options().low
                                        : tiers_->precision()),
                  static_cast<long long>(loads[0]), tiers_->num_packed_high() > 0 ? " (lossless)" : "",
                  static_cast<long long>(t.refills));
    s += buf;
  }
  if (hc) {
    const HostComputeStats& h = hc->stats();
    std::snprintf(buf, sizeof buf,
                  "; on the host: %lld experts (%lld rows, %.1f ms; %lld split with the GPU, %s staged); %lld "
                  "popular misses admitted to the slots",
                  static_cast<long long>(h.experts), static_cast<long long>(h.rows), h.ms,
                  static_cast<long long>(h.split_experts), Bytes(static_cast<uint64_t>(h.staged_bytes)).c_str(),
                  static_cast<long long>(h.admitted));
    s += buf;
  }
  if (tiers_ && (tiers_->hooks().host || tiers_->hooks().peer)) {
    const TierCounters tc = tier_counters();
    std::snprintf(buf, sizeof buf, "; loads from host %lld (%s), peers %lld (%s), checkpoint %lld (%s)",
                  static_cast<long long>(tc.loads[0]), Bytes(static_cast<uint64_t>(tc.bytes[0])).c_str(),
                  static_cast<long long>(tc.loads[1]), Bytes(static_cast<uint64_t>(tc.bytes[1])).c_str(),
                  static_cast<long long>(tc.loads[2]), Bytes(static_cast<uint64_t>(tc.bytes[2])).c_str());
    s += buf;
  }
  if (prefetcher_ && prefetcher_->forecast_chosen() > 0) {
    std::snprintf(buf, sizeof buf, ", forecast recall %.3f", prefetcher_->forecast_recall());
    s += buf;
  }
  return s;
}

ExpertStoreStats ExpertCache::stats() const {
  if (store_) return store_->stats();
  ExpertStoreStats s;
  s.num_layers = engine_->config().num_layers;
  s.num_experts = engine_->config().num_experts;
  s.per_expert.assign(static_cast<size_t>(s.num_layers) * s.num_experts, {});
  return s;
}

TierCounters ExpertCache::tier_counters() const {
  if (!store_ || !tiers_) return {};
  TierCounters t = tiers_->counters();
  if (pinned_tier_) {
    // The pinned host tier loads through the arena, not the tiers: the loads the tiers did not
    // serve are host loads.
    // Layers may load different sizes (cache.low_precision_layers): loads counted layer by layer;
    // the host's share of the packed bytes is the layers' mix (exact when every load is a host
    // load, as on one process).
    const ExpertStoreStats st = store_->stats();
    const SlotLayout layout = SlotLayout::OfModel(kDeviceSlotAlignment, engine_->weights(), tiers_.get());
    int64_t loads = 0, packed = 0;
    for (int l : engine_->config().MoeLayers()) {
      const int64_t n = st.Layer(l).bytes_from_host / static_cast<int64_t>(layout.Bytes(l, 0));
      loads += n;
      packed += n * static_cast<int64_t>(tiers_->Layout(l, 0).bytes());
    }
    const int64_t host = std::max<int64_t>(0, loads - t.loads[1] - t.loads[2]);
    t.loads[0] = host;
    t.bytes[0] = loads > 0 ? static_cast<int64_t>(static_cast<double>(packed) * host / loads) : 0;
  }
  return t;
}

nlohmann::json ExpertCache::StatsJson() const {
  nlohmann::json j = {{"active", active()}};
  if (!active()) return j;
  const ExpertStoreStats st = stats();
  const ExpertCounters& c = st.total;
  const TierCounters t = tier_counters();
  j["slots_per_layer"] = budget_.slots_per_layer;
  if (!budget_.layer_slots.empty()) {
    nlohmann::json per = nlohmann::json::array();
    for (int l : budget_.moe_layers) per.push_back(budget_.slots(l));
    j["slots_per_moe_layer"] = per;  // slots sized per layer: the slots of each MoE layer in order
  }
  j["precision"] = tiers_ ? LoadPrecisionName(tiers_->precision()) : "native";
  j["refills"] = c.refills;
  if (!pinned_tier_) {
    const auto loads = tiers_->loads_by_precision(), bytes = tiers_->bytes_by_precision();
    j["native_loads"] = loads[0];
    j["native_bytes"] = bytes[0];
    j["low_precision_loads"] = loads[1];
    j["low_precision_bytes"] = bytes[1];
  }
  j["accesses"] = c.hits + c.misses;
  j["hits"] = c.hits;
  j["misses"] = c.misses;
  j["prefetch_issued"] = c.prefetch_issued;
  j["prefetch_used"] = c.prefetch_used;
  j["prefetch_wasted"] = c.prefetch_wasted;
  j["prefetch_declined"] = c.prefetch_declined;
  j["bytes_loaded"] = c.bytes_from_host;
  for (int i = 0; i < kNumTiers; ++i) {
    const std::string name = TierName(static_cast<Tier>(i));
    j[name + "_loads"] = t.loads[i];
    j[name + "_bytes"] = t.bytes[i];
  }
  j["cpu_compute"] = options_.cpu_compute;
  if (const HostExpertCompute* hc = source_->host_compute()) {
    const HostComputeStats& h = hc->stats();
    j["cpu_computed_experts"] = h.experts;
    j["cpu_computed_rows"] = h.rows;
    j["cpu_compute_ms"] = h.ms;
    j["split_experts"] = h.split_experts;
    j["split_copied_fraction"] = h.split_experts ? h.split_copied / static_cast<double>(h.split_experts) : 0.0;
    j["split_staged_bytes"] = h.staged_bytes;
    j["cpu_compute_admitted"] = h.admitted;
  }
  return j;
}

void ExpertCache::ResetStats() {
  if (!store_) return;
  store_->ResetCounters();
  if (tiers_) tiers_->ResetCounters();
  if (HostExpertCompute* hc = source_->host_compute()) hc->ResetStats();
  if (prefetcher_) prefetcher_->ResetStats();
}

void ExpertCache::SetUpcoming(int layer, std::vector<int32_t> experts, std::vector<float> need) {
  // Under expert parallelism this rank loads only the experts it computes.
  if (tiers_ && tiers_->hooks().computes)
    std::erase_if(experts, [&](int32_t e) { return !tiers_->Computes(layer, e); });
  if (source_) source_->SetUpcoming(layer, std::move(experts), std::move(need));
}

bool ExpertCache::OwnForecast(int layer, std::span<float> need, std::vector<int32_t>* listed) const {
  if (layer < 0 || static_cast<size_t>(layer) >= own_.size()) return false;
  const Forecast& f = own_[layer];
  if (f.need.size() != need.size()) return false;  // none made yet
  std::copy(f.need.begin(), f.need.end(), need.begin());
  *listed = f.listed;
  return true;
}

void ExpertCache::SharedForecast(int layer, std::span<const float> need, std::span<const int32_t> listed) {
  if (!source_ || layer < 0 || layer >= engine_->config().num_layers) return;
  // `listed` holds only experts whose rows come here (the executor filtered it by the placement,
  // per sending rank); SetUpcoming's filter (what this rank computes for its own tokens) would
  // drop experts it computes for others as a replica.
  std::vector<int32_t> experts;
  for (int32_t e : listed)
    if (e >= 0 && static_cast<size_t>(e) < need.size() && need[e] >= options_.prefetch_min_prob) experts.push_back(e);
  if (static_cast<int>(experts.size()) > budget_.slots(layer))
    experts.resize(static_cast<size_t>(budget_.slots(layer)));
  source_->SetUpcoming(layer, std::move(experts), std::vector<float>(need.begin(), need.end()));
}

void ExpertCache::ComputesNothing(int layer) {
  if (source_) source_->PrefetchAfter(layer);
}

}  // namespace ef::cache
