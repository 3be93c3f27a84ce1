#include "launch/expert_cache_setup.h"

#include <cstdio>
#include <string>

#include "runtime/core/logging.h"

namespace ef::launch {

bool WantsExpertCache(const CacheSection& cache) { return cache.has_device_budget(); }

void WarnIfCacheSettingsWithoutEffect(const CacheSection& cache) {
  if (WantsExpertCache(cache)) return;
  // Every expert resident: say so rather than run as if the settings had been applied (e.g.
  // --miss-precision int8 expecting fewer bytes).
  const std::string set = CacheSettingsWithoutEffect(cache);
  if (!set.empty())
    EF_LOG(WARN, CACHE, "%s %s no effect without cache.device_budget (--cache-device-budget): every expert is resident",
           set.c_str(), set.find(',') == std::string::npos ? "has" : "have");
}

std::string CacheSettingsWithoutEffect(const CacheSection& cache) {
  const CacheSection d;
  std::string s;
  const auto add = [&s](bool differs, const char* key) {
    if (differs) s += (s.empty() ? "" : ", ") + std::string(key);
  };
  add(cache.host_budget != d.host_budget, "cache.host_budget");
  add(cache.policy != d.policy, "cache.policy");
  add(cache.prefetch_layers != d.prefetch_layers, "cache.prefetch_layers");
  add(cache.prefetch_min_prob != d.prefetch_min_prob, "cache.prefetch_min_prob");
  add(cache.miss_precision != d.miss_precision, "cache.miss_precision");
  add(cache.low_precision != d.low_precision, "cache.low_precision");
  add(cache.low_precision_gate != d.low_precision_gate, "cache.low_precision_gate");
  add(cache.upgrade_uses != d.upgrade_uses, "cache.upgrade_uses");
  add(cache.low_precision_layers != d.low_precision_layers, "cache.low_precision_layers");
  add(cache.high_precision != d.high_precision, "cache.high_precision");
  add(!cache.quantized_experts.empty(), "cache.quantized_experts");
  add(cache.cpu_compute != d.cpu_compute, "cache.cpu_compute");
  add(cache.cpu_compute_max_rows != d.cpu_compute_max_rows, "cache.cpu_compute_max_rows");
  add(cache.cpu_compute_admit != d.cpu_compute_admit, "cache.cpu_compute_admit");
  return s;
}

cache::ExpertCacheOptions ToExpertCacheOptions(const CacheSection& cache, const PredictorSection& predictor,
                                               const placement::RoutingTrace* trace) {
  cache::ExpertCacheOptions o;
  o.device_budget_bytes = cache.device_budget;
  o.device_budget_slots = cache.device_slots;
  o.slots_per_layer = cache.device_slots_per_layer;
  o.experts_percent = cache.device_experts_percent;
  o.host_budget_bytes = cache.host_budget;
  o.policy = cache.policy;
  o.prefetch_layers = cache.prefetch_layers;
  o.prefetch_min_prob = cache.prefetch_min_prob;
  o.miss_precision = cache.miss_precision;
  o.low_precision = cache.low_precision;
  o.low_precision_gate = cache.low_precision_gate;
  o.upgrade_uses = cache.upgrade_uses;
  o.low_precision_layers = cache.low_precision_layers;
  o.high_precision = cache.high_precision;
  o.quantized_experts = cache.quantized_experts;
  o.cpu_compute = cache.cpu_compute;
  o.cpu_compute_max_rows = cache.cpu_compute_max_rows;
  o.cpu_compute_admit = cache.cpu_compute_admit;
  o.predictor = predictor.kind;
  o.predictor_path = predictor.path;
  o.trace = trace;
  return o;
}

cache::TierHooks ClusterTierHooks(comm::Cluster* cluster, int rank) {
  cache::TierHooks h;
  if (!cluster) return h;
  const comm::ExpertPlacement* placement = &cluster->placement();
  h.computes = [placement, rank](int l, int e) { return placement->ComputeRank(l, e, rank) == rank; };
  if (comm::PeerExpertSource* peer = cluster->peer()) {
    h.host = [peer](int l, int e) { return peer->HostCopy(l, e); };
    h.peer = [peer](int l, int e, std::span<std::byte> dst) { return peer->Fetch(l, e, dst); };
  }
  return h;
}

namespace {

// A rank's cache error, prefixed with the rank; one about the budget also says that the budget is
// each rank's own (other errors, e.g. a bad low_precision_layers, do not depend on the rank count).
Status OnRank(Status s, int rank) {
  const bool budget = s.message().find("cache.device_budget") != std::string::npos;
  s.Prepend("rank " + std::to_string(rank) + (budget ? " (cache.device_budget is per rank)" : ""));
  return s;
}

}  // namespace

Status CheckExpertCacheBudget(const runtime::Engine& engine, const CacheSection& cache, bool per_rank, int rank) {
  if (!WantsExpertCache(cache)) return Status::Ok();
  cache::ExpertCacheOptions o = ToExpertCacheOptions(cache, PredictorSection{});
  // Under expert parallelism (the ranks' tier hooks, not set here) the default is off.
  if (per_rank && o.cpu_compute == "default") o.cpu_compute = "off";
  auto budget = cache::ExpertCache::PlanBudget(engine, o);
  if (budget.ok()) return Status::Ok();
  return per_rank ? OnRank(budget.status(), rank) : budget.status();
}

StatusOr<std::unique_ptr<cache::ExpertCache>> SetUpExpertCache(runtime::Engine* engine, const CacheSection& cache,
                                                               const PredictorSection& predictor,
                                                               const placement::RoutingTrace* trace,
                                                               comm::Cluster* cluster, int rank) {
  if (!WantsExpertCache(cache)) return std::unique_ptr<cache::ExpertCache>();
  cache::ExpertCacheOptions o = ToExpertCacheOptions(cache, predictor, trace);
  // auto decides a load's precision from the gate weights of this rank's tokens; under expert
  // parallelism a rank also computes other ranks' tokens, whose weights it does not see.
  if (cluster && cache.miss_precision == "auto")
    return InvalidArgument(
        "cache.miss_precision auto runs on one process for now (a rank does not see the gate weights of the other "
        "ranks' tokens it computes); under mpirun use native, int8 or int4");
  o.tiers = ClusterTierHooks(cluster, rank);
  auto c = cache::ExpertCache::Create(engine, o);
  if (!c.ok() && cluster) return OnRank(c.status(), rank);
  return c;
}

}  // namespace ef::launch
