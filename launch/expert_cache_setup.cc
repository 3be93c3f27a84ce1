#include "launch/expert_cache_setup.h"

#include <cstdio>

namespace ef::launch {

bool WantsExpertCache(const CacheSection& cache) { return cache.has_device_budget(); }

cache::ExpertCacheOptions ToExpertCacheOptions(const CacheSection& cache, const PredictorSection& predictor,
                                               const placement::RoutingTrace* trace) {
  cache::ExpertCacheOptions o;
  o.device_budget_bytes = cache.device_budget;
  o.device_budget_slots = cache.device_slots;
  o.slots_per_layer = cache.device_slots_per_layer;
  o.host_budget_bytes = cache.host_budget;
  o.policy = cache.policy;
  o.prefetch_layers = cache.prefetch_layers;
  o.prefetch_min_prob = cache.prefetch_min_prob;
  o.predictor = predictor.kind;
  o.predictor_path = predictor.path;
  o.trace = trace;
  return o;
}

StatusOr<std::unique_ptr<cache::ExpertCache>> SetUpExpertCache(runtime::Engine* engine, const CacheSection& cache,
                                                               const PredictorSection& predictor,
                                                               const placement::RoutingTrace* trace) {
  if (!WantsExpertCache(cache)) return std::unique_ptr<cache::ExpertCache>();
  return cache::ExpertCache::Create(engine, ToExpertCacheOptions(cache, predictor, trace));
}

StatusOr<std::unique_ptr<cache::ExpertCache>> SetUpCommandExpertCache(runtime::Engine* engine, const Config& config,
                                                                      comm::MpiContext* ctx) {
  if (!WantsExpertCache(config.cache)) return std::unique_ptr<cache::ExpertCache>();
  const cache::ExpertCacheOptions o = ToExpertCacheOptions(config.cache, config.predictor);
  if (ctx && ctx->mpi()) {
    // Checked before anything is allocated, identically on every rank.
    EF_ASSIGN_OR_RETURN(cache::CacheBudget plan, cache::ExpertCache::PlanBudget(*engine, o));
    if (!plan.holds_all())
      return FailedPrecondition(
          "cache.device_budget " + plan.requested + " gives " + std::to_string(plan.slots_per_layer) + " of " +
          std::to_string(plan.num_experts) +
          " expert slots per MoE layer, and a bounded expert cache does not combine with expert parallelism under "
          "mpirun yet; run one process (no mpirun) with the cache, or give a budget that holds every expert (" +
          std::to_string(plan.num_experts) + " slots per layer)");
  }
  EF_ASSIGN_OR_RETURN(auto c, cache::ExpertCache::Create(engine, o));
  if (!ctx || ctx->rank() == 0) std::fprintf(stderr, "%s\n", c->Describe().c_str());
  return c;
}

}  // namespace ef::launch
