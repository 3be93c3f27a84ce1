#include "comm/mpi_context.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

#include "comm/comm_check.h"
#include "runtime/core/cpu_relax.h"
#include "runtime/core/logging.h"
#include "runtime/core/params.h"

EF_PARAM(AbortGraceS, double, "EF_ABORT_GRACE_S", 5.0,
         "seconds a rank waits for MPI_Abort to end it before it exits by itself (a lost node's "
         "daemon may never answer mpirun)");

namespace ef::comm {
namespace {

MpiContext* g_context = nullptr;

int CurrentRank() {
  MpiContext* c = MpiContext::Get();
  return c ? c->rank() : 0;
}

constexpr int kMaxHostName = 64;

// Starts a thread that ends the process with `code` after `seconds` unless the returned flag is
// set first, printing `why`: the bound on a call that may block forever once a peer is gone
// (MPI_Abort, MPI_Finalize).
std::shared_ptr<std::atomic<bool>> ExitAfter(double seconds, int code, std::string why) {
  auto disarmed = std::make_shared<std::atomic<bool>>(false);
  std::thread([seconds, code, why = std::move(why), disarmed] {
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (std::chrono::steady_clock::now() < end) {
      if (disarmed->load()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (disarmed->load()) return;
    std::fprintf(stderr, "rank %d: %s within %g s; exiting\n", CurrentRank(), why.c_str(), seconds);
    std::fflush(stderr);
    std::_Exit(code);
  }).detach();
  return disarmed;
}

std::string Seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", s);
  return buf;
}

}  // namespace

Status MpiError(const char* stmt, int code, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) std::snprintf(text, sizeof(text), "code %d", code);
  return Internal(std::string(stmt) + " failed: " + text + " (" + file + ":" + std::to_string(line) + ", rank " +
                  std::to_string(CurrentRank()) + ")");
}

Status UcsError(const char* stmt, ucs_status_t code, const char* file, int line) {
  return Internal(std::string(stmt) + " failed: " + ucs_status_string(code) + " (" + file + ":" + std::to_string(line) +
                  ", rank " + std::to_string(CurrentRank()) + ")");
}

bool MpiContext::LaunchedByMpirun() {
  using params::detail::GetEnv;
  return GetEnv("OMPI_COMM_WORLD_SIZE") || GetEnv("PMIX_RANK") || GetEnv("PMI_SIZE") || GetEnv("PMI_RANK");
}

MpiContext* MpiContext::Get() { return g_context; }

StatusOr<MpiContext*> MpiContext::Init() {
  if (g_context) return g_context;
  auto* c = new MpiContext();
  if (LaunchedByMpirun()) {
    int inited = 0;
    MPI_CHECK(MPI_Initialized(&inited));
    if (!inited) {
      // Serialized: the thread that drives the engine (a serving loop's, not always the main
      // thread) makes the MPI calls, one thread at a time.
      int provided = 0;
      MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided));
      if (provided < MPI_THREAD_SERIALIZED)
        EF_LOG(WARN, COMM,
               "MPI provides thread level %d < MPI_THREAD_SERIALIZED; serving under mpirun calls MPI "
               "from the engine thread",
               provided);
    }
    c->mpi_ = true;
    c->comm_ = MPI_COMM_WORLD;
    MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(c->comm_, &c->rank_));
    MPI_CHECK(MPI_Comm_size(c->comm_, &c->size_));
    MPI_Comm node;
    MPI_CHECK(MPI_Comm_split_type(c->comm_, MPI_COMM_TYPE_SHARED, c->rank_, MPI_INFO_NULL, &node));
    MPI_CHECK(MPI_Comm_rank(node, &c->launcher_local_rank_));
    MPI_CHECK(MPI_Comm_size(node, &c->launcher_local_size_));
    // The node's lowest rank names the node (the split keeps rank order: it is local rank 0).
    int leader = 0;
    {
      MPI_Group node_group, world_group;
      const int zero = 0;
      MPI_CHECK(MPI_Comm_group(node, &node_group));
      MPI_CHECK(MPI_Comm_group(c->comm_, &world_group));
      MPI_CHECK(MPI_Group_translate_ranks(node_group, 1, &zero, world_group, &leader));
      MPI_Group_free(&node_group);
      MPI_Group_free(&world_group);
    }
    MPI_CHECK(MPI_Comm_free(&node));
    c->local_rank_ = c->launcher_local_rank_;
    c->local_size_ = c->launcher_local_size_;
    log::SetRank(c->rank_);
    char host[kMaxHostName] = {0};
    gethostname(host, sizeof(host) - 1);
    // Every rank's host, so a lost peer can be named by node. A blocking collective is fine here:
    // MPI_Init above already needed every rank.
    std::vector<char> hosts(static_cast<size_t>(kMaxHostName) * c->size_);
    MPI_CHECK(MPI_Allgather(host, kMaxHostName, MPI_CHAR, hosts.data(), kMaxHostName, MPI_CHAR, c->comm_));
    for (int r = 0; r < c->size_; ++r) {
      const char* h = hosts.data() + static_cast<size_t>(r) * kMaxHostName;
      c->nodes_.emplace_back(h, strnlen(h, kMaxHostName));
    }
    c->node_leader_.resize(c->size_);
    MPI_CHECK(MPI_Allgather(&leader, 1, MPI_INT, c->node_leader_.data(), 1, MPI_INT, c->comm_));
    EF_LOG(INFO, COMM, "mpi rank %d of %d on %s, local rank %d of %d", c->rank_, c->size_, host, c->local_rank_,
           c->local_size_);
  }
  g_context = c;
  return c;
}

const std::string& MpiContext::node_of(int r) const {
  static const std::string kNone;
  return r >= 0 && r < static_cast<int>(nodes_.size()) ? nodes_[r] : kNone;
}

std::string MpiContext::DescribeNodes(const std::vector<int>& ranks) const {
  // Group the ranks by node, in order of first appearance.
  std::vector<std::pair<std::string, std::vector<int>>> by_node;
  for (int r : ranks) {
    const std::string& n = node_of(r);
    if (n.empty()) continue;
    auto it = std::find_if(by_node.begin(), by_node.end(), [&](const auto& g) { return g.first == n; });
    if (it == by_node.end()) it = by_node.insert(by_node.end(), {n, {}});
    it->second.push_back(r);
  }
  std::string out;
  for (const auto& [node, rs] : by_node) {
    std::string list;
    for (int r : rs) list += (list.empty() ? "" : ", ") + std::to_string(r);
    out += std::string("; ") + (rs.size() > 1 ? "ranks " + list + " are" : "rank " + list + " is") + " on node " + node;
  }
  return out;
}

std::string MpiContext::DescribeRank(int r) const {
  const std::string& n = node_of(r);
  return "rank " + std::to_string(r) + (n.empty() ? "" : " on node " + n);
}

Status MpiContext::SetRanksPerNode(int n) {
  local_rank_ = launcher_local_rank_;
  local_size_ = launcher_local_size_;
  if (n <= 0) return Status::Ok();
  // Blocks of n consecutive ranks must be exactly the launcher's nodes. Every rank holds every
  // rank's node, so each one reaches the same verdict without talking to the others.
  bool match = true;
  for (int r = 0; r < static_cast<int>(node_leader_.size()) && n > 1; ++r)
    for (int s = 0; s < static_cast<int>(node_leader_.size()); ++s)
      if ((node_leader_[r] == node_leader_[s]) != (r / n == s / n)) match = false;
  if (!match) {
    // "node n1 has ranks 0, 2; node n2 has ranks 1, 3", nodes in order of their lowest rank.
    std::string placed;
    int per = -1;  // ranks on every node if that is one number and the nodes hold blocks, else 0
    for (int leader = 0; leader < size_; ++leader) {
      std::vector<int> rs;
      for (int r = 0; r < size_; ++r)
        if (node_leader_[r] == leader) rs.push_back(r);
      if (rs.empty()) continue;
      std::string list;
      for (int r : rs) list += (list.empty() ? "" : ", ") + std::to_string(r);
      placed += (placed.empty() ? "" : "; ") + std::string("node ") + node_of(leader) + " has rank" +
                (rs.size() > 1 ? "s " : " ") + list;
      const bool block = rs.back() - rs.front() + 1 == static_cast<int>(rs.size());
      if (!block || (per >= 0 && per != static_cast<int>(rs.size())))
        per = 0;
      else if (per < 0)
        per = static_cast<int>(rs.size());
    }
    const std::string blocks =
        "ranks 0-" + std::to_string(n - 1) + " on one node" +
        (n < size_ ? ", " + std::to_string(n) + "-" + std::to_string(2 * n - 1) + " on the next, ..." : std::string());
    return InvalidArgument(std::to_string(n) + " ranks per node (" + blocks + ") is not how the launcher placed the " +
                           std::to_string(size_) + " ranks: " + placed + "; set ranks_per_node to " +
                           (per > 0 ? std::to_string(per) + " or " : "") +
                           "auto (the launcher's placement), or place blocks of " + std::to_string(n) +
                           " ranks per node (hostfile slots=" + std::to_string(n) + ", --map-by slot)");
  }
  local_rank_ = rank_ % n;
  local_size_ = std::min(n, size_);
  return Status::Ok();
}

Status MpiContext::WaitAll(std::span<MPI_Request> reqs, std::span<const int> peers, const std::string& what) {
  if (reqs.empty()) return Status::Ok();
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration<double>(timeout_s_);
  for (;;) {
    int done = 0;
    MPI_CHECK(MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE));
    if (done) return Status::Ok();
    if (progress_hook_) progress_hook_();
    const auto now = Clock::now();
    if (now > deadline) break;
    // Spin for latency (a peer a few microseconds late is the common case; a fixed sleep would
    // add its whole length, timer slack included, to every exchange), pausing between polls (not
    // yielding: see cpu_relax.h), and only a peer that is milliseconds late is waited for with
    // sleeps.
    if (now - start > std::chrono::milliseconds(5))
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    else
      CpuRelax();
  }
  // Name the peers whose requests are still pending; receives first (a dead peer never sends).
  std::vector<int> lost;
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (reqs[i] == MPI_REQUEST_NULL) continue;
    int flag = 0;
    MPI_Request_get_status(reqs[i], &flag, MPI_STATUS_IGNORE);
    if (flag) continue;
    if (std::find(lost.begin(), lost.end(), peers[i]) == lost.end()) lost.push_back(peers[i]);
  }
  std::string pending;
  for (int r : lost) pending += (pending.empty() ? " " : ", ") + std::to_string(r);
  const std::string self = node_of(rank_).empty() ? "" : " on " + node_of(rank_);
  return DeadlineExceeded((lost.size() > 1 ? "ranks" : "rank") + pending + " did not complete " + what + " within " +
                          Seconds(timeout_s_) + " s (seen from rank " + std::to_string(rank_) + self +
                          DescribeNodes(lost) + ")");
}

StatusOr<std::vector<std::vector<char>>> MpiContext::AllGatherBytes(std::span<const char> mine,
                                                                    const std::string& what) {
  std::vector<std::vector<char>> out(size_);
  out[rank_].assign(mine.begin(), mine.end());
  if (size_ == 1) return out;
  EF_ASSIGN_OR_RETURN(auto sizes, AllGatherInt(static_cast<int64_t>(mine.size()), kTagGather, what));
  std::vector<MPI_Request> reqs;
  std::vector<int> peers;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    out[r].resize(static_cast<size_t>(sizes[r]));
    reqs.emplace_back();
    peers.push_back(r);
    MPI_CHECK(MPI_Irecv(out[r].data(), static_cast<int>(sizes[r]), MPI_BYTE, r, kTagBytes, comm_, &reqs.back()));
  }
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    reqs.emplace_back();
    peers.push_back(r);
    MPI_CHECK(MPI_Isend(mine.data(), static_cast<int>(mine.size()), MPI_BYTE, r, kTagBytes, comm_, &reqs.back()));
  }
  EF_RETURN_IF_ERROR(WaitAll(reqs, peers, what));
  return out;
}

StatusOr<std::vector<std::vector<char>>> MpiContext::GatherBytesToRoot(std::span<const char> mine,
                                                                       const std::string& what) {
  std::vector<std::vector<char>> out;
  if (size_ == 1) {
    out.emplace_back(mine.begin(), mine.end());
    return out;
  }
  int64_t n = static_cast<int64_t>(mine.size());
  std::vector<MPI_Request> reqs;
  std::vector<int> peers;
  if (rank_ != 0) {
    reqs.resize(2);
    peers = {0, 0};
    MPI_CHECK(MPI_Isend(&n, 1, MPI_INT64_T, 0, kTagGather, comm_, &reqs[0]));
    MPI_CHECK(MPI_Isend(mine.data(), static_cast<int>(n), MPI_BYTE, 0, kTagBytes, comm_, &reqs[1]));
    EF_RETURN_IF_ERROR(WaitAll(reqs, peers, what));
    return out;
  }
  out.resize(size_);
  out[0].assign(mine.begin(), mine.end());
  std::vector<int64_t> sizes(size_, 0);
  for (int r = 1; r < size_; ++r) {
    reqs.emplace_back();
    peers.push_back(r);
    MPI_CHECK(MPI_Irecv(&sizes[r], 1, MPI_INT64_T, r, kTagGather, comm_, &reqs.back()));
  }
  EF_RETURN_IF_ERROR(WaitAll(reqs, peers, what));
  reqs.clear();
  peers.clear();
  for (int r = 1; r < size_; ++r) {
    out[r].resize(static_cast<size_t>(sizes[r]));
    reqs.emplace_back();
    peers.push_back(r);
    MPI_CHECK(MPI_Irecv(out[r].data(), static_cast<int>(sizes[r]), MPI_BYTE, r, kTagBytes, comm_, &reqs.back()));
  }
  EF_RETURN_IF_ERROR(WaitAll(reqs, peers, what));
  return out;
}

Status MpiContext::AllGatherInts(std::span<const int64_t> mine, std::span<int64_t> out, int tag,
                                 const std::string& what) {
  const size_t n = mine.size();
  if (out.size() != n * static_cast<size_t>(size_))
    return Internal("AllGatherInts: the output holds " + std::to_string(out.size()) + " values, not " +
                    std::to_string(n) + " x " + std::to_string(size_) + " ranks");
  std::copy(mine.begin(), mine.end(), out.begin() + static_cast<std::ptrdiff_t>(n * rank_));
  if (size_ == 1 || n == 0) return Status::Ok();
  std::vector<MPI_Request> reqs;
  std::vector<int> peers;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    reqs.emplace_back();
    peers.push_back(r);
    MPI_CHECK(MPI_Irecv(&out[n * r], static_cast<int>(n), MPI_INT64_T, r, tag, comm_, &reqs.back()));
  }
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    reqs.emplace_back();
    peers.push_back(r);
    MPI_CHECK(MPI_Isend(mine.data(), static_cast<int>(n), MPI_INT64_T, r, tag, comm_, &reqs.back()));
  }
  return WaitAll(reqs, peers, what);
}

StatusOr<std::vector<int64_t>> MpiContext::AllGatherInt(int64_t mine, int tag, const std::string& what) {
  std::vector<int64_t> out(size_, 0);
  const int64_t one[1] = {mine};
  EF_RETURN_IF_ERROR(AllGatherInts(one, out, tag, what));
  return out;
}

Status MpiContext::Barrier(const std::string& what) {
  if (size_ == 1) return Status::Ok();
  return AllGatherInt(0, kTagBarrier, what).status();
}

void MpiContext::Abort(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  if (mpi_ && !finalized_) {
    ExitAfter(params::AbortGraceS(), code, "MPI_Abort did not end this rank");
    MPI_Abort(comm_, code);
  }
  std::_Exit(code);
}

void MpiContext::Finalize() {
  if (mpi_ && !finalized_) {
    finalized_ = true;
    std::shared_ptr<std::atomic<bool>> watchdog;
    if (size_ > 1) watchdog = ExitAfter(timeout_s_, 1, "MPI_Finalize did not return (a peer is gone?)");
    MPI_Finalize();
    if (watchdog) watchdog->store(true);
  }
}

}  // namespace ef::comm
