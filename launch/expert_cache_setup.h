// The expert cache for the commands: config sections (cache:, predictor:, after CLI flags) ->
// cache::ExpertCache on an engine (launch/deployment.h builds it for the commands).
//
//   runtime::EngineOptions eo = model.ToEngineOptions();
//   eo.upload_experts = !WantsExpertCache(cfg.cache);   // a model larger than the device loads
//   EF_ASSIGN_OR_RETURN(auto engine, runtime::Engine::Create(dir, eo));
//   engine->AddRoutingHook(trace_override->Hook());     // hooks the cache must see come first
//   EF_ASSIGN_OR_RETURN(auto cache, SetUpExpertCache(engine.get(), cfg.cache, cfg.predictor, &trace));
//   ... cache ? cache->stats() : no cache ...;  cache.reset() before the engine goes.
#pragma once

#include <memory>
#include <string>

#include "cache/expert_cache.h"
#include "comm/cluster.h"
#include "comm/mpi_context.h"
#include "launch/config.h"
#include "placement/routing_trace.h"
#include "runtime/engine/engine.h"

namespace ef::launch {

// True when cache.device_budget is set: create the engine with EngineOptions::upload_experts =
// false, so experts are uploaded only if the budget turns out to hold them all.
bool WantsExpertCache(const CacheSection& cache);

// The cache settings given (differing from their defaults) that do nothing without a device
// budget, comma-separated ("cache.miss_precision, cache.policy"); empty when none.
std::string CacheSettingsWithoutEffect(const CacheSection& cache);
// Without a device budget, a warning naming those settings (the commands call it once).
void WarnIfCacheSettingsWithoutEffect(const CacheSection& cache);

// The sections as cache options (the trace, optional, is not owned and must outlive the cache).
cache::ExpertCacheOptions ToExpertCacheOptions(const CacheSection& cache, const PredictorSection& predictor,
                                               const placement::RoutingTrace* trace = nullptr);

// The tiers behind a rank's expert cache under expert parallelism: the experts this rank computes
// (its placement), its host shard and the peers' shards over UCX (when the cluster keeps shards:
// ClusterOptions::expert_cache). `cluster` null: one process, no hooks. The cluster must outlive
// the cache.
cache::TierHooks ClusterTierHooks(comm::Cluster* cluster, int rank);

// The plan of the budget on `engine` without building the cache (ExpertCache::PlanBudget): the
// budget errors (below one MoE layer's top-k, above the device) before the ranks connect. The
// cache's own set-up checks again against what is free then. `per_rank`: under mpirun, the message
// says the budget is this rank's, as SetUpExpertCache's does.
Status CheckExpertCacheBudget(const runtime::Engine& engine, const CacheSection& cache, bool per_rank, int rank);

// Builds the expert cache the sections describe on `engine` and sets it as the engine's expert
// source (cache::ExpertCache: the CUDA or CPU source, the predictor's routing hook, the counters).
// nullptr when no device budget is given (the engine keeps its experts: all resident). With a
// budget that holds every expert the returned cache is inactive and the experts are uploaded.
// `trace` (optional): the routing trace the engine's routing comes from (benchmarks); its shape
// must match the model; it fits `frequency` without a file and gives `static` its counts.
// Errors: a budget below one layer's top-k or above the device, a bad policy or predictor, a
// predictor file or trace of another shape.
// `cluster` (optional): under mpirun, created before the cache with ClusterOptions::expert_cache;
// the cache then is this rank's (ClusterTierHooks), the budget per rank.
StatusOr<std::unique_ptr<cache::ExpertCache>> SetUpExpertCache(runtime::Engine* engine, const CacheSection& cache,
                                                               const PredictorSection& predictor,
                                                               const placement::RoutingTrace* trace = nullptr,
                                                               comm::Cluster* cluster = nullptr, int rank = 0);

}  // namespace ef::launch
