// Checks of number flags whose errors read "--flag: must be > 0, got X" (CLI11's PositiveNumber
// and NonNegativeNumber name a range that ends at the largest double, printed in full).
#pragma once

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <string>

namespace ef::launch {

inline CLI::Validator NumberAtLeast(bool zero_ok) {
  return CLI::Validator(
      [zero_ok](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        if (end == text.c_str() || *end != '\0' || v != v) return "expected a number, got '" + text + "'";
        if (zero_ok ? v >= 0 : v > 0) return std::string();
        return std::string(zero_ok ? "must be >= 0" : "must be > 0") + ", got " + text;
      },
      zero_ok ? "NUMBER >= 0" : "NUMBER > 0");
}

inline const CLI::Validator kPositive = NumberAtLeast(false);
inline const CLI::Validator kNonNegative = NumberAtLeast(true);

}  // namespace ef::launch
