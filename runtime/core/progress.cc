#include "runtime/core/progress.h"

#include <unistd.h>

#include <cstdio>

namespace ef {

Progress::Progress(std::string what, int64_t total_bytes, double interval_s, std::string unit)
    : what_(std::move(what)),
      unit_(std::move(unit)),
      total_(total_bytes),
      interval_s_(interval_s),
      tty_(isatty(STDERR_FILENO) == 1) {
  start_ = last_ = std::chrono::steady_clock::now();
}

void Progress::Advance(int64_t bytes) {
  done_ += bytes;
  const auto now = std::chrono::steady_clock::now();
  if (std::chrono::duration<double>(now - last_).count() < interval_s_) return;
  last_ = now;
  Print(false);
}

void Progress::Done() {
  if (finished_) return;
  finished_ = true;
  if (printed_) Print(true);
}

void Progress::Print(bool final_line) {
  printed_ = true;
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double rate = s > 0 ? static_cast<double>(done_) / s : 0;
  const double left = rate > 0 ? static_cast<double>(total_ - done_) / rate : 0;
  char line[256];
  if (!unit_.empty()) {
    const char* u = unit_.c_str();
    const auto n = static_cast<long long>(done_), t = static_cast<long long>(total_);
    if (final_line) {
      std::snprintf(line, sizeof line, "%s: %lld %s in %.1f s (%.0f %s/s)", what_.c_str(), n, u, s, rate, u);
    } else {
      std::snprintf(line, sizeof line, "%s: %lld of %lld %s, %.0f %s/s, %.0f s left", what_.c_str(), n, t, u, rate, u,
                    left);
    }
  } else if (final_line) {
    std::snprintf(line, sizeof line, "%s: %.1f GB in %.1f s (%.2f GB/s)", what_.c_str(), done_ / 1e9, s, rate / 1e9);
  } else {
    std::snprintf(line, sizeof line, "%s: %.1f of %.1f GB, %.2f GB/s, %.0f s left", what_.c_str(), done_ / 1e9,
                  total_ / 1e9, rate / 1e9, left);
  }
  if (tty_) {
    std::fprintf(stderr, "\r%-100s%s", line, final_line ? "\n" : "");
  } else {
    std::fprintf(stderr, "%s\n", line);
  }
  std::fflush(stderr);
}

}  // namespace ef
