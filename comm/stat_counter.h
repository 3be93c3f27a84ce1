// StatCounter: a statistics counter that one thread writes and any thread reads (e.g. /metrics on
// an HTTP thread while the engine thread runs the exchange).
//
// Invariant: a single writer. An increment is then a relaxed load and store, not a locked
// read-modify-write, so the hot path pays nothing over a plain int64_t; readers see a value the
// counter really had (no tearing), never older than one they saw before.
#pragma once

#include <atomic>
#include <cstdint>

namespace ef::comm {

class StatCounter {
 public:
  // Writer thread only.
  StatCounter& operator+=(int64_t n) {
    v_.store(v_.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
    return *this;
  }
  StatCounter& operator++() { return *this += 1; }
  // Any thread.
  int64_t load() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> v_{0};
};

}  // namespace ef::comm
