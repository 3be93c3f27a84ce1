#include "runtime/core/check.h"

#include "runtime/core/logging.h"

namespace ef::detail {

void CheckFailed(const char* expr, const char* file, int line, const char* msg) {
  std::fprintf(stderr, "%s check failed: %s %s at %s:%d\n", LogPrefix().c_str(), expr, msg, file, line);
  std::fflush(stderr);
  std::abort();
}

}  // namespace ef::detail
