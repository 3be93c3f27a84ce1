// ThreadPool: every index of [0, n) is visited exactly once per call, whether the workers are
// still polling from the previous call or asleep, whether the caller finishes first or last, with
// more threads than cores (such a pool never polls), and when the pool is destroyed with its
// workers in either state. Pools of 2 threads poll on any machine of 2 or more cores. Pinned
// workers run on their CPU of the affinity mask.
#include "runtime/core/thread_pool.h"

#include <gtest/gtest.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace ef {
namespace {

// Runs one call over n indices and checks each was visited once.
void ExpectEachIndexOnce(ThreadPool& pool, int64_t n, int64_t min_chunk, std::chrono::microseconds work = {},
                         int pieces_per_thread = 1) {
  std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
  pool.ParallelFor(
      n,
      [&](int64_t begin, int64_t end) {
        ASSERT_LE(0, begin);
        ASSERT_LE(end, n);
        for (int64_t i = begin; i < end; ++i) seen[static_cast<size_t>(i)].fetch_add(1);
        if (work.count() > 0 && begin > 0) std::this_thread::sleep_for(work);  // a worker ends last
      },
      min_chunk, pieces_per_thread);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[static_cast<size_t>(i)].load(), 1) << "index " << i << " of " << n;
}

TEST(ThreadPool, BackToBackCallsVisitEveryIndexOnce) {
  for (int threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads);
    for (int call = 0; call < 2000; ++call) ExpectEachIndexOnce(pool, 1 + call % 97, 1 + call % 5);
  }
}

TEST(ThreadPool, PiecesHandedOutVisitEveryIndexOnce) {
  for (int threads : {2, 3, 8})
    for (int pieces : {2, 4, 7}) {
      ThreadPool pool(threads);
      for (int call = 0; call < 300; ++call) ExpectEachIndexOnce(pool, 1 + call % 211, 1 + call % 5, {}, pieces);
    }
}

// Pieces start on multiples of min_chunk and are at least that long; a throwing piece reaches the
// caller after every piece ended, and the next call works.
TEST(ThreadPool, PiecesStartOnMultiplesOfTheMinimumChunk) {
  ThreadPool pool(3);
  for (int64_t n : {64, 100, 129, 1000, 4096}) {
    std::mutex mu;
    std::vector<std::pair<int64_t, int64_t>> seen;
    pool.ParallelFor(
        n,
        [&](int64_t begin, int64_t end) {
          std::lock_guard<std::mutex> lock(mu);
          seen.push_back({begin, end});
        },
        /*min_chunk=*/16, /*pieces_per_thread=*/4);
    int64_t covered = 0;
    for (const auto& [begin, end] : seen) {
      EXPECT_EQ(begin % 16, 0) << "n " << n;
      EXPECT_GE(end - begin, 16) << "n " << n;
      covered += end - begin;
    }
    EXPECT_EQ(covered, n);
    EXPECT_LE(seen.size(), static_cast<size_t>(std::min<int64_t>(n / 16, 12)));
  }
  std::atomic<int> ended{0};
  EXPECT_THROW(pool.ParallelFor(
                   1200,
                   [&](int64_t begin, int64_t) {
                     if (begin == 0) throw std::runtime_error("piece failed");
                     ended.fetch_add(1);
                   },
                   1, 4),
               std::runtime_error);
  EXPECT_EQ(ended.load(), 11);  // the other 11 of 12 pieces ran
  ExpectEachIndexOnce(pool, 1000, 1, {}, 4);
}

// The thread that takes the first piece waits until every other piece is done: with pieces handed
// out, the other thread runs them all (with one fixed chunk per thread it could not).
TEST(ThreadPool, WithPiecesAHeldUpThreadLeavesTheRestToTheOthers) {
  ThreadPool pool(2);
  constexpr int64_t kN = 64;
  constexpr int kPieces = 8;  // per thread: 16 pieces of 4
  std::atomic<int64_t> others_done{0};
  std::atomic<bool> timed_out{false};
  pool.ParallelFor(
      kN,
      [&](int64_t begin, int64_t end) {
        if (begin > 0) {
          others_done.fetch_add(end - begin);
          return;
        }
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
        while (others_done.load() < kN - end) {
          if (std::chrono::steady_clock::now() > until) {
            timed_out.store(true);
            return;
          }
          std::this_thread::yield();
        }
      },
      /*min_chunk=*/1, kPieces);
  EXPECT_FALSE(timed_out.load()) << "the other pieces waited for the held-up one";
  EXPECT_EQ(others_done.load(), kN - kN / (2 * kPieces));
}

TEST(ThreadPool, CallsAfterTheWorkersSleptVisitEveryIndexOnce) {
  ThreadPool pool(2);
  for (int call = 0; call < 20; ++call) {
    // Longer than the polling window: every worker has gone to sleep before the next call.
    std::this_thread::sleep_for(pool.spin() * 4 + std::chrono::microseconds(100));
    ExpectEachIndexOnce(pool, 1000, 1);
  }
}

TEST(ThreadPool, TheCallerWaitsForWorkersThatEndLast) {
  ThreadPool pool(2);
  // The workers' chunks take longer than the caller's polling window: the caller sleeps.
  for (int call = 0; call < 5; ++call)
    ExpectEachIndexOnce(pool, 300, 1, pool.spin() * 6 + std::chrono::microseconds(300));
}

TEST(ThreadPool, ResultsOfEveryChunkAreVisibleToTheCaller) {
  ThreadPool pool(4);
  std::vector<int64_t> out(4096);
  for (int call = 0; call < 500; ++call) {
    pool.ParallelFor(static_cast<int64_t>(out.size()), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) out[static_cast<size_t>(i)] = i * call;
    });
    for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], static_cast<int64_t>(i) * call) << "call " << call;
  }
}

TEST(ThreadPool, DestroyedWithWorkersPollingOrAsleep) {
  for (int i = 0; i < 50; ++i) {
    ThreadPool polling(2);
    ExpectEachIndexOnce(polling, 100, 1);  // destroyed right after: the workers are still polling
  }
  ThreadPool asleep(2);
  ExpectEachIndexOnce(asleep, 100, 1);
  std::this_thread::sleep_for(asleep.spin() * 4 + std::chrono::microseconds(100));
}

// A chunk that throws, on the caller or on a worker: the call still waits for every chunk, then
// rethrows; the pool keeps working.
TEST(ThreadPool, ExceptionsReachTheCallerAfterEveryChunkEnded) {
  ThreadPool pool(2);
  for (int64_t thrower : {int64_t{0}, int64_t{150}}) {  // the caller's chunk, a worker's chunk
    std::atomic<int> ended{0};
    EXPECT_THROW(pool.ParallelFor(
                     300,
                     [&](int64_t begin, int64_t end) {
                       if (begin <= thrower && thrower < end) throw std::runtime_error("chunk failed");
                       std::this_thread::sleep_for(std::chrono::milliseconds(2));
                       ended.fetch_add(1);
                     },
                     1),
                 std::runtime_error);
    EXPECT_EQ(ended.load(), 1) << "thrower at " << thrower;  // the other chunk ended before the rethrow
    ExpectEachIndexOnce(pool, 1000, 1);
  }
}

TEST(ThreadPool, ConcurrentCallersAreSerialised) {
  ThreadPool pool(2);
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&] {
      for (int call = 0; call < 200; ++call) ExpectEachIndexOnce(pool, 257, 3);
    });
  for (auto& t : callers) t.join();
}

// The CPUs a pool is sized by are the affinity mask's: a thread confined to one CPU sees one.
TEST(AvailableCpus, FollowsTheAffinityMask) {
  cpu_set_t all;
  CPU_ZERO(&all);
  ASSERT_EQ(sched_getaffinity(0, sizeof all, &all), 0);
  EXPECT_EQ(AvailableCpus(), CPU_COUNT(&all));
  int first = 0;
  while (!CPU_ISSET(first, &all)) ++first;
  std::thread([first] {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(first, &one);
    ASSERT_EQ(sched_setaffinity(0, sizeof one, &one), 0);
    EXPECT_EQ(AvailableCpus(), 1);
  }).join();
  EXPECT_EQ(AvailableCpus(), CPU_COUNT(&all));  // only that thread was confined
}

TEST(ThreadPool, PinnedWorkersRunOnTheirCpuOfTheMask) {
  cpu_set_t all;
  CPU_ZERO(&all);
  ASSERT_EQ(sched_getaffinity(0, sizeof all, &all), 0);
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &all)) cpus.push_back(c);
  // Every CPU of the mask gets a thread; worker i's chunk (fixed chunks: one per thread, in order)
  // runs on the i-th CPU, several calls over.
  const int n = static_cast<int>(cpus.size());
  ThreadPool pool(n, /*pin_workers=*/true);
  if (n < 2) {
    EXPECT_FALSE(pool.pinned()) << "a pool of one thread has no worker to pin";
    return;
  }
  if (!pool.pinned()) GTEST_SKIP() << "the system refused to bind threads to CPUs";
  if (sched_getcpu() < 0) GTEST_SKIP() << "sched_getcpu is not supported here";
  for (int call = 0; call < 20; ++call) {
    std::vector<int> where(static_cast<size_t>(n), -1);
    pool.ParallelFor(n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) where[static_cast<size_t>(i)] = sched_getcpu();
    });
    for (int i = 1; i < n; ++i)
      EXPECT_EQ(where[static_cast<size_t>(i)], cpus[static_cast<size_t>(i)]) << "worker " << i;
    if (call == 10) std::this_thread::sleep_for(std::chrono::milliseconds(5));  // workers asleep, then woken
  }
  // More threads than CPUs: nothing to pin to, the pool runs unpinned.
  ThreadPool wide(n + 1, /*pin_workers=*/true);
  EXPECT_FALSE(wide.pinned());
  ExpectEachIndexOnce(wide, 1000, 1);
}

}  // namespace
}  // namespace ef
