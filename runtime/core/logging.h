// Logging with levels and subsystems, NCCL_DEBUG style.
//
//   EF_LOG(INFO, CACHE, "evicted expert %d of layer %d", e, l);
//
// EF_LOG_LEVEL=ERROR|WARN|INFO|DEBUG|TRACE (default WARN), EF_LOG_SUBSYS=CACHE,COMM (default
// all; a leading ^ excludes), EF_LOG_FIRST_RANK=1 prints only on rank 0. Lines go to stderr with
// the prefix `host:pid [rank r dev d] LEVEL SUBSYS`. Messages are lowercase. Thread-safe.
#pragma once

#include <string>

namespace ef::log {

enum class Level { kError = 0, kWarn = 1, kInfo = 2, kDebug = 3, kTrace = 4 };

bool Enabled(Level level, const char* subsys);
void Write(Level level, const char* subsys, const char* file, int line, const char* fmt, ...)
    __attribute__((format(printf, 5, 6)));
// Rank and device shown in the prefix; set by the launcher once known (-1: unknown).
void SetRank(int rank);
void SetDevice(int device);
// Overrides EF_LOG_LEVEL (e.g. from --verbose).
void SetLevel(Level level);

}  // namespace ef::log

namespace ef {
std::string LogPrefix();
}

#define EF_LOG(LEVEL, SUBSYS, ...)                                                          \
  do {                                                                                      \
    if (::ef::log::Enabled(::ef::log::k##LEVEL##_EF, #SUBSYS))                              \
      ::ef::log::Write(::ef::log::k##LEVEL##_EF, #SUBSYS, __FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

// Level spellings usable in EF_LOG(LEVEL, ...).
namespace ef::log {
inline constexpr Level kERROR_EF = Level::kError;
inline constexpr Level kWARN_EF = Level::kWarn;
inline constexpr Level kINFO_EF = Level::kInfo;
inline constexpr Level kDEBUG_EF = Level::kDebug;
inline constexpr Level kTRACE_EF = Level::kTrace;
}  // namespace ef::log
