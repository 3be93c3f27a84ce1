// MpiContext: the process's place in the MPI world, and the waits every peer exchange goes
// through.
//
// Init() initialises MPI (MPI_THREAD_FUNNELED) when the process was started by mpirun or another
// PMI launcher (OMPI_COMM_WORLD_SIZE, PMIX_RANK or PMI_SIZE in the environment); otherwise it
// returns a single-process context (rank 0 of 1) and never touches MPI, so `expertflow` runs
// without a launcher. MPI_COMM_WORLD's error handler is MPI_ERRORS_RETURN: MPI failures come back
// as Status (MPI_CHECK), never as an abort inside MPI.
//
// Every wait polls with a deadline (timeout_s): a peer that died or stalls turns into
// DeadlineExceeded "rank R did not complete <what> within T s (... rank R is on node N)", never a
// hang. Point-to-point messages are used even for small collectives so the missing peer, and the
// node it ran on, can be named.
//
// Losing a peer ends the process without relying on the launcher: Abort() asks MPI to end every
// rank, and exits this process itself after a bounded grace (EF_ABORT_GRACE_S) if MPI_Abort has
// not returned by then; it does not when mpirun cannot reach the lost node's daemon (a partition),
// and a rank must not hang on that. Every other rank detects the loss through its own deadlines.
//
// Thread safety: MPI is called from the thread that called Init() only (FUNNELED).
#pragma once

#include <mpi.h>

#include <functional>
#include <span>
#include <string>
#include <vector>

#include "runtime/core/status.h"

namespace ef::comm {

// Message tags; each kind of exchange has its own so messages never match across kinds.
enum Tag : int {
  kTagBarrier = 100,
  kTagGather = 101,
  kTagStep = 102,
  kTagCounts = 103,
  kTagRows = 104,
  kTagResults = 105,
  kTagBytes = 106,
  kTagPlan = 107,
};

class MpiContext {
 public:
  // Process-wide; the first call decides. Later calls return the same context.
  static StatusOr<MpiContext*> Init();
  // nullptr before Init().
  static MpiContext* Get();
  // Whether a launcher started this process (it may still be a world of 1).
  static bool LaunchedByMpirun();

  bool mpi() const { return mpi_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  // Rank within its node and ranks on its node (from the launcher unless overridden).
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  // The host name rank r runs on (gathered at Init; "" out of range). Ranks started into separate
  // network namespaces by scripts/cluster/netns.sh report the namespace's name.
  const std::string& node_of(int r) const;
  MPI_Comm comm() const { return comm_; }

  // "rank 3 on node n2" (just "rank 3" when the node is unknown): how errors name a peer.
  std::string DescribeRank(int r) const;

  // Nodes of `n` ranks each (n > 0): local rank = rank % n; n <= 0 takes the launcher's placement.
  // n = 1 makes every peer remote, as between nodes, on any placement. n > 1 must be how the
  // launcher placed the ranks (blocks of n consecutive ranks, each on a node of its own):
  // otherwise InvalidArgument naming the nodes and their ranks, the same on every rank, and the
  // launcher's placement stays in force.
  [[nodiscard]] Status SetRanksPerNode(int n);
  // Called while a wait polls (e.g. to progress a UCX worker that peers read from).
  void set_progress_hook(std::function<void()> hook) { progress_hook_ = std::move(hook); }
  double timeout_s() const { return timeout_s_; }
  void set_timeout_s(double s) { timeout_s_ = s; }

  // Polls until every request completes. peers[i] names the rank behind reqs[i]. On timeout:
  // DeadlineExceeded naming the ranks whose receives (else sends) are still pending.
  Status WaitAll(std::span<MPI_Request> reqs, std::span<const int> peers, const std::string& what);
  // Every rank's bytes (variable length) to every rank, in rank order.
  StatusOr<std::vector<std::vector<char>>> AllGatherBytes(std::span<const char> mine, const std::string& what);
  Status Barrier(const std::string& what);
  // Every rank's bytes to rank 0 (others get an empty result).
  StatusOr<std::vector<std::vector<char>>> GatherBytesToRoot(std::span<const char> mine, const std::string& what);
  // One int64 per rank, to every rank.
  StatusOr<std::vector<int64_t>> AllGatherInt(int64_t mine, int tag, const std::string& what);
  // `mine.size()` int64s per rank (the same on every rank), to every rank: out[r * n + i] is rank
  // r's mine[i]. One round of point-to-point messages.
  Status AllGatherInts(std::span<const int64_t> mine, std::span<int64_t> out, int tag, const std::string& what);

  // Ends every rank: MPI_Abort when MPI is up, else exit(code). This process exits with `code`
  // after EF_ABORT_GRACE_S even when MPI_Abort blocks (its launcher cannot reach a lost node).
  [[noreturn]] void Abort(int code);
  // Finalises MPI (idempotent). Objects holding MPI or UCX resources must be gone. MPI_Finalize
  // synchronises with every rank: a peer lost at that point would block it forever, so after
  // timeout_s the process reports that and exits 1.
  void Finalize();

 private:
  MpiContext() = default;
  bool mpi_ = false;
  bool finalized_ = false;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  int launcher_local_rank_ = 0, launcher_local_size_ = 1;
  MPI_Comm comm_ = MPI_COMM_NULL;
  std::vector<std::string> nodes_;  // host name per rank
  std::vector<int> node_leader_;    // per rank: the lowest rank on its node (MPI_COMM_TYPE_SHARED)
  double timeout_s_ = 30;
  std::function<void()> progress_hook_;

  // " (ranks 2, 3 are on node n2)" for the pending ranks of a timed-out wait.
  std::string DescribeNodes(const std::vector<int>& ranks) const;
};

}  // namespace ef::comm
