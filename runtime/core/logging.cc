#include "runtime/core/logging.h"

#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/core/params.h"

EF_PARAM(LogLevel, std::string, "EF_LOG_LEVEL", "WARN", "log level: ERROR, WARN, INFO, DEBUG or TRACE");
EF_PARAM(LogSubsys, std::string, "EF_LOG_SUBSYS", "ALL",
         "comma-separated subsystems to log (CORE,MODEL,ENGINE,CACHE,COMM,PLACE,SCHED,SERVE,BENCH); ^ excludes");
EF_PARAM(LogFirstRank, bool, "EF_LOG_FIRST_RANK", false, "log only on rank 0");

namespace ef::log {
namespace {

std::atomic<int> g_rank{-1};
std::atomic<int> g_device{-1};
std::atomic<int> g_level_override{-1};

Level ParseLevel(const std::string& s) {
  if (s == "ERROR") return Level::kError;
  if (s == "INFO") return Level::kInfo;
  if (s == "DEBUG") return Level::kDebug;
  if (s == "TRACE") return Level::kTrace;
  return Level::kWarn;
}

struct SubsysFilter {
  bool exclude = false;
  bool all = true;
  std::vector<std::string> names;
  SubsysFilter() {
    std::string s = params::LogSubsys();
    if (s.empty() || s == "ALL") return;
    if (s[0] == '^') {
      exclude = true;
      s = s.substr(1);
    }
    all = false;
    size_t start = 0;
    while (start <= s.size()) {
      size_t end = s.find(',', start);
      if (end == std::string::npos) end = s.size();
      if (end > start) names.push_back(s.substr(start, end - start));
      start = end + 1;
    }
  }
  bool Pass(const char* subsys) const {
    if (all) return true;
    bool listed = false;
    for (const auto& n : names) listed |= (n == subsys);
    return exclude ? !listed : listed;
  }
};

const char* LevelName(Level l) {
  switch (l) {
    case Level::kError:
      return "ERROR";
    case Level::kWarn:
      return "WARN";
    case Level::kInfo:
      return "INFO";
    case Level::kDebug:
      return "DEBUG";
    case Level::kTrace:
      return "TRACE";
  }
  return "?";
}

}  // namespace

bool Enabled(Level level, const char* subsys) {
  static const Level env_level = ParseLevel(params::LogLevel());
  static const SubsysFilter filter;
  int ov = g_level_override.load(std::memory_order_relaxed);
  Level max = ov >= 0 ? static_cast<Level>(ov) : env_level;
  if (level > max) return false;
  if (params::LogFirstRank() && g_rank.load() > 0 && level != Level::kError) return false;
  return filter.Pass(subsys);
}

void Write(Level level, const char* subsys, const char* file, int line, const char* fmt, ...) {
  char body[2048];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(body, sizeof(body), fmt, ap);
  va_end(ap);
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (level >= Level::kDebug) {
    const char* base = std::strrchr(file, '/');
    std::fprintf(stderr, "%s %s %s %s:%d %s\n", LogPrefix().c_str(), LevelName(level), subsys, base ? base + 1 : file,
                 line, body);
  } else {
    std::fprintf(stderr, "%s %s %s %s\n", LogPrefix().c_str(), LevelName(level), subsys, body);
  }
  std::fflush(stderr);
}

void SetRank(int rank) { g_rank = rank; }
void SetDevice(int device) { g_device = device; }
void SetLevel(Level level) { g_level_override = static_cast<int>(level); }

}  // namespace ef::log

namespace ef {
std::string LogPrefix() {
  static const std::string host = [] {
    char h[256] = {0};
    gethostname(h, sizeof(h) - 1);
    return std::string(h);
  }();
  std::string p = host + ":" + std::to_string(getpid());
  int r = log::g_rank.load(), d = log::g_device.load();
  if (r >= 0 || d >= 0) {
    p += " [rank " + std::to_string(r);
    if (d >= 0) p += " dev " + std::to_string(d);
    p += "]";
  }
  return p;
}
}  // namespace ef
