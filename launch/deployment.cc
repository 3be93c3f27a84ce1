#include "launch/deployment.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "launch/expert_cache_setup.h"
#include "runtime/core/logging.h"

namespace ef::launch {

DeploymentOptions MakeDeploymentOptions(const ModelFlags& model, const ClusterFlags& cluster) {
  DeploymentOptions o;
  o.model_dir = model.dir;
  o.model_dtype = cluster.config.model.dtype;
  o.engine = model.ToEngineOptions();
  o.cache = cluster.config.cache;
  o.predictor = cluster.config.predictor;
  o.cluster = cluster.cluster;
  o.cluster_on_one_rank = true;
  return o;
}

namespace {
Status DtypeMismatch(const std::string& want, const std::string& have, const std::string& from) {
  return InvalidArgument("model.dtype " + want + ": the checkpoint's weights are " + have + " (" + from +
                         "), and weights are computed in the checkpoint's dtype (no cast at load); set model.dtype to "
                         "auto or " +
                         have);
}

// model.dtype against config.json's torch_dtype (or dtype), before anything loads. Returns whether
// config.json named one; where it does not, CheckLoadedDtype checks the loaded weights.
StatusOr<bool> CheckConfigDtype(const std::string& want, const std::string& model_dir) {
  if (want.empty() || want == "auto") return true;
  std::ifstream in(std::filesystem::path(model_dir) / "config.json");
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return false;  // the engine's own load reports a bad config.json
  for (const char* key : {"torch_dtype", "dtype"}) {
    if (!j.contains(key) || !j[key].is_string()) continue;
    const std::string v = j[key].get<std::string>();
    const std::string have = v == "bfloat16" ? "bf16" : v == "float16" ? "f16" : v == "float32" ? "f32" : v;
    if (have != want) return DtypeMismatch(want, have, std::string("config.json ") + key + " " + v);
    return true;
  }
  return false;
}

// model.dtype against the loaded dense weights (the embedding's dtype, also for checkpoints whose
// experts are quantized).
Status CheckLoadedDtype(const std::string& want, const runtime::ModelWeights& w) {
  const DType dt = w.embed().dtype;
  const std::string have = dt == DType::kBF16  ? "bf16"
                           : dt == DType::kF16 ? "f16"
                           : dt == DType::kF32 ? "f32"
                                               : DTypeName(dt);
  return have == want ? Status::Ok() : DtypeMismatch(want, have, "its embedding");
}
}  // namespace

StatusOr<std::unique_ptr<Deployment>> Deployment::Create(comm::MpiContext* ctx, const DeploymentOptions& o) {
  // A placement file that is not there is an error in one process too (where it would only be
  // found under mpirun), before the model loads.
  const std::string& placement = o.cluster.placement.placement;
  std::error_code ec;
  if (placement != "contiguous" && placement != "round_robin" && !std::filesystem::is_regular_file(placement, ec))
    return NotFound("cluster.placement (--placement) '" + placement +
                    "': neither contiguous, round_robin nor an existing placement file");
  auto d = std::unique_ptr<Deployment>(new Deployment());
  d->ctx_ = ctx;
  const bool want_cache = WantsExpertCache(o.cache);
  if (!ctx || ctx->rank() == 0) WarnIfCacheSettingsWithoutEffect(o.cache);
  EF_ASSIGN_OR_RETURN(const bool dtype_checked, CheckConfigDtype(o.model_dtype, o.model_dir));
  runtime::EngineOptions eo = o.engine;
  eo.upload_experts = !want_cache;  // the cache uploads what its budget holds
  EF_ASSIGN_OR_RETURN(d->engine_, runtime::Engine::Create(o.model_dir, eo));
  if (!dtype_checked) EF_RETURN_IF_ERROR(CheckLoadedDtype(o.model_dtype, d->engine_->weights()));
  const bool clustered = ctx && ctx->mpi() && (ctx->size() > 1 || o.cluster_on_one_rank);
  if (o.warmup_tokens > 0 && !want_cache && !clustered && d->engine_->backend().kind() == runtime::BackendKind::kCuda) {
    EF_ASSIGN_OR_RETURN(const double s, d->engine_->WarmUp(o.warmup_tokens));
    EF_LOG(INFO, SERVE, "engine warmed up in %.0f ms (a prefill of up to %d tokens and a decode step)", s * 1e3,
           o.warmup_tokens);
  }
  if (o.on_engine) EF_RETURN_IF_ERROR(o.on_engine(*d->engine_));
  // Loading, filling host shards, pinning and quantizing take unequal time on different ranks: the
  // collectives around them wait longer than a step's exchange may.
  auto long_barrier = [&](const std::string& what) -> Status {
    if (!clustered || ctx->size() == 1) return Status::Ok();
    const double step_timeout = ctx->timeout_s();
    ctx->set_timeout_s(std::max(step_timeout, 3600.0));
    Status s = ctx->Barrier(what);
    ctx->set_timeout_s(step_timeout);
    return s;
  };
  if (clustered) {
    // A budget the model cannot run with fails on every rank alike. Refused after the barrier and
    // before the cluster connects the ranks, each rank reports it itself: none is still loading or
    // connecting to a peer when the first one aborts the job.
    const Status budget = CheckExpertCacheBudget(*d->engine_, o.cache, /*per_rank=*/true, ctx->rank());
    EF_RETURN_IF_ERROR(long_barrier("every rank's model load"));
    EF_RETURN_IF_ERROR(budget);
    comm::ClusterOptions co = o.cluster;
    co.expert_cache = want_cache;
    co.host_budget_bytes = o.cache.host_budget;
    EF_ASSIGN_OR_RETURN(d->cluster_, comm::Cluster::Create(ctx, d->engine_.get(), co));
  }
  if (want_cache) {
    EF_RETURN_IF_ERROR(d->BuildCache(o));
    EF_RETURN_IF_ERROR(long_barrier("every rank's expert cache set-up"));
    // The cache's first steps load kernels, plan GEMMs, start the host's threads: done here, not in
    // the first request. What the slots hold afterwards stays, as after any earlier request.
    if (o.warmup_tokens > 0 && !clustered && d->engine_->backend().kind() == runtime::BackendKind::kCuda &&
        d->cache_->active()) {
      EF_ASSIGN_OR_RETURN(const double s,
                          d->engine_->WarmUp(std::min(o.warmup_tokens, DeploymentOptions::kCacheWarmupTokens)));
      d->cache_->ResetStats();
      EF_LOG(INFO, SERVE, "engine and expert cache warmed up in %.0f ms", s * 1e3);
    }
  }
  return d;
}

Status Deployment::BuildCache(const DeploymentOptions& o) {
  EF_ASSIGN_OR_RETURN(
      auto c, SetUpExpertCache(engine_.get(), o.cache, o.predictor, o.trace, cluster_.get(), ctx_ ? ctx_->rank() : 0));
  cache_ = std::move(c);
  // Every rank shares its cache's forecast with the ranks that compute its tokens' experts (the
  // depth from the configuration, the same on every rank).
  if (cluster_) {
    cluster_->executor().SetForecastShare(
        cache_.get(), cache::ExpertCache::SharedForecastDepth(ToExpertCacheOptions(o.cache, o.predictor)));
    EF_RETURN_IF_ERROR(cluster_->executor().ForecastDepthsAgree());
  }
  if (o.announce && (!ctx_ || ctx_->rank() == 0)) {
    std::string line = cache_->Describe();
    if (cluster_) line += ", on each of " + std::to_string(ctx_->size()) + " ranks";
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  return Status::Ok();
}

Deployment::~Deployment() {
  if (cluster_) cluster_->executor().set_forecast_share(nullptr);
  cache_.reset();    // detaches its source and hook from the engine; its tiers read the cluster's shard
  cluster_.reset();  // detaches the executor
  engine_.reset();
}

nlohmann::json Deployment::CacheStats() const {
  if (!cache_) return {{"active", false}};
  return cache_->StatsJson();
}

StatusOr<nlohmann::json> Deployment::Finish() {
  if (finished_) return FailedPrecondition("deployment: Finish called twice");
  finished_ = true;
  if (!cluster_) {
    nlohmann::json me = {{"expert_cache", CacheStats()}};
    me["rank"] = 0;
    return nlohmann::json{{"world_size", 1}, {"ranks", nlohmann::json::array({me})}};
  }
  EF_RETURN_IF_ERROR(cluster_->Drain());
  return GatherAndShutdown();
}

StatusOr<nlohmann::json> Deployment::GatherAndShutdown() {
  finished_ = true;
  if (!cluster_) return nlohmann::json();
  EF_ASSIGN_OR_RETURN(nlohmann::json stats, cluster_->GatherStats({{"expert_cache", CacheStats()}}));
  EF_RETURN_IF_ERROR(cluster_->Shutdown());
  return stats;
}

void Deployment::PrintCacheSummary() const {
  if (!cache_ || !cache_->active()) return;
  if (cluster_) {
    std::fprintf(stderr, "rank %d: %s\n", ctx_->rank(), cache_->StatsSummary().c_str());
  } else {
    std::fprintf(stderr, "%s\n", cache_->StatsSummary().c_str());
  }
}

}  // namespace ef::launch
