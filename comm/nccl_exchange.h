// NcclExchange: TokenExchange on device memory with grouped ncclSend/ncclRecv (EF_HAVE_NCCL).
//
// Communicators: rank 0's unique id travels over MPI; a non-blocking communicator is created from
// it and then split into a blocking one, both polled with the MpiContext deadline, so a rank that
// never joins is named. Rows move on the blocking communicator: a group launch on a non-blocking
// one runs in a thread NCCL creates for each group (tens of microseconds per exchange), a blocking
// one launches from the caller. Connections to every peer are made once at Create, so no later
// NCCL call waits on a peer on the host; the only wait is AllToAllV's, for the transfer's
// completion, polled against the deadline (spin first, then yield, then sleep). On timeout or an
// asynchronous NCCL error the communicators are aborted and the error names the peers involved.
//
// Streams: rows move on the backend's compute stream, so the transfer is ordered after the ops
// that wrote the send rows without a host synchronisation. AllToAllV returns once the received
// rows have arrived (and so the compute stream has drained up to the transfer); both buffers may
// then be reused. Counts travel over MPI (host). Self rows go through NCCL like the others.
// Without NCCL (or the CUDA backend) in the build, Available() is false and Create fails.
#pragma once

#include <memory>

#include "comm/mpi_context.h"
#include "comm/token_exchange.h"
#include "runtime/backend/backend.h"

namespace ef::comm {

class NcclExchange {
 public:
  static bool Available();
  // Collective over ctx. `backend` is a cuda backend whose device is current; it must outlive
  // the exchange.
  static StatusOr<std::unique_ptr<TokenExchange>> Create(MpiContext* ctx, runtime::Backend& backend);
};

}  // namespace ef::comm
