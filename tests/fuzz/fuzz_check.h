// Invariant checks for the fuzz targets. A failed check aborts, which libFuzzer reports as a
// crash and saves the input: a parser that accepted something must hand back a value its
// users can rely on, not just avoid crashing.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string_view>

#define EF_FUZZ_CHECK(cond)                                                                  \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      std::fprintf(stderr, "%s:%d: fuzz invariant failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)

namespace ef::fuzz {

// Splits `data` at its first NUL byte: the part before and the part after (empty when there
// is no NUL). Targets that take two inputs use it, so that seeds stay readable text.
inline std::pair<std::string_view, std::string_view> SplitAtNul(std::string_view data) {
  size_t nul = data.find('\0');
  if (nul == std::string_view::npos) return {data, {}};
  return {data.substr(0, nul), data.substr(nul + 1)};
}

}  // namespace ef::fuzz
