// EF_CHECK: aborts on a programmer bug (never on user input: return a Status for that).
#pragma once

#include <cstdio>
#include <cstdlib>

namespace ef::detail {
[[noreturn]] void CheckFailed(const char* expr, const char* file, int line, const char* msg);
}  // namespace ef::detail

#define EF_CHECK(cond)                                          \
  do {                                                          \
    if (!(cond)) [[unlikely]]                                   \
      ::ef::detail::CheckFailed(#cond, __FILE__, __LINE__, ""); \
  } while (0)

#define EF_CHECK_MSG(cond, msg)                                  \
  do {                                                           \
    if (!(cond)) [[unlikely]]                                    \
      ::ef::detail::CheckFailed(#cond, __FILE__, __LINE__, msg); \
  } while (0)

#ifdef NDEBUG
#define EF_DCHECK(cond) \
  do {                  \
  } while (0)
#else
#define EF_DCHECK(cond) EF_CHECK(cond)
#endif
