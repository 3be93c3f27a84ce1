// CommCounters: one rank's communication counters since its Cluster was created (the ones
// Cluster::Stats reports), as Cluster::LiveCounters reads them. A plain value with no MPI or UCX
// types, so that readers such as launch/server/server_metrics.h need not include cluster.h.
#pragma once

#include <cstdint>
#include <vector>

namespace ef::comm {

struct CommCounters {
  int rank = 0;
  int world_size = 1;
  int64_t a2a_bytes_sent = 0;      // token-row payload this rank sent to other ranks
  int64_t a2a_bytes_received = 0;  // ... received from other ranks
  int64_t a2a_exchanges = 0;       // all-to-all-v calls (dispatch and combine of each MoE layer)
  int64_t peer_fetch_bytes = 0;    // expert bytes read from peers' host shards (UCX gets)
  int64_t peer_fetches = 0;        // UCX gets
  // a2a_bytes_sent / received split by decoder layer (empty without a cluster).
  std::vector<int64_t> a2a_layer_bytes_sent, a2a_layer_bytes_received;
};

}  // namespace ef::comm
