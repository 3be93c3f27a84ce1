// A small fixed thread pool for the CPU backend: ParallelFor splits [0, n) into contiguous
// chunks, one per worker, and returns when all are done. The calling thread takes a chunk too.
// Not re-entrant: a ParallelFor body must not call ParallelFor on the same pool.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ef {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }
  // Calls body(begin, end) on disjoint chunks covering [0, n); chunks are at least min_chunk long.
  void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& body, int64_t min_chunk = 1);

  // The process-wide pool sized by EF_NUM_THREADS (0: hardware concurrency).
  static ThreadPool& Default();

 private:
  void WorkerLoop(int index);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  std::vector<std::pair<int64_t, int64_t>> chunks_;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
  std::mutex call_mu_;  // serialises concurrent ParallelFor callers
};

}  // namespace ef
