// Checks of number flags whose errors read "--flag: must be > 0, got X" (CLI11's PositiveNumber
// and NonNegativeNumber name a range that ends at the largest double, printed in full).
#pragma once

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

namespace ef::launch {

inline CLI::Validator NumberAtLeast(bool zero_ok) {
  return CLI::Validator(
      [zero_ok](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        if (end == text.c_str() || *end != '\0' || !std::isfinite(v)) return "expected a number, got '" + text + "'";
        if (zero_ok ? v >= 0 : v > 0) return std::string();
        return std::string(zero_ok ? "must be >= 0" : "must be > 0") + ", got " + text;
      },
      zero_ok ? "NUMBER >= 0" : "NUMBER > 0");
}

inline const CLI::Validator kPositive = NumberAtLeast(false);
inline const CLI::Validator kNonNegative = NumberAtLeast(true);

// A seed: an integer from 0 to 2^64 - 1 (CLI11 reads "-5" or 2^64 into a uint64_t by wrapping).
inline const CLI::Validator kSeed(
    [](std::string& text) -> std::string {
      uint64_t v = 0;
      const char* end = text.data() + text.size();
      const auto [ptr, ec] = std::from_chars(text.data(), end, v);
      if (text.empty() || ec != std::errc() || ptr != end)
        return "expected an integer from 0 to 18446744073709551615, got '" + text + "'";
      return std::string();
    },
    "0..2^64-1");

// An output file: checked when the command line is read, before the work that would write it
// (a benchmark, a calibration) runs. "-" (standard output, where a command takes it) passes; an
// existing file must be writable, a new one's directory must exist and be writable. Under mpirun
// only rank 0 checks: it is the rank that writes these files.
inline const CLI::Validator kOutputFile(
    [](std::string& path) -> std::string {
      if (path.empty()) return "needs a file name";
      if (path == "-") return std::string();
      for (const char* rank : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"})
        if (const char* r = std::getenv(rank); r && std::string(r) != "0") return std::string();
      std::error_code ec;
      if (std::filesystem::is_directory(path, ec)) return path + " is a directory, not a file";
      if (std::filesystem::exists(path, ec))
        return ::access(path.c_str(), W_OK) == 0 ? std::string() : path + ": cannot write it: " + std::strerror(errno);
      const std::filesystem::path dir = std::filesystem::absolute(path, ec).parent_path();
      if (!std::filesystem::is_directory(dir, ec)) return path + ": the directory " + dir.string() + " does not exist";
      if (::access(dir.c_str(), W_OK) != 0)
        return path + ": cannot write in " + dir.string() + ": " + std::strerror(errno);
      return std::string();
    },
    "FILE");

}  // namespace ef::launch
