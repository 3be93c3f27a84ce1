// UcxRemoteMemory: one registered host region per rank, readable by every peer with a UCX get.
//
// Create() is collective over the MpiContext: each rank opens a UCP context (RMA) and a worker,
// maps its region, packs the region's rkey, and exchanges worker address + rkey + base address
// with every rank over MPI; endpoints to every peer are created and rkeys unpacked. Get() reads
// bytes from a peer's region into local memory and waits with the context's timeout, naming the
// peer on failure. force_tcp restricts UCX to TCP (as between nodes; used for ranks_per_node: 1);
// otherwise UCX picks (shared memory / CMA on one node).
//
// While a rank waits on MPI, MpiContext's progress hook progresses this worker so peers' gets
// (and UCX wireup, which is message-based) complete even when this rank is busy elsewhere.
// Shutdown() is collective (a barrier, so no peer is still reading) and then releases in reverse
// order: rkeys, endpoints, memory mapping, worker, context. The destructor releases without the
// barrier. Not thread-safe: the MPI thread drives it; bytes_fetched() and num_gets() may be read
// from any thread.
#pragma once

#include <ucp/api/ucp.h>

#include <memory>
#include <string>
#include <vector>

#include "comm/mpi_context.h"
#include "comm/stat_counter.h"

namespace ef::comm {

struct UcxOptions {
  bool force_tcp = false;  // UCX TLS restricted to tcp
};

class UcxRemoteMemory {
 public:
  // region/bytes: this rank's host memory to expose (may be empty); it must outlive this object.
  static StatusOr<std::unique_ptr<UcxRemoteMemory>> Create(MpiContext* ctx, void* region, size_t bytes,
                                                           const UcxOptions& options);
  ~UcxRemoteMemory();
  UcxRemoteMemory(const UcxRemoteMemory&) = delete;
  UcxRemoteMemory& operator=(const UcxRemoteMemory&) = delete;

  // Copies `bytes` at `offset` of `rank`'s region into dst (host memory).
  Status Get(int rank, uint64_t offset, void* dst, size_t bytes);
  // Progresses the worker once (used by MpiContext's waits).
  void Progress();
  // Collective: waits until every rank is done reading, then releases everything.
  Status Shutdown();

  int64_t bytes_fetched() const { return bytes_fetched_.load(); }  // any thread
  int64_t num_gets() const { return num_gets_.load(); }            // any thread
  int64_t get_ns() const { return get_ns_.load(); }                // any thread: wall time in Get
  // The transports UCX chose for the endpoint to `rank` (e.g. "tcp/lo", "cma/memory"), after the
  // first get to it; "" before.
  const std::string& transport(int rank) const { return transport_[rank]; }
  std::string tls() const { return tls_; }

 private:
  UcxRemoteMemory() = default;
  void Release();
  std::string DescribeEndpoint(int rank);

  MpiContext* ctx_ = nullptr;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_mem_h memh_ = nullptr;
  std::vector<ucp_ep_h> eps_;
  std::vector<ucp_rkey_h> rkeys_;
  std::vector<uint64_t> bases_;
  std::vector<uint64_t> sizes_;
  std::vector<std::string> transport_;
  std::string tls_ = "auto";
  char dummy_[64] = {0};                           // mapped when this rank exposes nothing
  StatCounter bytes_fetched_, num_gets_, get_ns_;  // written by the driving thread only
};

}  // namespace ef::comm
