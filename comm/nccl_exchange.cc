#include "comm/nccl_exchange.h"

#if defined(EF_HAVE_NCCL) && defined(EF_HAVE_CUDA_BACKEND)
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "comm/mpi_exchange.h"
#include "runtime/backend/cuda/cuda_backend.h"
#include "runtime/core/cpu_relax.h"
#include "runtime/core/logging.h"
#endif

namespace ef::comm {

#if !defined(EF_HAVE_NCCL) || !defined(EF_HAVE_CUDA_BACKEND)
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

// ncclInProgress is how a call on a non-blocking communicator says it has started.
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

using Clock = std::chrono::steady_clock;

// How a polled wait paces itself. A transfer completes in tens of microseconds and any sleep costs
// more than that (Linux adds its 50 us timer slack to a short sleep), so a wait first only spins;
// after kSpinFor it pauses between polls (runtime/core/cpu_relax.h: a yield would cost a
// scheduler slice on a busy CPU), and after kPauseFor it sleeps kSleep per poll,
// which bounds the CPU that a long wait burns (a peer still computing its experts, or a dead one)
// at a cost small next to the wait itself.
constexpr auto kSpinFor = std::chrono::milliseconds(2);
constexpr auto kPauseFor = std::chrono::milliseconds(20);
constexpr auto kSleep = std::chrono::microseconds(200);
static_assert(kSpinFor < kPauseFor && kSleep < kPauseFor / 10);

class Pacer {
 public:
  explicit Pacer(double timeout_s)
      : start_(Clock::now()),
        deadline_(start_ + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s))) {}
  // Pauses before the next poll; false once the deadline has passed.
  bool Pause() const {
    const auto now = Clock::now();
    if (now > deadline_) return false;
    if (now - start_ >= kPauseFor) {
      std::this_thread::sleep_for(kSleep);
    } else if (now - start_ >= kSpinFor) {
      CpuRelax();
    }
    return true;
  }

 private:
  Clock::time_point start_, deadline_;
};

std::string Peers(std::span<const int64_t> send, std::span<const int64_t> recv, int me) {
  std::string s;
  for (size_t r = 0; r < send.size(); ++r)
    if (static_cast<int>(r) != me && (send[r] > 0 || recv[r] > 0)) {
      if (!s.empty()) s += ',';
      s += std::to_string(r);
    }
  return s.empty() ? "none" : s;
}

class NcclTokenExchange final : public TokenExchange {
 public:
  NcclTokenExchange(MpiContext* ctx, runtime::Backend* backend) : ctx_(ctx), backend_(backend), counts_(ctx) {}
  ~NcclTokenExchange() override {
    // Destroy and abort are local in NCCL (blocking even for a non-blocking communicator); abort
    // does not wait for pending transfers, which after a failure may never finish.
    for (ncclComm_t c : {comm_, boot_}) {
      if (!c) continue;
      if (aborted_)
        ncclCommAbort(c);
      else
        ncclCommDestroy(c);
    }
    if (done_) cudaEventDestroy(done_);
  }

  Status Init() {
    auto* cuda = dynamic_cast<runtime::CudaBackend*>(backend_);
    if (!cuda) return InvalidArgument("the nccl exchange needs the cuda backend, not " + backend_->name());
    stream_ = cuda->stream();
    EF_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    ncclUniqueId id;
    if (ctx_->rank() == 0) EF_NCCL_CHECK(ncclGetUniqueId(&id));
    std::span<const char> mine(reinterpret_cast<const char*>(&id), ctx_->rank() == 0 ? sizeof(id) : 0);
    EF_ASSIGN_OR_RETURN(auto all, ctx_->AllGatherBytes(mine, "the nccl unique id broadcast"));
    if (all[0].size() != sizeof(id)) return Internal("bad nccl unique id from rank 0");
    std::memcpy(&id, all[0].data(), sizeof(id));
    // Init and split on a non-blocking communicator, polled with the deadline. The split's
    // blocking child carries the rows (see the header for why).
    ncclConfig_t boot_config = NCCL_CONFIG_INITIALIZER;
    boot_config.blocking = 0;
    EF_NCCL_CHECK(ncclCommInitRankConfig(&boot_, ctx_->size(), id, ctx_->rank(), &boot_config));
    EF_RETURN_IF_ERROR(WaitForComm("nccl communicator init"));
    ncclConfig_t data_config = NCCL_CONFIG_INITIALIZER;
    data_config.blocking = 1;
    EF_NCCL_CHECK(ncclCommSplit(boot_, 0, ctx_->rank(), &comm_, &data_config));
    EF_RETURN_IF_ERROR(WaitForComm("the nccl communicator split"));
    if (!comm_) return Internal("ncclCommSplit returned no communicator");
    return Connect();
  }

  const char* name() const override { return "nccl"; }
  bool device_memory() const override { return true; }

  Status ExchangeCounts(std::span<const int64_t> send_counts, std::span<int64_t> recv_counts,
                        const std::string& what) override {
    Status s = counts_.ExchangeCounts(send_counts, recv_counts, what);
    // A peer that stopped answering may also hold NCCL state: abort rather than destroy later.
    if (!s.ok()) aborted_ = true;
    return s;
  }

  Status AllToAllV(const void* send, std::span<const int64_t> send_counts, void* recv,
                   std::span<const int64_t> recv_counts, size_t row_bytes, const std::string& what) override {
    const int n = ctx_->size(), me = ctx_->rank();
    if (static_cast<int>(send_counts.size()) != n || static_cast<int>(recv_counts.size()) != n)
      return InvalidArgument("row count arrays must have one entry per rank");
    if (send_counts[me] != recv_counts[me]) return Internal("self row counts disagree");
    ++num_exchanges_;
    int64_t sent = 0, received = 0;
    for (int r = 0; r < n; ++r) {
      if (r == me) continue;
      sent += send_counts[r] * static_cast<int64_t>(row_bytes);
      received += recv_counts[r] * static_cast<int64_t>(row_bytes);
    }
    EF_RETURN_IF_ERROR(Transfer(send, send_counts, recv, recv_counts, row_bytes, what));
    // Counted once the rows arrived, as MpiExchange does.
    bytes_sent_ += sent;
    bytes_received_ += received;
    return Status::Ok();
  }

 private:
  // Makes the data communicator's connections to every peer (NCCL connects a pair on its first
  // transfer), here rather than inside the first layer's exchange: connecting waits on the peer
  // inside ncclGroupEnd, which no deadline covers on a blocking communicator.
  Status Connect() {
    const int n = ctx_->size();
    EF_ASSIGN_OR_RETURN(probe_, backend_->Allocate(2 * n * sizeof(int32_t)));
    std::vector<int64_t> ones(n, 1);
    int32_t* p = probe_.i32();
    return Transfer(p, ones, p + n, ones, sizeof(int32_t), "the nccl connection setup");
  }

  // Grouped send/recv on the compute stream, then the wait for its completion.
  Status Transfer(const void* send, std::span<const int64_t> send_counts, void* recv,
                  std::span<const int64_t> recv_counts, size_t row_bytes, const std::string& what) {
    const int n = ctx_->size();
    const char* s = static_cast<const char*>(send);
    char* d = static_cast<char*>(recv);
    bool any = false;
    for (int r = 0; r < n; ++r) any = any || send_counts[r] > 0 || recv_counts[r] > 0;
    if (!any) return Status::Ok();  // the peers' counts say they send nothing here either
    EF_NCCL_CHECK(ncclGroupStart());
    ncclResult_t rc = ncclSuccess;
    size_t so = 0, ro = 0;
    for (int r = 0; r < n && rc == ncclSuccess; ++r) {
      const size_t sb = static_cast<size_t>(send_counts[r]) * row_bytes;
      const size_t rb = static_cast<size_t>(recv_counts[r]) * row_bytes;
      if (sb > 0) rc = ncclSend(s + so, sb, ncclInt8, r, comm_, stream_);
      if (rc == ncclSuccess && rb > 0) rc = ncclRecv(d + ro, rb, ncclInt8, r, comm_, stream_);
      so += sb;
      ro += rb;
    }
    // The group is closed even after a failed call so that NCCL's group state starts clean.
    const ncclResult_t end = ncclGroupEnd();
    if (rc == ncclSuccess) rc = end;
    if (rc != ncclSuccess) return PeerError(what, send_counts, recv_counts, ncclGetErrorString(rc));
    const cudaError_t e = cudaEventRecord(done_, stream_);
    if (e != cudaSuccess) return PeerError(what, send_counts, recv_counts, cudaGetErrorString(e));
    return WaitForTransfer(send_counts, recv_counts, what);
  }

  // Polls the event recorded after the transfer, and NCCL's asynchronous error, with the deadline.
  Status WaitForTransfer(std::span<const int64_t> send_counts, std::span<const int64_t> recv_counts,
                         const std::string& what) {
    const Pacer pacer(ctx_->timeout_s());
    for (;;) {
      const cudaError_t q = cudaEventQuery(done_);
      if (q == cudaSuccess) return Status::Ok();
      if (q != cudaErrorNotReady) return PeerError(what, send_counts, recv_counts, cudaGetErrorString(q));
      ncclResult_t state = ncclSuccess;
      EF_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state));
      if (state != ncclSuccess && state != ncclInProgress)
        return PeerError(what, send_counts, recv_counts, ncclGetErrorString(state));
      if (!pacer.Pause()) {
        aborted_ = true;
        return DeadlineExceeded("ranks " + Peers(send_counts, recv_counts, ctx_->rank()) + ": " + what +
                                " did not complete within " + Seconds() + " s over nccl (seen from rank " +
                                std::to_string(ctx_->rank()) + ")");
      }
    }
  }

  // Polls the non-blocking communicator until its pending operation (init, split) finishes.
  Status WaitForComm(const std::string& what) {
    const Pacer pacer(ctx_->timeout_s());
    for (;;) {
      ncclResult_t state = ncclSuccess;
      EF_NCCL_CHECK(ncclCommGetAsyncError(boot_, &state));
      if (state == ncclSuccess) return Status::Ok();
      if (state != ncclInProgress) {
        aborted_ = true;
        return Unavailable("nccl error during " + what + ": " + ncclGetErrorString(state) + " (rank " +
                           std::to_string(ctx_->rank()) + ")");
      }
      if (!pacer.Pause()) {
        aborted_ = true;
        return DeadlineExceeded("ranks all: " + what + " did not complete within " + Seconds() +
                                " s over nccl (seen from rank " + std::to_string(ctx_->rank()) + ")");
      }
    }
  }

  // A failed transfer leaves the communicator unusable: it is aborted (at destruction) and the
  // error names the peers of the transfer.
  Status PeerError(const std::string& what, std::span<const int64_t> send_counts, std::span<const int64_t> recv_counts,
                   const char* cause) {
    aborted_ = true;
    return Unavailable("nccl error during " + what + " with ranks " + Peers(send_counts, recv_counts, ctx_->rank()) +
                       ": " + cause + " (seen from rank " + std::to_string(ctx_->rank()) + ")");
  }

  std::string Seconds() const {
    char t[32];
    std::snprintf(t, sizeof(t), "%g", ctx_->timeout_s());
    return t;
  }

  MpiContext* ctx_;
  runtime::Backend* backend_;
  MpiExchange counts_;
  ncclComm_t boot_ = nullptr;      // non-blocking: init and split only
  ncclComm_t comm_ = nullptr;      // blocking: every transfer
  cudaStream_t stream_ = nullptr;  // the backend's compute stream (not owned)
  cudaEvent_t done_ = nullptr;     // recorded after each transfer
  runtime::Buffer probe_;          // Connect()'s rows
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
