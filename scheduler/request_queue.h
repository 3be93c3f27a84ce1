// RequestQueue: requests waiting for admission, admitted strictly first-come first-served against
// a KV-cache budget (in tokens). A request reserves prompt + max_new_tokens KV slots when admitted
// and gives them back when it finishes, so an admitted request never runs out of KV cache and
// nothing is ever preempted. Strict FCFS admission (a request that does not fit blocks the ones
// behind it) means a large request is never starved by a stream of small ones.
//
// Not thread-safe: owned by the scheduler thread.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "runtime/core/status.h"

namespace ef::scheduler {

struct Request {
  int64_t id = 0;
  int prompt_tokens = 0;   // >= 1
  int max_new_tokens = 0;  // decode steps, >= 0
  int64_t arrival_step = 0;

  int64_t kv_tokens() const { return static_cast<int64_t>(prompt_tokens) + max_new_tokens; }
};

class RequestQueue {
 public:
  explicit RequestQueue(int64_t kv_capacity_tokens) : kv_capacity_(kv_capacity_tokens) {}

  // Rejects requests that could never be admitted (bigger than the whole KV budget) or are malformed.
  Status Push(const Request& request);
  // Pops, in arrival order, the requests that fit in the free KV budget (at most max_count).
  std::vector<Request> Admit(int max_count);
  // A finished request gives back its reservation.
  void Release(const Request& request);

  size_t num_waiting() const { return waiting_.size(); }
  int64_t kv_used() const { return kv_used_; }
  int64_t kv_capacity() const { return kv_capacity_; }

 private:
  int64_t kv_capacity_;
  int64_t kv_used_ = 0;
  std::deque<Request> waiting_;
};

}  // namespace ef::scheduler
