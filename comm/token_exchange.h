// TokenExchange: the all-to-all-v that moves token rows between ranks in an MoE layer.
//
// Two steps per use: ExchangeCounts tells every rank how many rows it will receive from each
// peer (optionally split into k counts per peer, e.g. rows per expert), then AllToAllV moves the
// rows. Send rows are laid out by destination rank (rank 0's rows, then rank 1's, ...), received
// rows by source rank. Row bytes are the same on every rank. MpiExchange works on host memory
// (CPU backend, CI); NcclExchange (EF_HAVE_NCCL) on device memory with grouped
// ncclSend/ncclRecv. Every wait has the MpiContext timeout and names the peer. Counters report
// payload bytes (rows that leave or reach this rank; self rows excluded).
//
// Not thread-safe: one thread drives an exchange. The counters may be read from any thread.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "comm/stat_counter.h"
#include "runtime/core/status.h"

namespace ef::comm {

class TokenExchange {
 public:
  virtual ~TokenExchange() = default;
  virtual const char* name() const = 0;
  // Whether AllToAllV takes device memory (nccl) rather than host memory (mpi).
  virtual bool device_memory() const { return false; }
  // Both spans have k * world-size entries (k >= 1, the same on every rank); entries [r*k, r*k+k)
  // are for (send) or from (recv) rank r: recv_counts[r*k + j] := send_counts[me*k + j] of rank r.
  virtual Status ExchangeCounts(std::span<const int64_t> send_counts, std::span<int64_t> recv_counts,
                                const std::string& what) = 0;
  // Moves rows (row_bytes each); both count spans have world-size entries (rows per peer).
  // Pointers are host memory (mpi) or device memory (nccl, see NcclExchange for streams). The
  // rows have arrived and `send` may be reused when it returns OK.
  virtual Status AllToAllV(const void* send, std::span<const int64_t> send_counts, void* recv,
                           std::span<const int64_t> recv_counts, size_t row_bytes, const std::string& what) = 0;

  // Any thread (see the file comment). Bytes of completed AllToAllV calls (other ranks' rows).
  int64_t bytes_sent() const { return bytes_sent_.load(); }
  int64_t bytes_received() const { return bytes_received_.load(); }
  int64_t num_exchanges() const { return num_exchanges_.load(); }  // AllToAllV calls
  // Wall time inside AllToAllV (host-blocking exchanges; the NCCL one enqueues on the stream and
  // reports 0): transfer plus waiting for the slowest peer to arrive.
  int64_t a2a_ns() const { return a2a_ns_.load(); }

 protected:
  // Written by the driving thread only.
  StatCounter bytes_sent_;
  StatCounter bytes_received_;
  StatCounter num_exchanges_;
  StatCounter a2a_ns_;
};

}  // namespace ef::comm
