#include "comm/nccl_exchange.h"

namespace ef::comm {

#ifndef EF_HAVE_NCCL
bool NcclExchange::Available() { return false; }
StatusOr<std::unique_ptr<TokenExchange>> NcclExchange::Create(MpiContext*, runtime::Backend&) {
  return Unimplemented("this build has no NCCL (configure with CUDA and libnccl-dev)");
}
#endif

}  // namespace ef::comm
