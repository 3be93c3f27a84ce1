// ExpertCache: a bounded expert cache wired into an engine, for the normal commands (generate,
// serve, score, bench). From a memory budget, a policy and a predictor it builds the engine's
// ExpertSource, a CachedExpertSource over the parts that fit the engine's backend (on CUDA device
// slots, every expert in pinned host memory, copy streams: cuda/cuda_cache_source.h; on the CPU
// backend a capacity-limited host arena), sets it as the engine's expert source and installs a
// routing hook (PredictorPrefetcher) that forecasts the next layers' experts for the cache's
// prefetch.
//
//   runtime::EngineOptions eo;  eo.upload_experts = false;       // the model may exceed the device
//   EF_ASSIGN_OR_RETURN(auto engine, runtime::Engine::Create(dir, eo));
//   ExpertCacheOptions o;  o.slots_per_layer = 4;  o.policy = "lru";  o.predictor = "lookahead";
//   EF_ASSIGN_OR_RETURN(auto cache, ExpertCache::Create(engine.get(), o));
//   ... engine->Forward(...) ...;  cache->stats();
//   cache.reset();                                               // before the engine goes
//
// Budget: exactly one of device_budget_bytes (bytes of expert slots), device_budget_slots (expert
// slots in total), slots_per_layer or experts_percent (of each MoE layer's experts). Slots are per MoE layer (every MoE
// layer gets the same number: total slots / MoE layers, rounded down). Errors name both numbers: a budget whose
// per-layer share is below the model's top-k, a budget larger than the device can give experts.
// Under cache.low_precision_layers (int8/int4 loads in some MoE layers only) each layer's slots are
// its experts' size, and a budget in bytes gives every MoE layer the same bytes: a layer of int8
// experts holds about twice as many slots as one in the checkpoint's dtype (CacheBudget::layer_slots).
// A budget that holds every expert in the checkpoint's precision runs no cache: the experts are
// uploaded (Engine::UploadExperts) and active() is false. One that holds them all only in the int8 or
// int4 slots miss_precision asks for keeps the cache on, every expert in a low-precision slot.
//
// Ownership and lifetime: the engine keeps pointers to the source and the hook; the ExpertCache
// detaches both on destruction and must be destroyed before the engine (its slots are backend
// memory). Add the routing hooks whose rewrites the cache must see (a trace override) before
// Create: hooks run in the order added. stats() may be called from any thread; everything else
// from the thread that drives the engine.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cache/cached_expert_source.h"
#include "cache/expert_store.h"
#include "cache/expert_tiers.h"
#include "cache/predictor_prefetcher.h"
#include "placement/routing_trace.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/forecast_share.h"

namespace ef::cache {

struct ExpertCacheOptions {
  // Device budget, exactly one > 0 (see the file comment).
  uint64_t device_budget_bytes = 0;
  int device_budget_slots = 0;
  int slots_per_layer = 0;
  double experts_percent = 0;  // (0, 100]: that share of each MoE layer's experts, rounded to nearest
  // CUDA: bytes of pinned host memory for experts; 0: every expert pinned. Experts past it are
  // copied from the checkpoint mapping when needed (pageable, synchronous: slower).
  uint64_t host_budget_bytes = 0;
  std::string policy = "expertflow";  // lru | lfu | expertflow | static (belady is offline only)
  int prefetch_layers = 2;            // MoE layers ahead the cache prefetches; 0: on demand only
  // Prefetch only experts forecast at least this probable (PredictorPrefetcherOptions::min_prob;
  // 0: every forecast expert; the configuration's cache.prefetch_min_prob defaults to 0.9).
  double prefetch_min_prob = 0;
  // Forecast for prefetch and the expertflow policy: none | lookahead | frequency | path | affinity
  // | hybrid (PredictorPrefetcher); predictor_path: a trained predictor file.
  std::string predictor = "frequency";
  std::string predictor_path;
  // Optional routing trace (e.g. the benchmark's routing override): its shape must match the
  // model; `frequency` without a file is fitted on it and `static` counts its routing.
  const placement::RoutingTrace* trace = nullptr;
  // The precision experts are loaded into slots in: native (the checkpoint's; outputs unchanged),
  // lossless (bf16 packed bit-exactly: 1.32x fewer bytes per load), int8 or int4 (group-quantized
  // copies made at load: 1.9x / 3.6x fewer bytes per load than bf16; cache/expert_tiers.h). A budget
  // in bytes then holds more slots.
  std::string miss_precision = "native";  // native | lossless | int8 | int4 | auto (PrecisionOptions)
  std::string low_precision = "int8";     // auto: the low precision (int8 | int4)
  double low_precision_gate = 0.5;        // auto: gate weight below which a miss loads low
  int upgrade_uses = 16;                  // auto: uses before a low-precision copy is upgraded; 0: never
  // The MoE layers whose loads may be low precision (int8, int4, auto's low): all, "last P%", or
  // decoder layer ranges "A-B,C" (ParseLowPrecisionLayers); the others load in the checkpoint's
  // dtype, and every slot is sized for the largest. Early layers are the sensitive ones.
  std::string low_precision_layers = "all";
  // How loads in the checkpoint's precision move (the layers outside low_precision_layers, experts
  // the low precision cannot take): native (its bytes) or lossless (bf16 packed bit-exactly, 0.756x
  // the bytes). With miss_precision native, lossless makes every load lossless; not with auto.
  std::string high_precision = "native";
  // A file of experts quantized ahead of time (`expertflow quantize`: GPTQ over calibration text,
  // cache/quantized_experts.h) in the low precision; its blocks replace rounding to nearest.
  std::string quantized_experts;
  // CUDA: compute missed experts of few rows on the host CPU from their pinned copies instead of
  // copying them: off | auto (each miss to whichever of copy or host finishes it first, one split
  // between them) | whole (no split) | on (every eligible miss on the host) | split (tests).
  // cache/cuda/pinned_host_compute.h. default: what DefaultCpuCompute says for the engine (the
  // config's default); a value given explicitly is checked (auto on the cpu backend is an error).
  std::string cpu_compute = "off";
  int cpu_compute_max_rows = 4;
  // auto and whole: a miss the host could take, used in at least this many more steps than the
  // least used resident expert its step does not need, is loaded into that expert's slot (one per
  // layer and step; 0: misses the host takes never enter the slots). host_share_plan.h.
  int cpu_compute_admit = 3;
  // Under expert parallelism, the tiers behind the device slots (this rank's host shard, peers,
  // the checkpoint) and the experts this rank computes; unset hooks: one process (expert_tiers.h).
  TierHooks tiers;
};

// What a budget comes to on an engine (ExpertCache::PlanBudget).
struct CacheBudget {
  size_t slot_bytes = 0;  // device bytes of one slot (the largest expert, aligned)
  int num_moe_layers = 0;
  std::vector<int> moe_layers;  // their decoder layer indices
  int num_experts = 0;
  int top_k = 0;
  int slots_per_layer = 0;  // min(share, num_experts); the fewest of any MoE layer when they differ
  // Slots sized per layer (cache.low_precision_layers with int8/int4 loads), per decoder layer (0
  // for dense layers): the bytes of one slot and the slots of each layer. Empty: every slot is
  // slot_bytes and every MoE layer holds slots_per_layer.
  std::vector<size_t> layer_slot_bytes;
  std::vector<int> layer_slots;
  int slots(int layer) const { return layer_slots.empty() ? slots_per_layer : layer_slots[layer]; }
  size_t slot_bytes_of(int layer) const { return layer_slot_bytes.empty() ? slot_bytes : layer_slot_bytes[layer]; }
  int64_t total_slots() const;
  uint64_t total_bytes() const;  // of the slots
  size_t device_bytes = 0;       // what the backend can give expert slots
  std::string device_name;       // "cpu", "cuda:0 (NVIDIA H200)"
  std::string requested;         // the budget as given: "2.00 GiB", "24 slots", "3 slots per layer"
  // Whether the experts in the checkpoint's precision fit what the budget asks for. A budget that
  // holds every expert only in int8/int4 keeps the cache on (every expert in a low-precision slot):
  // turning it off would upload them all in the checkpoint's precision, over the budget.
  bool native_fits = true;
  bool holds_all() const { return slots_per_layer >= num_experts && native_fits; }
};

class ExpertCache final : public runtime::ForecastShare {
 public:
  static StatusOr<std::unique_ptr<ExpertCache>> Create(runtime::Engine* engine, const ExpertCacheOptions& options);
  // The budget checks alone (no allocation).
  static StatusOr<CacheBudget> PlanBudget(const runtime::Engine& engine, const ExpertCacheOptions& options);
  // What cpu_compute "default" comes to (any other value: itself): auto where it applies and pays,
  // off elsewhere. auto on one process (no tier hooks: under expert parallelism no deployment has
  // measured it yet) on the CUDA backend, for experts without biases, with loads not chosen per
  // miss (miss_precision auto runs on the cpu backend), when the budget leaves misses and the host
  // budget pins at least one expert; whole (no split) where auto's staging area would not fit
  // beside the slots or would cost slots (slots sized per layer: more than one of the whole
  // cache, taken from the layers with the most); off where the budget itself fails, so that its error
  // names the budget alone.
  static std::string DefaultCpuCompute(const runtime::Engine& engine, const ExpertCacheOptions& options);
  ~ExpertCache();
  ExpertCache(const ExpertCache&) = delete;
  ExpertCache& operator=(const ExpertCache&) = delete;

  // False when the budget holds every expert (they are resident, no cache runs).
  bool active() const { return store_ != nullptr; }
  const CacheBudget& budget() const { return budget_; }
  // The tiers behind the slots (precision, loads by precision); null when no cache runs.
  const ExpertTiers* tiers() const { return tiers_.get(); }
  const ExpertCacheOptions& options() const { return options_; }
  // One line for logs: slots per layer, share of the experts, policy, predictor, device.
  std::string Describe() const;
  // One line of counters: accesses, hits, misses, hit rate, bytes loaded, prefetches, forecast
  // recall. From the engine's thread (or once it stopped).
  std::string StatsSummary() const;
  // The store's counters per (layer, expert) (layers are decoder layers); empty when inactive.
  // Thread-safe.
  ExpertStoreStats stats() const;
  // Loads and bytes per tier (host, peer, checkpoint); zero when inactive. Thread-safe.
  TierCounters tier_counters() const;
  // This rank's counters as JSON: accesses, hits, misses, prefetches, loads and bytes per tier.
  nlohmann::json StatsJson() const;
  // Zeroes every counter above (store, tiers, host compute, forecast recall) after a warm-up; what
  // the slots hold stays, as after any earlier request, and so does the eviction policy's history
  // (LFU's use counts include the warm-up's).
  void ResetStats();
  // Prefetch accuracy of the predictor (0 / 0 without one).
  const PredictorPrefetcher* prefetcher() const { return prefetcher_.get(); }

  // The experts `layer` will use next (replaces the predictor's list until it runs again): for
  // callers with a forecast of their own, e.g. a benchmark's trace oracle with predictor none.
  // `need`: see CachedExpertSource::SetUpcoming.
  void SetUpcoming(int layer, std::vector<int32_t> experts, std::vector<float> need = {});

  // Under expert parallelism (runtime/engine/forecast_share.h): the MoE layers ahead whose
  // forecasts the ranks share, from the options alone (the same on every rank): prefetch_layers
  // with a predictor, else 0.
  static int SharedForecastDepth(const ExpertCacheOptions& o) { return o.predictor != "none" ? o.prefetch_layers : 0; }
  // The predictor's last forecast of `layer` from this rank's tokens.
  bool OwnForecast(int layer, std::span<float> need, std::vector<int32_t>* listed) const override;
  // Other ranks' forecasts with this one's, of the experts whose rows come to this rank: replaces
  // the layer's prefetch list (those at least prefetch_min_prob needed, as many as the layer's slots).
  void SharedForecast(int layer, std::span<const float> need, std::span<const int32_t> listed) override;
  void ComputesNothing(int layer) override;
  ExpertStore* store() { return store_; }
  // The source behind the cache (null when inactive).
  CachedExpertSource* source() { return source_.get(); }

 private:
  ExpertCache() = default;

  runtime::Engine* engine_ = nullptr;
  ExpertCacheOptions options_;
  CacheBudget budget_;
  std::unique_ptr<ExpertTiers> tiers_;  // the sources' next tiers (outlives source_)
  std::unique_ptr<CachedExpertSource> source_;
  ExpertStore* store_ = nullptr;  // source_'s
  // CUDA: loads from the pinned host tier go through the arena, not the tiers' counters.
  bool pinned_tier_ = false;
  std::unique_ptr<PredictorPrefetcher> prefetcher_;
  struct Forecast {
    std::vector<float> need;
    std::vector<int32_t> listed;
  };
  std::vector<Forecast> own_;  // [decoder layer]: the predictor's last forecast (OwnForecast)
  int hook_id_ = -1;
  int precision_hook_id_ = -1;          // auto precision: the routing's gate weights
  bool exposed_router_inputs_ = false;  // set by this cache (restored on destruction)
};

}  // namespace ef::cache
