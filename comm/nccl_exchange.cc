#include "comm/nccl_exchange.h"

#ifdef EF_HAVE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "comm/mpi_exchange.h"
#include "runtime/core/logging.h"
#endif

namespace ef::comm {

#ifndef EF_HAVE_NCCL
bool NcclExchange::Available() { return false; }
StatusOr<std::unique_ptr<TokenExchange>> NcclExchange::Create(MpiContext*, runtime::Backend&) {
  return Unimplemented("this build has no NCCL (configure with CUDA and libnccl-dev)");
}
#else

namespace {

int CurrentRank() { return MpiContext::Get() ? MpiContext::Get()->rank() : 0; }

Status NcclError(const char* stmt, ncclResult_t r, const char* file, int line) {
  return Internal(std::string(stmt) + " failed: " + ncclGetErrorString(r) + " (" + file + ":" + std::to_string(line) +
                  ", rank " + std::to_string(CurrentRank()) + ")");
}
Status CudaError(const char* stmt, cudaError_t e, const char* file, int line) {
  return Internal(std::string(stmt) + " failed: " + cudaGetErrorString(e) + " (" + file + ":" + std::to_string(line) +
                  ", rank " + std::to_string(CurrentRank()) + ")");
}

#define EF_NCCL_CHECK(stmt)                                                       \
  do {                                                                            \
    const ncclResult_t ef_nccl_rc_ = (stmt);                                      \
    if (ef_nccl_rc_ != ncclSuccess && ef_nccl_rc_ != ncclInProgress) [[unlikely]] \
      return NcclError(#stmt, ef_nccl_rc_, __FILE__, __LINE__);                   \
  } while (0)
#define EF_CUDA_CHECK(stmt)                                     \
  do {                                                          \
    const cudaError_t ef_cuda_rc_ = (stmt);                     \
    if (ef_cuda_rc_ != cudaSuccess) [[unlikely]]                \
      return CudaError(#stmt, ef_cuda_rc_, __FILE__, __LINE__); \
  } while (0)

std::string Peers(std::span<const int64_t> send, std::span<const int64_t> recv, int me) {
  std::string s;
  for (size_t r = 0; r < send.size(); ++r)
    if (static_cast<int>(r) != me && (send[r] > 0 || recv[r] > 0)) s += (s.empty() ? "" : ",") + std::to_string(r);
  return s.empty() ? "none" : s;
}

class NcclTokenExchange final : public TokenExchange {
 public:
  NcclTokenExchange(MpiContext* ctx, runtime::Backend* backend) : ctx_(ctx), backend_(backend), counts_(ctx) {}
  ~NcclTokenExchange() override {
    if (comm_) {
      if (aborted_)
        ncclCommAbort(comm_);
      else
        ncclCommDestroy(comm_);
    }
    if (stream_) cudaStreamDestroy(stream_);
  }

  Status Init() {
    EF_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    ncclUniqueId id;
    if (ctx_->rank() == 0) EF_NCCL_CHECK(ncclGetUniqueId(&id));
    std::span<const char> mine(reinterpret_cast<const char*>(&id), ctx_->rank() == 0 ? sizeof(id) : 0);
    EF_ASSIGN_OR_RETURN(auto all, ctx_->AllGatherBytes(mine, "the nccl unique id broadcast"));
    if (all[0].size() != sizeof(id)) return Internal("bad nccl unique id from rank 0");
    std::memcpy(&id, all[0].data(), sizeof(id));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // init and collectives are polled with a deadline
    EF_NCCL_CHECK(ncclCommInitRankConfig(&comm_, ctx_->size(), id, ctx_->rank(), &config));
    return Poll("nccl communicator init", "all");
  }

  const char* name() const override { return "nccl"; }
  bool device_memory() const override { return true; }

  Status ExchangeCounts(std::span<const int64_t> send_counts, std::span<int64_t> recv_counts,
                        const std::string& what) override {
    return counts_.ExchangeCounts(send_counts, recv_counts, what);
  }

  Status AllToAllV(const void* send, std::span<const int64_t> send_counts, void* recv,
                   std::span<const int64_t> recv_counts, size_t row_bytes, const std::string& what) override {
    const int n = ctx_->size(), me = ctx_->rank();
    const char* s = static_cast<const char*>(send);
    char* d = static_cast<char*>(recv);
    std::vector<size_t> soff(n + 1, 0), roff(n + 1, 0);
    for (int r = 0; r < n; ++r) {
      soff[r + 1] = soff[r] + static_cast<size_t>(send_counts[r]) * row_bytes;
      roff[r + 1] = roff[r] + static_cast<size_t>(recv_counts[r]) * row_bytes;
    }
    ++num_exchanges_;
    // The rows were written on the backend's compute stream.
    backend_->Synchronize();
    if (send_counts[me] > 0)
      EF_CUDA_CHECK(
          cudaMemcpyAsync(d + roff[me], s + soff[me], soff[me + 1] - soff[me], cudaMemcpyDeviceToDevice, stream_));
    EF_NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < n; ++r) {
      if (r == me) continue;
      if (send_counts[r] > 0) {
        EF_NCCL_CHECK(ncclSend(s + soff[r], soff[r + 1] - soff[r], ncclInt8, r, comm_, stream_));
        bytes_sent_ += static_cast<int64_t>(soff[r + 1] - soff[r]);
      }
      if (recv_counts[r] > 0) {
        EF_NCCL_CHECK(ncclRecv(d + roff[r], roff[r + 1] - roff[r], ncclInt8, r, comm_, stream_));
        bytes_received_ += static_cast<int64_t>(roff[r + 1] - roff[r]);
      }
    }
    EF_NCCL_CHECK(ncclGroupEnd());
    return Poll(what, Peers(send_counts, recv_counts, me));
  }

 private:
  // Waits for the communicator's pending work and the stream, with the context's deadline.
  Status Poll(const std::string& what, const std::string& peers) {
    using Clock = std::chrono::steady_clock;
    const auto deadline = Clock::now() + std::chrono::duration<double>(ctx_->timeout_s());
    int spins = 0;
    for (;;) {
      ncclResult_t state = ncclSuccess;
      EF_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state));
      if (state != ncclSuccess && state != ncclInProgress) {
        aborted_ = true;
        return Unavailable("nccl error during " + what + " with ranks " + peers + ": " + ncclGetErrorString(state));
      }
      if (state == ncclSuccess) {
        const cudaError_t q = stream_ ? cudaStreamQuery(stream_) : cudaSuccess;
        if (q == cudaSuccess) return Status::Ok();
        if (q != cudaErrorNotReady) return CudaError("cudaStreamQuery", q, __FILE__, __LINE__);
      }
      if (Clock::now() > deadline) {
        aborted_ = true;
        char t[32];
        std::snprintf(t, sizeof(t), "%g", ctx_->timeout_s());
        return DeadlineExceeded("ranks " + peers + ": " + what + " did not complete within " + t +
                                " s over nccl (seen from rank " + std::to_string(ctx_->rank()) + ")");
      }
      if (++spins > 256) std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  MpiContext* ctx_;
  runtime::Backend* backend_;
  MpiExchange counts_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool aborted_ = false;
};

}  // namespace

bool NcclExchange::Available() { return true; }

StatusOr<std::unique_ptr<TokenExchange>> NcclExchange::Create(MpiContext* ctx, runtime::Backend& backend) {
  auto x = std::make_unique<NcclTokenExchange>(ctx, &backend);
  EF_RETURN_IF_ERROR(x->Init());
  EF_LOG(INFO, COMM, "nccl communicator ready: %d ranks", ctx->size());
  return std::unique_ptr<TokenExchange>(std::move(x));
}
#endif

}  // namespace ef::comm
