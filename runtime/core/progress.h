// Progress: one line about long start-up work (pinning the host tier, quantizing experts, filling
// a host shard): bytes done, GB/s and time left. On a terminal the line is redrawn in place; in a
// log a line is written every `interval` seconds. Nothing is printed for work that ends before the
// first interval. Under mpirun, `label` says which rank (group) the line is about.
//
//   Progress p("pinning experts", total_bytes);
//   for (...) { ...; p.Advance(bytes); }
//   p.Done();
//
// Not thread-safe: one thread advances it.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace ef {

class Progress {
 public:
  // unit: empty for bytes (printed in GB), else what is counted ("tokens"), printed as counted.
  Progress(std::string what, int64_t total_bytes, double interval_s = 2.0, std::string unit = "");
  ~Progress() { Done(); }
  void Advance(int64_t bytes);
  // Prints the final line if any line was printed (idempotent).
  void Done();

 private:
  void Print(bool final_line);

  std::string what_;
  std::string unit_;  // empty: bytes
  int64_t total_ = 0, done_ = 0;
  double interval_s_;
  bool tty_ = false, printed_ = false, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_;
};

}  // namespace ef
