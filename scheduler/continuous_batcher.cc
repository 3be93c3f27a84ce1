#include "scheduler/continuous_batcher.h"

#include <algorithm>
#include <bit>
#include <numeric>
#include <string>

#include "runtime/core/logging.h"

namespace ef::scheduler {

StatusOr<ContinuousBatcher> ContinuousBatcher::Create(BatcherOptions options, int num_path_words, PathOracle oracle) {
  if (options.max_batch_tokens < 1) return InvalidArgument("max_batch_tokens must be >= 1");
  if (options.max_batch_requests < 1) return InvalidArgument("max_batch_requests must be >= 1");
  if (options.max_batch_requests > options.max_batch_tokens)
    return InvalidArgument("max_batch_requests (" + std::to_string(options.max_batch_requests) +
                           ") must not exceed max_batch_tokens (" + std::to_string(options.max_batch_tokens) + ")");
  if (options.prefill_chunk_tokens < 1) return InvalidArgument("prefill_chunk_tokens must be >= 1");
  if (options.kv_capacity_tokens < 1) return InvalidArgument("kv_capacity_tokens must be >= 1");
  if (options.max_wait_steps < 0) return InvalidArgument("max_wait_steps must be >= 0");
  if (oracle && num_path_words < 1) return InvalidArgument("a path oracle needs num_path_words >= 1");
  return ContinuousBatcher(options, num_path_words, std::move(oracle));
}

BatchItem ContinuousBatcher::NextUnit(const Running& r) const {
  BatchItem u;
  u.request_id = r.request.id;
  if (r.prefilled < r.request.prompt_tokens) {
    u.prefill = true;
    u.first_pos = r.prefilled;
    u.num_tokens = std::min(options_.prefill_chunk_tokens, r.request.prompt_tokens - r.prefilled);
  } else {
    u.first_pos = r.request.prompt_tokens + r.decoded;
    u.num_tokens = 1;
  }
  return u;
}

Batch ContinuousBatcher::NextBatch() {
  const int C = options_.max_batch_requests;
  // Admission: FCFS against the KV budget, and at most C * (max_wait_steps + 1) running so the
  // starvation bound is feasible.
  const long max_running = static_cast<long>(C) * (options_.max_wait_steps + 1);
  const long room = max_running - static_cast<long>(running_.size());
  if (room > 0) {
    for (const Request& r : queue_.Admit(static_cast<int>(room))) {
      Running run;
      run.request = r;
      run.ready_since = step_;
      running_.push_back(run);
    }
  }

  Batch batch;
  batch.step = step_;
  std::vector<int> ready;
  for (int i = 0; i < static_cast<int>(running_.size()); ++i)
    if (!running_[i].in_flight) ready.push_back(i);
  // Earliest deadline (= oldest ready_since) first; ties by request id for determinism.
  std::stable_sort(ready.begin(), ready.end(), [&](int a, int b) {
    return running_[a].ready_since != running_[b].ready_since ? running_[a].ready_since < running_[b].ready_since
                                                              : running_[a].request.id < running_[b].request.id;
  });
  // Units that must run now: max over h of (#due by step_ + h) - C * h.
  int must = 0;
  {
    size_t idx = 0;
    for (int h = 0; h <= options_.max_wait_steps; ++h) {
      while (idx < ready.size() && running_[ready[idx]].ready_since + options_.max_wait_steps <= step_ + h) ++idx;
      must = std::max(must, static_cast<int>(idx) - C * h);
    }
    must = std::min<int>(must, static_cast<int>(ready.size()));
  }
  if (must > C) EF_LOG(WARN, SCHED, "%d units are due at step %lld but a batch holds %d", must, (long long)step_, C);

  int tokens_left = options_.max_batch_tokens;
  std::vector<char> taken(ready.size(), 0);
  const int forced = std::min(must, C);
  for (int j = 0; j < forced; ++j) {
    BatchItem u = NextUnit(running_[ready[j]]);
    // Leave at least one token for each remaining due unit.
    u.num_tokens = std::max(1, std::min(u.num_tokens, tokens_left - (forced - 1 - j)));
    tokens_left -= u.num_tokens;
    batch.items.push_back(u);
    taken[j] = 1;
  }

  // Fill the rest: regrouped by predicted experts, or oldest first.
  std::vector<uint64_t> batch_union(num_words_, 0), row(num_words_, 0);
  auto add_row = [&](const BatchItem& u) {
    if (!oracle_) return;
    std::fill(row.begin(), row.end(), 0);
    oracle_(u, row.data());
    for (int w = 0; w < num_words_; ++w) batch_union[w] |= row[w];
  };
  for (const auto& u : batch.items) add_row(u);
  const bool regroup = options_.regroup && oracle_;
  std::vector<std::vector<uint64_t>> rows;
  if (regroup) {
    rows.resize(ready.size());
    for (size_t j = 0; j < ready.size(); ++j) {
      if (taken[j]) continue;
      rows[j].assign(num_words_, 0);
      oracle_(NextUnit(running_[ready[j]]), rows[j].data());
    }
  }
  while (static_cast<int>(batch.items.size()) < C && tokens_left > 0) {
    int pick = -1;
    double best = 0;
    for (size_t j = 0; j < ready.size(); ++j) {
      if (taken[j]) continue;
      const BatchItem u = NextUnit(running_[ready[j]]);
      if (u.num_tokens > tokens_left) continue;
      if (!regroup) {
        pick = static_cast<int>(j);
        break;
      }
      int add = 0;
      for (int w = 0; w < num_words_; ++w) add += std::popcount(rows[j][w] & ~batch_union[w]);
      const double score = static_cast<double>(add) / u.num_tokens;
      if (pick < 0 || score < best) {
        pick = static_cast<int>(j);
        best = score;
      }
    }
    if (pick < 0) break;
    const BatchItem u = NextUnit(running_[ready[pick]]);
    taken[pick] = 1;
    tokens_left -= u.num_tokens;
    batch.items.push_back(u);
    if (regroup)
      for (int w = 0; w < num_words_; ++w) batch_union[w] |= rows[pick][w];
  }
  for (size_t j = 0; j < ready.size(); ++j)
    if (taken[j]) running_[ready[j]].in_flight = true;
  for (const auto& u : batch.items) batch.num_tokens += u.num_tokens;
  ++step_;
  return batch;
}

Status ContinuousBatcher::Complete(const Batch& batch) {
  for (const BatchItem& u : batch.items) {
    auto it =
        std::find_if(running_.begin(), running_.end(), [&](const Running& r) { return r.request.id == u.request_id; });
    if (it == running_.end() || !it->in_flight)
      return FailedPrecondition("request " + std::to_string(u.request_id) + " is not in flight");
    it->in_flight = false;
    it->ready_since = step_;
    if (u.prefill) {
      if (u.first_pos != it->prefilled) return Internal("prefill chunk out of order");
      it->prefilled += u.num_tokens;
    } else {
      ++it->decoded;
    }
    if (it->prefilled >= it->request.prompt_tokens && it->decoded >= it->request.max_new_tokens) {
      queue_.Release(it->request);
      running_.erase(it);
    }
  }
  return Status::Ok();
}

}  // namespace ef::scheduler
