// Deployment: this process's part of a deployment, built in the order its parts depend on each
// other and torn down in reverse. Every command that runs a model (generate, score, serve, bench)
// builds one; no part patches another after the fact.
//
//   1. engine   (runtime/)  the model on its backend; experts are not uploaded when an expert cache
//               will serve them (a model larger than the device still loads);
//   2. hooks    routing hooks the cache must see first (a benchmark's trace override);
//   3. cluster  (comm/)     under mpirun: the token exchange (NCCL or MPI), the expert placement,
//               every rank's host shard of the experts it is home for (UCX-registered), the
//               expert-parallel executor;
//   4. cache    (cache/)    with cache.device_budget, per rank: device slots backed by the tiers
//               host shard -> peer ranks' shards (UCX get) -> checkpoint mapping, and the
//               predictor's prefetch of the experts this rank computes.
//
// One decode step through the folders: the serving loop (launch/server, scheduler/) picks the
// running sequences and calls Engine::Forward. Per decoder layer the engine runs attention on this
// rank's sequences, then the router (the truth) and the routing hooks; the prefetcher (cache/)
// forecasts the next layers from that routing and queues their loads. The MoE executor (comm/)
// sends each (token, expert) row to the rank that computes the expert (all-to-all-v); that rank's
// cache acquires the expert (a hit, or a load from the nearest tier) and computes the rows; the
// results come back and are added in increasing expert id, so outputs do not depend on the rank
// count, the budget or the tier an expert came from.
//
// Thread safety: build and destroy on one thread; the parts' own contracts hold in between.
#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "cache/expert_cache.h"
#include "comm/cluster.h"
#include "comm/mpi_context.h"
#include "launch/config.h"
#include "launch/engine_options.h"
#include "placement/routing_trace.h"
#include "runtime/engine/engine.h"

namespace ef::launch {

struct DeploymentOptions {
  std::string model_dir;
  runtime::EngineOptions engine;  // upload_experts is decided from the cache section
  CacheSection cache;
  PredictorSection predictor;
  comm::ClusterOptions cluster;
  // Create the cluster (expert parallelism): under mpirun with more than one rank, or whenever
  // `cluster_on_one_rank` (commands whose one-rank mpirun run should still exercise the cluster).
  bool cluster_on_one_rank = false;
  // Called once the engine exists, before the cluster and the cache: routing hooks the cache must
  // see (hooks run in the order added) and checks against the model.
  std::function<Status(runtime::Engine&)> on_engine;
  // A routing trace the cache may fit its forecast on (not owned; must outlive the deployment).
  const placement::RoutingTrace* trace = nullptr;
  bool announce = true;  // rank 0 prints the effective cache on stderr
};

// The options of a command's flags and config file (model, cluster, cache and predictor
// sections); under mpirun the cluster exists even with one rank.
DeploymentOptions MakeDeploymentOptions(const ModelFlags& model, const ClusterFlags& cluster);

class Deployment {
 public:
  // Collective under mpirun (the cluster's set-up).
  static StatusOr<std::unique_ptr<Deployment>> Create(comm::MpiContext* ctx, const DeploymentOptions& options);
  ~Deployment();  // cache, then cluster, then engine
  Deployment(const Deployment&) = delete;
  Deployment& operator=(const Deployment&) = delete;

  runtime::Engine& engine() { return *engine_; }
  cache::ExpertCache* cache() { return cache_.get(); }  // null without cache.device_budget
  comm::Cluster* cluster() { return cluster_.get(); }   // null on one process
  comm::MpiContext* ctx() { return ctx_; }

  // This rank's expert cache counters ({"active": false} without a cache).
  nlohmann::json CacheStats() const;
  // The collective end of a run under the cluster: idles until every rank is done, gathers every
  // rank's counters (cache included) on rank 0, shuts the cluster down. Rank 0 gets the stats,
  // other ranks null; without a cluster: {"ranks": [this rank]}.
  StatusOr<nlohmann::json> Finish();
  // Finish without the drain, for ranks that stopped stepping together already (serve: rank 0 sent
  // Stop, the followers left Follow()).
  StatusOr<nlohmann::json> GatherAndShutdown();
  // Prints the cache counters (stderr) when a cache is active; under mpirun prefixed by the rank.
  void PrintCacheSummary() const;

 private:
  Deployment() = default;
  Status BuildCache(const DeploymentOptions& o);

  comm::MpiContext* ctx_ = nullptr;
  std::unique_ptr<runtime::Engine> engine_;
  std::unique_ptr<comm::Cluster> cluster_;
  std::unique_ptr<cache::ExpertCache> cache_;
  bool finished_ = false;
};

}  // namespace ef::launch
