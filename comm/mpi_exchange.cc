#include "comm/mpi_exchange.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>

#include "comm/comm_check.h"

namespace ef::comm {

Status MpiExchange::ExchangeCounts(std::span<const int64_t> send_counts, std::span<int64_t> recv_counts,
                                   const std::string& what) {
  const int n = ctx_->size(), me = ctx_->rank();
  if (send_counts.size() != recv_counts.size() || send_counts.empty() || send_counts.size() % n != 0)
    return InvalidArgument("count arrays must have the same number of entries per rank");
  const size_t k = send_counts.size() / n;
  std::copy_n(send_counts.begin() + me * k, k, recv_counts.begin() + me * k);
  if (n == 1) return Status::Ok();
  reqs_.clear();
  peers_.clear();
  for (int r = 0; r < n; ++r) {
    if (r == me) continue;
    reqs_.emplace_back();
    peers_.push_back(r);
    MPI_CHECK(
        MPI_Irecv(&recv_counts[r * k], static_cast<int>(k), MPI_INT64_T, r, kTagCounts, ctx_->comm(), &reqs_.back()));
  }
  for (int r = 0; r < n; ++r) {
    if (r == me) continue;
    reqs_.emplace_back();
    peers_.push_back(r);
    MPI_CHECK(
        MPI_Isend(&send_counts[r * k], static_cast<int>(k), MPI_INT64_T, r, kTagCounts, ctx_->comm(), &reqs_.back()));
  }
  return ctx_->WaitAll(reqs_, peers_, what);
}

Status MpiExchange::AllToAllV(const void* send, std::span<const int64_t> send_counts, void* recv,
                              std::span<const int64_t> recv_counts, size_t row_bytes, const std::string& what) {
  const int n = ctx_->size(), me = ctx_->rank();
  if (static_cast<int>(send_counts.size()) != n || static_cast<int>(recv_counts.size()) != n)
    return InvalidArgument("row count arrays must have one entry per rank");
  const char* s = static_cast<const char*>(send);
  char* d = static_cast<char*>(recv);
  std::vector<size_t> soff(n + 1, 0), roff(n + 1, 0);
  for (int r = 0; r < n; ++r) {
    soff[r + 1] = soff[r] + static_cast<size_t>(send_counts[r]) * row_bytes;
    roff[r + 1] = roff[r] + static_cast<size_t>(recv_counts[r]) * row_bytes;
  }
  ++num_exchanges_;
  struct Timer {
    StatCounter& total;
    std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
    ~Timer() { total += (std::chrono::steady_clock::now() - t0) / std::chrono::nanoseconds(1); }
  } timer{a2a_ns_};
  if (send_counts[me] != recv_counts[me]) return Internal("self row counts disagree");
  if (send_counts[me] > 0) std::memcpy(d + roff[me], s + soff[me], soff[me + 1] - soff[me]);
  if (n == 1) return Status::Ok();
  reqs_.clear();
  peers_.clear();
  // One contiguous datatype per row keeps counts within int for large payloads.
  MPI_Datatype row;
  MPI_CHECK(MPI_Type_contiguous(static_cast<int>(row_bytes), MPI_BYTE, &row));
  MPI_CHECK(MPI_Type_commit(&row));
  Status st;
  // Bytes count once the transfers completed: a failed or timed-out exchange adds nothing.
  int64_t sent = 0, received = 0;
  auto post = [&]() -> Status {
    for (int r = 0; r < n; ++r) {
      if (r == me || recv_counts[r] == 0) continue;
      if (recv_counts[r] > INT_MAX) return OutOfRange("too many rows from rank " + std::to_string(r));
      reqs_.emplace_back();
      peers_.push_back(r);
      MPI_CHECK(
          MPI_Irecv(d + roff[r], static_cast<int>(recv_counts[r]), row, r, kTagRows, ctx_->comm(), &reqs_.back()));
      received += static_cast<int64_t>(roff[r + 1] - roff[r]);
    }
    for (int r = 0; r < n; ++r) {
      if (r == me || send_counts[r] == 0) continue;
      if (send_counts[r] > INT_MAX) return OutOfRange("too many rows for rank " + std::to_string(r));
      reqs_.emplace_back();
      peers_.push_back(r);
      MPI_CHECK(
          MPI_Isend(s + soff[r], static_cast<int>(send_counts[r]), row, r, kTagRows, ctx_->comm(), &reqs_.back()));
      sent += static_cast<int64_t>(soff[r + 1] - soff[r]);
    }
    EF_RETURN_IF_ERROR(ctx_->WaitAll(reqs_, peers_, what));
    bytes_sent_ += sent;
    bytes_received_ += received;
    return Status::Ok();
  };
  st = post();
  MPI_Type_free(&row);
  return st;
}

}  // namespace ef::comm
