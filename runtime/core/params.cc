#include "runtime/core/params.h"

#include <algorithm>
#include <cstdlib>
#include <mutex>

#include "runtime/core/logging.h"

namespace ef::params {
namespace {
std::vector<ParamInfo>& Registry() {
  static std::vector<ParamInfo> registry;
  return registry;
}
std::mutex& RegistryMutex() {
  static std::mutex mu;
  return mu;
}
}  // namespace

std::vector<ParamInfo> AllParams() {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  std::vector<ParamInfo> out = Registry();
  std::sort(out.begin(), out.end(), [](const ParamInfo& a, const ParamInfo& b) { return a.key < b.key; });
  return out;
}

namespace detail {
int Register(ParamInfo info) {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  Registry().push_back(std::move(info));
  return 0;
}
const char* GetEnv(const char* key) { return std::getenv(key); }  // NOLINT: the one getenv
bool Parse(const char* text, int64_t* out) {
  char* end = nullptr;
  long long v = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0') return false;
  *out = v;
  return true;
}
bool Parse(const char* text, double* out) {
  char* end = nullptr;
  double v = std::strtod(text, &end);
  if (end == text || *end != '\0') return false;
  *out = v;
  return true;
}
bool Parse(const char* text, bool* out) {
  std::string s(text);
  std::transform(s.begin(), s.end(), s.begin(), ::tolower);
  if (s == "1" || s == "true" || s == "yes" || s == "on") return *out = true, true;
  if (s == "0" || s == "false" || s == "no" || s == "off") return *out = false, true;
  return false;
}
bool Parse(const char* text, std::string* out) {
  *out = text;
  return true;
}
void WarnBadValue(const char* key, const char* text) {
  EF_LOG(WARN, CORE, "ignoring %s=%s: not a valid value, keeping the default", key, text);
}
}  // namespace detail
}  // namespace ef::params
