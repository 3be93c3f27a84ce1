// A small fixed thread pool for the CPU backend: ParallelFor splits [0, n) into contiguous
// chunks, one per worker, and returns when all are done. The calling thread takes a chunk too.
// With pieces_per_thread > 1 the chunks are smaller and go to whichever thread is free: a thread
// that shares its CPU with other work then holds the call up by the piece it is running (and, if
// it was off its CPU when the call began, until it runs again and finds none left) instead of by a
// whole share.
// Not re-entrant: a ParallelFor body must not call ParallelFor on the same pool.
//
// Hand-off: a call publishes its chunks under a new generation number; workers that finished
// the previous call poll for it for a short while (kSpin, the CPU's pause hint between polls, never
// sched_yield: see runtime/core/cpu_relax.h) before they sleep on a condition variable, and the
// caller polls for their completion the same way. A decode step runs many short calls back to back
// (an expert computed on the host is four), where waking sleeping threads cost more than the work:
// 12 us a call on 2 cores with sleeping workers. Sleepers are woken only when there are any.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ef {

// CPUs this process may run on: its affinity mask's (fewer than the machine's under mpirun's
// binding or taskset), else the hardware's.
int AvailableCpus();

// One-off parallel work outside a pool (loading, quantizing, packing): run(t) for every t in
// [0, num_threads), t >= 1 each on a thread of its own, t = 0 on the caller; returns when all are
// done.
void RunOnThreads(int64_t num_threads, const std::function<void(int64_t)>& run);

class ThreadPool {
 public:
  // pin_workers: bind worker i (1..num_threads-1) to the i-th CPU of the affinity mask, where the
  // mask has a CPU for every thread. The caller is not bound; no worker is bound to the mask's
  // first CPU. Woken together, unbound workers can start stacked on a few CPUs until the scheduler
  // spreads them; bound ones cannot move away from other threads busy on their CPU. Every pool
  // binds from the start of the mask: processes sharing one mask would share those CPUs. The
  // one-argument form takes EF_THREAD_POOL_PIN (default off).
  explicit ThreadPool(int num_threads);
  ThreadPool(int num_threads, bool pin_workers);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }
  // Calls body(begin, end) on disjoint chunks covering [0, n); chunks are at least min_chunk long,
  // and there are up to pieces_per_thread of them per thread, handed out in order to the threads
  // as they get free (1: one chunk per thread, fixed). If chunks throw, the first exception is
  // rethrown here after every chunk has ended.
  void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& body, int64_t min_chunk = 1,
                   int pieces_per_thread = 1);

  // The process-wide pool sized by EF_NUM_THREADS (0: hardware concurrency).
  static ThreadPool& Default();

  // How long a worker (or the caller) polls before it sleeps, unless EF_THREAD_POOL_SPIN_US says
  // otherwise (0: sleep at once, as on a machine shared with other work). A pool with more
  // threads than the CPUs of the process's affinity mask never polls.
  static constexpr std::chrono::microseconds kSpin{50};
  std::chrono::microseconds spin() const { return spin_; }
  // Whether every worker is bound to its CPU (pin_workers, the mask had the CPUs, and the system
  // allowed it; where it refused some, the others stay bound).
  bool pinned() const { return pinned_; }

 private:
  void WorkerLoop(int index);
  // Runs the current call's chunks for thread `index` (the caller is 0): its own chunk, or pieces
  // taken from next_piece_ until none are left.
  void RunChunks(int index);
  // Polls `ready` for up to kSpin; true when it held.
  template <typename Ready>
  bool Spin(Ready ready) const;

  std::vector<std::thread> workers_;
  std::chrono::microseconds spin_ = kSpin;
  bool pinned_ = false;
  // One call's work, written by the caller before it publishes `generation_` and read by the
  // workers after they see it.
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  std::vector<std::pair<int64_t, int64_t>> chunks_;  // [thread]; the caller's is [0]
  int64_t n_ = 0;                                    // the current call's range, when pieces_ > 0
  int64_t unit_ = 1;                                 // its min_chunk: pieces start on multiples of it
  int64_t pieces_ = 0;                               // 0: each thread runs chunks_[its index]
  // Taken by every thread of a call: on a cache line of its own, away from what waiting workers poll.
  alignas(64) std::atomic<int64_t> next_piece_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};  // workers yet to finish the current call
  std::atomic<bool> stop_{false};
  // Sleeping: a worker or the caller registers under mu_, then waits; the other side changes the
  // atomic it waits on, then (seq_cst) sees the registration and notifies under mu_.
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  std::atomic<int> sleeping_workers_{0};
  std::atomic<bool> caller_sleeping_{false};
  std::mutex call_mu_;  // serialises concurrent ParallelFor callers
  std::mutex error_mu_;
  std::exception_ptr error_;  // the first exception a worker's chunk threw in the current call
};

}  // namespace ef
