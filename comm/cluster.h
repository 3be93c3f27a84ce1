// Cluster: wires a process's engine into the MPI world: token exchange, expert placement (static,
// or planned per MoE layer from the ranks' row counts), the expert-parallel executor and the UCX
// peer expert tier (every rank's host shard of its home experts: the engine's expert source when
// experts are computed away from their homes, or the tiers behind a per-rank expert cache). One
// object per engine; launch/deployment.h creates it after the engine and destroys it before.
//
//   EF_ASSIGN_OR_RETURN(auto cluster, Cluster::Create(ctx, engine.get(), options));
//   ... this rank's Forward() calls (each step joins the lockstep exchange) ...
//   EF_RETURN_IF_ERROR(cluster->Drain());      // idle until every rank is done
//   EF_ASSIGN_OR_RETURN(json stats, cluster->GatherStats());
//   EF_RETURN_IF_ERROR(cluster->Shutdown());   // collective
//
// Create, Drain, GatherStats and Shutdown are collective. Not thread-safe, except LiveCounters().
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "comm/comm_counters.h"
#include "comm/expert_parallel_executor.h"
#include "comm/expert_placement.h"
#include "comm/mpi_context.h"
#include "comm/peer_expert_source.h"
#include "comm/token_exchange.h"
#include "runtime/engine/engine.h"

namespace ef::comm {

struct ClusterOptions {
  std::string exchange = "auto";   // auto (nccl on cuda when built with NCCL, else mpi) | mpi | nccl
  int ranks_per_node = 0;          // 0: the launcher's; 1 forces UCX over TCP between ranks
  std::string peer_fetch = "ucx";  // ucx | none (read non-home experts from the local mapping)
  PlacementOptions placement;
  double timeout_s = 30;  // every wait on a peer
  // pairs: results return one row per (token, expert), added in expert order on the token's rank
  // (bitwise one process); summed: the computing rank adds them per (token, rank) and returns one
  // row per distinct token (fewer bytes; within float rounding of one process).
  std::string combine = "pairs";
  // A per-rank expert cache serves the engine's experts (created after the cluster): the cluster
  // keeps every rank's host shard of the experts it is home for, the cache's host and peer tiers
  // read it (peer()), and the engine's expert source is the cache's, not set here.
  bool expert_cache = false;
  uint64_t host_budget_bytes = 0;  // with expert_cache: bytes of this rank's host shard (0: no bound)
};

class Cluster {
 public:
  static StatusOr<std::unique_ptr<Cluster>> Create(MpiContext* ctx, runtime::Engine* engine,
                                                   const ClusterOptions& options);
  ~Cluster();

  ExpertParallelExecutor& executor() { return *executor_; }
  const ExpertPlacement& placement() const { return placement_; }
  // The host shards and UCX gets; null without peer fetch or on one rank.
  PeerExpertSource* peer() { return peer_source_.get(); }
  Status Drain() { return executor_->Drain(); }
  // This rank's counters.
  nlohmann::json Stats() const;
  // This rank's counters, from any thread while another drives the exchange (e.g. /metrics on an
  // HTTP thread of a serving rank): relaxed atomic reads, no collective, no lock. The fields are
  // read one by one, so they may be a step apart from each other.
  CommCounters LiveCounters() const;
  // Every rank's counters on rank 0 ({"ranks": [...], "a2a_bytes": total, "ucx_get_bytes": total});
  // other ranks get null. `extra` is merged into this rank's record (e.g. {"expert_cache": ...}).
  StatusOr<nlohmann::json> GatherStats(const nlohmann::json& extra = nlohmann::json::object());
  Status Shutdown();

 private:
  Cluster() = default;
  MpiContext* ctx_ = nullptr;
  runtime::Engine* engine_ = nullptr;
  ExpertPlacement placement_;
  std::unique_ptr<TokenExchange> exchange_;
  std::unique_ptr<PeerExpertSource> peer_source_;
  std::unique_ptr<ExpertParallelExecutor> executor_;
  bool shut_down_ = false;
  bool set_expert_source_ = false;  // this cluster installed the engine's expert source
};

}  // namespace ef::comm
