#include "runtime/core/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <exception>

#include "runtime/core/cpu_relax.h"
#include "runtime/core/params.h"

EF_PARAM(NumThreads, int64_t, "EF_NUM_THREADS", 0,
         "CPU backend worker threads (0: the CPUs of the process's affinity mask, all hardware threads without one)");
EF_PARAM(ThreadPoolPin, bool, "EF_THREAD_POOL_PIN", false,
         "CPU thread pool: bind worker i to the i-th CPU of the process's affinity mask (where it has one per thread)");
EF_PARAM(ThreadPoolSpinUs, int64_t, "EF_THREAD_POOL_SPIN_US", 50,
         "CPU thread pool: microseconds a worker polls for the next call before it sleeps (0: sleep at once)");

namespace ef {

namespace {

// CPUs this process may run on (its affinity mask: fewer than the machine's under mpirun's
// binding or taskset); 0 when unknown.
int AffinityCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  return sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 0;
}

}  // namespace

int AvailableCpus() {
  const int cpus = AffinityCpus();
  return cpus > 0 ? cpus : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

void RunOnThreads(int64_t num_threads, const std::function<void(int64_t)>& run) {
  std::vector<std::thread> threads;
  for (int64_t t = 1; t < num_threads; ++t) threads.emplace_back(run, t);
  run(0);
  for (std::thread& th : threads) th.join();
}

ThreadPool::ThreadPool(int num_threads) : ThreadPool(num_threads, params::ThreadPoolPin()) {}

ThreadPool::ThreadPool(int num_threads, bool pin_workers) {
  num_threads = std::max(1, num_threads);
  // Polling pays only where every thread has a CPU of its own; with more threads than the CPUs
  // this process may use, a polling thread would take the CPU of one with work.
  const int cpus = AffinityCpus();
  spin_ =
      std::chrono::microseconds(cpus > 0 && num_threads > cpus ? 0 : std::max<int64_t>(0, params::ThreadPoolSpinUs()));
  chunks_.assign(static_cast<size_t>(num_threads), {0, 0});
  for (int i = 0; i < num_threads - 1; ++i) workers_.emplace_back([this, i] { WorkerLoop(i + 1); });
  if (pin_workers && !workers_.empty()) {
    cpu_set_t mask;
    CPU_ZERO(&mask);
    std::vector<int> mine;
    if (sched_getaffinity(0, sizeof mask, &mask) == 0)
      for (int c = 0; c < CPU_SETSIZE; ++c)
        if (CPU_ISSET(c, &mask)) mine.push_back(c);
    if (mine.size() >= static_cast<size_t>(num_threads)) {
      pinned_ = true;
      for (size_t i = 0; i < workers_.size(); ++i) {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(mine[i + 1], &one);
        // A refusal (seccomp, a cpuset narrowed since) leaves that worker free: only slower.
        if (pthread_setaffinity_np(workers_[i].native_handle(), sizeof one, &one) != 0) pinned_ = false;
      }
    }
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  start_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

template <typename Ready>
bool ThreadPool::Spin(Ready ready) const {
  if (spin_.count() == 0) return ready();
  const auto until = std::chrono::steady_clock::now() + spin_;
  for (int i = 0;; ++i) {
    if (ready()) return true;
    if ((i & 15) == 15 && std::chrono::steady_clock::now() >= until) return false;
    CpuRelax();
  }
}

void ThreadPool::RunChunks(int index) {
  auto run = [&](int64_t begin, int64_t end) {
    try {
      (*body_)(begin, end);
    } catch (...) {  // handed to the caller, which rethrows it once every chunk has ended
      std::lock_guard<std::mutex> lock(error_mu_);
      if (!error_) error_ = std::current_exception();
    }
  };
  if (pieces_ == 0) {
    const auto [begin, end] = chunks_[static_cast<size_t>(index)];
    if (begin < end) run(begin, end);
    return;
  }
  // Piece p is units [U p / P, U (p + 1) / P) of `unit_` indices each (the last unit shorter), so
  // pieces start on multiples of the call's min_chunk.
  const int64_t n = n_, pieces = pieces_, unit = unit_, units = (n + unit - 1) / unit;
  for (int64_t p = next_piece_.fetch_add(1, std::memory_order_relaxed); p < pieces;
       p = next_piece_.fetch_add(1, std::memory_order_relaxed))
    run(units * p / pieces * unit, std::min(n, units * (p + 1) / pieces * unit));
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  for (;;) {
    // seq_cst throughout the sleep hand-off (see the header): the registration and the change it
    // waits for must be seen in one order by both sides.
    auto published = [&] { return generation_.load() != seen || stop_.load(); };
    if (!Spin(published)) {
      std::unique_lock<std::mutex> lock(mu_);
      sleeping_workers_.fetch_add(1);
      start_cv_.wait(lock, published);
      sleeping_workers_.fetch_sub(1);
    }
    if (stop_.load()) return;
    seen = generation_.load();
    RunChunks(index);
    if (pending_.fetch_sub(1) == 1 && caller_sleeping_.load()) {
      std::lock_guard<std::mutex> lock(mu_);
      done_cv_.notify_one();
    }
  }
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& body, int64_t min_chunk,
                             int pieces_per_thread) {
  if (n <= 0) return;
  const int64_t most = std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk));  // chunks of min_chunk
  const int64_t parts = std::min<int64_t>(num_threads(), most);
  if (parts <= 1 || workers_.empty()) {
    body(0, n);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mu_);
  // The previous call's workers have all finished (it returned only then): the chunks are free.
  const int64_t pieces = std::min<int64_t>(most, parts * std::max(1, pieces_per_thread));
  pieces_ = pieces > parts ? pieces : 0;
  n_ = n;
  unit_ = std::max<int64_t>(1, min_chunk);
  next_piece_.store(0, std::memory_order_relaxed);
  for (int64_t p = 0; p < num_threads(); ++p)
    chunks_[static_cast<size_t>(p)] = p < parts ? std::pair{n * p / parts, n * (p + 1) / parts} : std::pair{n, n};
  body_ = &body;
  pending_.store(static_cast<int>(workers_.size()));
  generation_.fetch_add(1);  // publishes the writes above to the workers that see it
  if (sleeping_workers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    start_cv_.notify_all();
  }
  // The caller waits for every worker even when a chunk throws: the body and the chunks must
  // outlive their readers.
  RunChunks(0);
  auto done = [&] { return pending_.load() == 0; };
  if (!Spin(done)) {
    std::unique_lock<std::mutex> lock(mu_);
    caller_sleeping_.store(true);
    done_cv_.wait(lock, done);
    caller_sleeping_.store(false);
  }
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(error_mu_);
    std::swap(error, error_);
  }
  if (error) std::rethrow_exception(error);
}

ThreadPool& ThreadPool::Default() {
  static ThreadPool pool([] {
    int64_t n = params::NumThreads();
    if (n <= 0) n = AvailableCpus();  // the affinity mask's: one pool per rank under mpirun's binding
    return static_cast<int>(n);
  }());
  return pool;
}

}  // namespace ef
