// Environment knobs, declared once with a default and a description (in the spirit of
// NCCL_PARAM). `expertflow info` lists every knob, its value and where the value came from.
//
//   EF_PARAM(NumThreads, int64_t, "EF_NUM_THREADS", 0, "CPU backend threads (0: all cores)");
//   ... ef::params::NumThreads() ...
//
// A knob is read from the environment on first use and cached; it is never re-read. Parsing
// failures (EF_NUM_THREADS=abc) warn once and keep the default. This header is the only place
// that calls getenv.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace ef::params {

struct ParamInfo {
  std::string key;   // environment variable
  std::string type;  // "int", "double", "bool", "string"
  std::string default_value;
  std::string doc;
  std::function<std::string()> current;  // value now in force, as text
  std::function<bool()> from_env;        // whether the environment set it
};

// Every registered knob, sorted by key. Thread-safe after static initialisation.
std::vector<ParamInfo> AllParams();

namespace detail {
int Register(ParamInfo info);
const char* GetEnv(const char* key);
bool Parse(const char* text, int64_t* out);
bool Parse(const char* text, double* out);
bool Parse(const char* text, bool* out);
bool Parse(const char* text, std::string* out);
template <typename T>
std::string ToText(const T& v) {
  if constexpr (std::is_same_v<T, std::string>)
    return v;
  else if constexpr (std::is_same_v<T, bool>)
    return v ? "1" : "0";
  else
    return std::to_string(v);
}
template <typename T>
const char* TypeName() {
  if constexpr (std::is_same_v<T, int64_t>)
    return "int";
  else if constexpr (std::is_same_v<T, double>)
    return "double";
  else if constexpr (std::is_same_v<T, bool>)
    return "bool";
  else
    return "string";
}
void WarnBadValue(const char* key, const char* text);
}  // namespace detail

}  // namespace ef::params

// Defines ef::params::NAME() returning the knob's value. Use at namespace scope in one .cc file;
// declare `namespace ef::params { TYPE NAME(); }` where other files need it.
#define EF_PARAM(NAME, TYPE, KEY, DEFAULT, DOC)                                                                \
  namespace ef::params {                                                                                       \
  namespace {                                                                                                  \
  struct NAME##State {                                                                                         \
    TYPE value;                                                                                                \
    bool from_env = false;                                                                                     \
    NAME##State() : value(DEFAULT) {                                                                           \
      if (const char* text = detail::GetEnv(KEY)) {                                                            \
        TYPE parsed{};                                                                                         \
        if (detail::Parse(text, &parsed)) {                                                                    \
          value = parsed;                                                                                      \
          from_env = true;                                                                                     \
        } else {                                                                                               \
          detail::WarnBadValue(KEY, text);                                                                     \
        }                                                                                                      \
      }                                                                                                        \
    }                                                                                                          \
  };                                                                                                           \
  NAME##State& NAME##Get() {                                                                                   \
    static NAME##State state;                                                                                  \
    return state;                                                                                              \
  }                                                                                                            \
  [[maybe_unused]] const int NAME##registered = detail::Register(                                              \
      ParamInfo{KEY, detail::TypeName<TYPE>(), detail::ToText<TYPE>(DEFAULT), DOC,                             \
                [] { return detail::ToText<TYPE>(NAME##Get().value); }, [] { return NAME##Get().from_env; }}); \
  }                                                                                                            \
  TYPE NAME() { return NAME##Get().value; }                                                                    \
  }
