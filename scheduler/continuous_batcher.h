// ContinuousBatcher: continuous batching with ExpertFlow regrouping and a starvation bound.
//
// Each running request has exactly one ready unit: its next prefill chunk (up to
// `prefill_chunk_tokens` of the prompt) or, once the prompt is done, its next decode step (one
// token). Units of a request are emitted strictly in order (a request appears at most once per
// batch and its next unit only exists after Complete()), so KV-cache order is always correct.
//
// NextBatch() picks which ready units run, under `max_batch_tokens` and `max_batch_requests`:
//   1. Starvation bound. A unit that became ready at step s must run by step s + max_wait_steps.
//      Earliest-deadline-first feasibility decides how many units must run now: with C =
//      max_batch_requests, at least max over h >= 0 of (#units due by step now + h) - C * h of
//      them, earliest deadline first. Admission keeps at most C * (max_wait_steps + 1) requests
//      running, so the due units always fit (prefill chunks of due units shrink to fit the token
//      budget, at least one token each; requires max_batch_requests <= max_batch_tokens).
//   2. Regrouping. The remaining room goes to the units whose predicted experts add the fewest
//      new (layer, expert) bits per token to the batch's union (ties: oldest first).
// Without a path oracle (or with regroup off) step 2 is oldest-first, i.e. FCFS.
//
// Not thread-safe: one scheduler thread drives NextBatch()/Complete() in alternation.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "runtime/core/status.h"
#include "scheduler/request_queue.h"

namespace ef::scheduler {

struct BatcherOptions {
  int max_batch_tokens = 256;     // tokens per batch (prefill chunks + decode steps)
  int max_batch_requests = 64;    // units (requests) per batch
  int prefill_chunk_tokens = 64;  // largest prefill chunk of one request
  int64_t kv_capacity_tokens = 1 << 20;
  int max_wait_steps = 3;  // a ready unit waits at most this many steps
  bool regroup = true;
};

struct BatchItem {
  int64_t request_id = 0;
  int first_pos = 0;  // position of the unit's first token in its sequence
  int num_tokens = 0;
  bool prefill = false;
};

struct Batch {
  int64_t step = 0;
  std::vector<BatchItem> items;
  int num_tokens = 0;
};

class ContinuousBatcher {
 public:
  // Predicted experts of a unit as a bitset (layer * num_experts + expert), `num_words` words.
  using PathOracle = std::function<void(const BatchItem& unit, uint64_t* words)>;

  static StatusOr<ContinuousBatcher> Create(BatcherOptions options, int num_path_words = 0, PathOracle oracle = {});

  Status Submit(const Request& request) { return queue_.Push(request); }
  // The next batch (may be empty when nothing is ready). Advances the step counter.
  Batch NextBatch();
  // Marks the units of `batch` done: prompts advance, decode steps count, finished requests leave.
  Status Complete(const Batch& batch);

  int64_t step() const { return step_; }
  size_t num_running() const { return running_.size(); }
  size_t num_waiting() const { return queue_.num_waiting(); }
  const BatcherOptions& options() const { return options_; }

 private:
  struct Running {
    Request request;
    int prefilled = 0;
    int decoded = 0;
    int64_t ready_since = 0;  // step its current unit became ready
    bool in_flight = false;
  };
  ContinuousBatcher(BatcherOptions options, int num_path_words, PathOracle oracle)
      : options_(options), queue_(options.kv_capacity_tokens), num_words_(num_path_words), oracle_(std::move(oracle)) {}
  BatchItem NextUnit(const Running& r) const;

  BatcherOptions options_;
  RequestQueue queue_;
  int num_words_;
  PathOracle oracle_;
  std::vector<Running> running_;
  int64_t step_ = 0;
};

}  // namespace ef::scheduler
