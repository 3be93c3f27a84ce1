#include <cstdio>

#include "launch/command.h"

namespace ef::launch {

int ReportError(const Status& status) {
  std::fprintf(stderr, "error: %s\n", status.message().c_str());
  return 1;
}

}  // namespace ef::launch
