#include "runtime/core/status.h"

#include <cstdio>
#include <cstdlib>

namespace ef {

const char* StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "ok";
    case StatusCode::kInvalidArgument:
      return "invalid argument";
    case StatusCode::kNotFound:
      return "not found";
    case StatusCode::kOutOfRange:
      return "out of range";
    case StatusCode::kFailedPrecondition:
      return "failed precondition";
    case StatusCode::kUnimplemented:
      return "unimplemented";
    case StatusCode::kResourceExhausted:
      return "resource exhausted";
    case StatusCode::kDeadlineExceeded:
      return "deadline exceeded";
    case StatusCode::kUnavailable:
      return "unavailable";
    case StatusCode::kInternal:
      return "internal";
    case StatusCode::kDataLoss:
      return "data loss";
  }
  return "unknown";
}

Status::Status(StatusCode code, std::string message) {
  if (code != StatusCode::kOk) rep_ = std::make_unique<Rep>(Rep{code, std::move(message)});
}

const std::string& Status::message() const {
  static const std::string kEmpty;
  return rep_ ? rep_->message : kEmpty;
}

std::string Status::ToString() const {
  if (ok()) return "ok";
  return std::string(StatusCodeName(rep_->code)) + ": " + rep_->message;
}

Status& Status::AddTrace(const char* file, int line) {
  if (rep_) {
    // Keep breadcrumbs short: path relative to the source root.
    std::string_view f(file);
    for (std::string_view top : {"runtime/", "comm/", "cache/", "placement/", "scheduler/", "launch/", "tests/"}) {
      if (auto p = f.rfind(top); p != std::string_view::npos) {
        f = f.substr(p);
        break;
      }
    }
    rep_->message += "\n  at " + std::string(f) + ":" + std::to_string(line);
  }
  return *this;
}

Status& Status::Prepend(std::string_view context) {
  if (rep_) rep_->message = std::string(context) + ": " + rep_->message;
  return *this;
}

void DieOnBadStatusOrAccess(const Status& status) {
  std::fprintf(stderr, "fatal: value() of a StatusOr holding an error: %s\n", status.ToString().c_str());
  std::abort();
}

}  // namespace ef
