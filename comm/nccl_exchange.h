// NcclExchange: TokenExchange on device memory with grouped ncclSend/ncclRecv (EF_HAVE_NCCL).
//
// The communicator is created from a unique id that rank 0 broadcasts over MPI, in non-blocking
// mode so init and every exchange can be polled with the MpiContext deadline; on timeout or an
// asynchronous NCCL error the communicator is aborted and the error names the peers involved.
// Counts travel over MPI (host). Rows move on the exchange's own stream; the caller's compute
// stream is synchronised before and the exchange stream after, so pointers are safe to reuse
// when AllToAllV returns. Without NCCL in the build, Available() is false and Create fails.
#pragma once

#include <memory>

#include "comm/mpi_context.h"
#include "comm/token_exchange.h"
#include "runtime/backend/backend.h"

namespace ef::comm {

class NcclExchange {
 public:
  static bool Available();
  // Collective over ctx. `backend` is a cuda backend whose device is current.
  static StatusOr<std::unique_ptr<TokenExchange>> Create(MpiContext* ctx, runtime::Backend& backend);
};

}  // namespace ef::comm
