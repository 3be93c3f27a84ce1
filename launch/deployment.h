// Deployment: this process's part of a deployment, built in the order its parts depend on each
// other and torn down in reverse; no part patches another after the fact. generate, score, serve
// and bench build one (bench adds its routing-trace override through on_engine).
//
//   1. engine   (runtime/)  the model on its backend; experts are not uploaded when an expert cache
//               will serve them (a model larger than the device still loads);
//   2. hooks    routing hooks the cache must see first (on_engine);
//   3. cluster  (comm/)     under mpirun: the token exchange (NCCL or MPI), the expert placement,
//               every rank's host shard of the experts it is home for (UCX-registered), the
//               expert-parallel executor. Before it, after the model-load barrier, a cache budget
//               the model cannot run with is refused on every rank alike;
//   4. cache    (cache/)    with cache.device_budget, per rank: device slots backed by the tiers
//               host shard -> peer ranks' shards (UCX get) -> checkpoint mapping, and the
//               predictor's prefetch of the experts this rank computes.
//
// One decode step through the folders (serve; generate and score call Engine::Forward themselves):
//   launch/server, scheduler/  Between two steps ServingLoop admits waiting requests into the
//       running batch: FIFO, or with a regroup window the grouping of scheduler::TokenRegrouper
//       (prompts forecast to need few distinct experts go together, within a starvation bound).
//       It calls Engine::Forward with one token per running sequence (a new request's prompt).
//   runtime/engine  Per decoder layer: attention over this rank's sequences' KV caches; at an MoE
//       layer the router's top-k, copied to the host, then the routing hooks in the order added,
//       then the MoeExecutor. (A step of up to 64 tokens on one process with every expert resident
//       and no routing hook keeps the routing on the device instead: Backend::MoeRouted computes
//       the layer from the router's device output, past two tokens with the pairs grouped by
//       expert on the device, and the observers see the step's routing after the logits; none of
//       the steps below then runs.)
//   cache/  One of those hooks is the cache's PredictorPrefetcher: it forecasts the batch's experts
//       at the next MoE layers and hands the lists to the cache (under mpirun only the experts this
//       rank computes); their loads start when the expert source is told this layer's experts.
//   comm/  On one process LocalMoeExecutor computes every expert. Under mpirun the
//       ExpertParallelExecutor runs the layer in lockstep on every rank (at the first MoE layer the
//       ranks all-gather "has work" flags; a rank without sequences joins with zero rows): the row
//       counts per (destination, expert) go over MPI, then each token's hidden row once to every
//       rank that computes one of its experts (all-to-all-v; the placement, or in planned mode
//       comm::RowBalancer's plan, names that rank).
//   cache/  The computing rank's expert source (one CachedExpertSource for both backends) is told
//       the layer's experts (OnRouting): it puts the resident ones first, acquires the layer's
//       experts in that order (a miss starts loading at once) and prefetches the next layers'
//       forecast experts, wrapping into the next step; then each expert is computed. Loads come
//       from the nearest tier: on CUDA as copies on a high- and a low-priority stream that overlap
//       the compute, on the CPU backend synchronously or on the store's worker. Without a cache: the resident experts,
//       or the peers' shards when experts are computed away from their homes.
//   comm/  The results return by all-to-all-v and the token's rank adds w * y in increasing expert
//       id: the additions of one process in its order, so logits do not depend on the rank count,
//       the budget or the tier an expert came from (cluster.combine summed adds per rank first:
//       within float rounding). Every wait on a peer times out naming the rank.
//   launch/server  The loop samples each sequence's next token from its logits, streams the text
//       and retires finished requests.
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
  // model.dtype: auto, or the dtype the checkpoint's weights must have (bf16, f16, f32); weights
  // are computed in the checkpoint's dtype, so another one is refused once the model is open.
  std::string model_dtype = "auto";
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
  // On the CUDA backend and one rank: Engine::WarmUp with this many prompt tokens before anything
  // else sees the engine (0: none); with an expert cache, once the cache exists, through it, with at
  // most kCacheWarmupTokens, and its counters zeroed after.
  int warmup_tokens = 2048;
  static constexpr int kCacheWarmupTokens = 128;
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
