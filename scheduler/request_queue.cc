#include "scheduler/request_queue.h"

#include <string>

namespace ef::scheduler {

Status RequestQueue::Push(const Request& request) {
  if (request.prompt_tokens < 1)
    return InvalidArgument("request " + std::to_string(request.id) + " has no prompt tokens");
  if (request.max_new_tokens < 0)
    return InvalidArgument("request " + std::to_string(request.id) + " has negative max_new_tokens");
  if (request.kv_tokens() > kv_capacity_)
    return ResourceExhausted("request " + std::to_string(request.id) + " needs " + std::to_string(request.kv_tokens()) +
                             " kv tokens, the cache holds " + std::to_string(kv_capacity_));
  waiting_.push_back(request);
  return Status::Ok();
}

std::vector<Request> RequestQueue::Admit(int max_count) {
  std::vector<Request> out;
  while (!waiting_.empty() && static_cast<int>(out.size()) < max_count &&
         kv_used_ + waiting_.front().kv_tokens() <= kv_capacity_) {
    kv_used_ += waiting_.front().kv_tokens();
    out.push_back(waiting_.front());
    waiting_.pop_front();
  }
  return out;
}

void RequestQueue::Release(const Request& request) { kv_used_ -= request.kv_tokens(); }

}  // namespace ef::scheduler
