// Status and StatusOr<T>: the error currency at every library boundary.
//
// An OK Status is a null pointer (cheap to return and test); an error owns a code and a
// message. Messages are lowercase, say what failed and name the object (file, key, rank).
// Each EF_RETURN_IF_ERROR level may append a "file:line" breadcrumb so a failure deep in a
// loader reads as a short trace.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace ef {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,  // the caller (user input, config, file contents) is wrong
  kNotFound,         // a named thing (file, tensor, key) is absent
  kOutOfRange,       // an index or size past a bound
  kFailedPrecondition,
  kUnimplemented,      // valid request the runtime does not support (e.g. model type)
  kResourceExhausted,  // out of memory / budget
  kDeadlineExceeded,   // a wait timed out (names the peer)
  kUnavailable,        // a peer died or a device is missing
  kInternal,           // a bug or a foreign library error
  kDataLoss,           // truncated or corrupt file
};

const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message);
  Status(const Status& other) : rep_(other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr) {}
  Status& operator=(const Status& other) {
    rep_ = other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr;
    return *this;
  }
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  static Status Ok() { return Status(); }
  bool ok() const { return rep_ == nullptr; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  const std::string& message() const;
  // "invalid argument: <message>" or "ok".
  std::string ToString() const;
  // Adds a "\n  at file:line" breadcrumb (used by EF_RETURN_IF_ERROR).
  Status& AddTrace(const char* file, int line);
  // Prefixes the message with context ("loading model x: ...").
  Status& Prepend(std::string_view context);
  void IgnoreError() const {}

 private:
  struct Rep {
    StatusCode code;
    std::string message;
  };
  std::unique_ptr<Rep> rep_;
};

inline Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status OutOfRange(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status FailedPrecondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
inline Status Unimplemented(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
inline Status ResourceExhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
inline Status DeadlineExceeded(std::string m) { return {StatusCode::kDeadlineExceeded, std::move(m)}; }
inline Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
inline Status DataLoss(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }

// Holds either a value or a non-OK Status. Accessing the value of an error aborts (a bug).
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(Status status) : status_(std::move(status)) {  // NOLINT: implicit by design
    if (status_.ok()) status_ = Internal("StatusOr constructed from an OK status without a value");
  }
  StatusOr(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design

  bool ok() const { return status_.ok(); }
  const Status& status() const& { return status_; }
  Status status() && { return std::move(status_); }

  T& value() & {
    CheckOk();
    return *value_;
  }
  const T& value() const& {
    CheckOk();
    return *value_;
  }
  T&& value() && {
    CheckOk();
    return std::move(*value_);
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  void CheckOk() const;
  Status status_;
  std::optional<T> value_;
};

[[noreturn]] void DieOnBadStatusOrAccess(const Status& status);

template <typename T>
void StatusOr<T>::CheckOk() const {
  if (!status_.ok()) DieOnBadStatusOrAccess(status_);
}

}  // namespace ef

#define EF_STATUS_CONCAT_INNER_(a, b) a##b
#define EF_STATUS_CONCAT_(a, b) EF_STATUS_CONCAT_INNER_(a, b)

// Returns the Status of `expr` from the enclosing function if it is an error.
#define EF_RETURN_IF_ERROR(expr)               \
  do {                                         \
    ::ef::Status ef_status_ = (expr);          \
    if (!ef_status_.ok()) {                    \
      ef_status_.AddTrace(__FILE__, __LINE__); \
      return ef_status_;                       \
    }                                          \
  } while (0)

// `EF_ASSIGN_OR_RETURN(auto x, MakeX());` declares x from a StatusOr or returns its error.
#define EF_ASSIGN_OR_RETURN(lhs, expr) \
  EF_ASSIGN_OR_RETURN_IMPL_(EF_STATUS_CONCAT_(ef_statusor_, __COUNTER__), lhs, expr)
#define EF_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) {                                \
    ::ef::Status s_ = std::move(tmp).status();    \
    s_.AddTrace(__FILE__, __LINE__);              \
    return s_;                                    \
  }                                               \
  lhs = std::move(tmp).value()
