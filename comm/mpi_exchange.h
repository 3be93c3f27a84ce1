// MpiExchange: TokenExchange over MPI point-to-point (Isend/Irecv per peer, polled with the
// context's deadline so a missing peer is named). Host memory only. Rows to this rank itself are
// copied, not sent. Rows larger than INT_MAX bytes per peer are sent as MPI_BYTE in chunks of
// row_bytes-aligned contiguous types.
#pragma once

#include <mpi.h>

#include <vector>

#include "comm/mpi_context.h"
#include "comm/token_exchange.h"

namespace ef::comm {

class MpiExchange final : public TokenExchange {
 public:
  explicit MpiExchange(MpiContext* ctx) : ctx_(ctx) {}
  const char* name() const override { return "mpi"; }
  Status ExchangeCounts(std::span<const int64_t> send_counts, std::span<int64_t> recv_counts,
                        const std::string& what) override;
  Status AllToAllV(const void* send, std::span<const int64_t> send_counts, void* recv,
                   std::span<const int64_t> recv_counts, size_t row_bytes, const std::string& what) override;

 private:
  MpiContext* ctx_;
  // Reused between calls.
  std::vector<MPI_Request> reqs_;
  std::vector<int> peers_;
};

}  // namespace ef::comm
