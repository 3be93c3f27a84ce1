#include "launch/server/serving_loop.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>

#include "runtime/core/check.h"
#include "runtime/core/limits.h"
#include "runtime/core/logging.h"
#include "runtime/core/params.h"
#include "runtime/core/thread_pool.h"

EF_PARAM(DebugFailAtStep, int64_t, "EF_DEBUG_FAIL_AT_STEP", -1,
         "testing: the serving loop's forward pass with this 0-based number fails as an engine error would "
         "(every request in flight gets an error, then the server exits)");

EF_PARAM(DebugStepDelayUs, int64_t, "EF_DEBUG_STEP_DELAY_US", 0,
         "testing: the serving loop sleeps this long before each forward pass (a slow engine, so that "
         "requests are still in flight when a test acts on them)");

namespace ef::launch {

using Clock = std::chrono::steady_clock;
using runtime::FinishReason;

namespace {

// log-softmax of `row` at `token`, and the `top` most likely tokens (lowest id first on ties).
// Sums in double: the values are compared against an offline forward pass to 1e-5.
TokenLogprob LogprobOf(std::span<const float> row, int32_t token, int top) {
  const float max = *std::max_element(row.begin(), row.end());
  double sum = 0;
  for (float x : row) sum += std::exp(static_cast<double>(x) - max);
  const double lse = static_cast<double>(max) + std::log(sum);
  TokenLogprob t;
  t.token = token;
  t.logprob = static_cast<double>(row[token]) - lse;
  // A small sorted list: top <= kMaxTopLogprobs, so insertion beats sorting the vocabulary.
  std::vector<int32_t> best;
  best.reserve(static_cast<size_t>(top) + 1);
  for (int32_t i = 0; i < static_cast<int32_t>(row.size()) && top > 0; ++i) {
    if (static_cast<int>(best.size()) == top && row[i] <= row[best.back()]) continue;
    auto at = std::upper_bound(best.begin(), best.end(), i, [&](int32_t a, int32_t b) { return row[a] > row[b]; });
    best.insert(at, i);
    if (static_cast<int>(best.size()) > top) best.pop_back();
  }
  for (int32_t i : best) t.top.emplace_back(i, static_cast<double>(row[i]) - lse);
  return t;
}

}  // namespace

// --- RequestStream ---

StreamUpdate RequestStream::Take(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, timeout, [&] { return done_ || !pending_.empty(); });
  StreamUpdate u;
  u.text.swap(pending_);
  u.num_tokens = num_tokens_;
  u.done = done_;
  u.finish = finish_;
  u.error = error_;
  u.logprobs.swap(pending_logprobs_);
  u.prompt_logprobs.swap(pending_prompt_logprobs_);
  return u;
}

void RequestStream::Cancel() {
  std::lock_guard<std::mutex> lock(mu_);
  cancelled_ = true;
}

bool RequestStream::cancelled() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cancelled_;
}

void RequestStream::Push(const std::string& text, int num_tokens, bool wake) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_ += text;
    num_tokens_ = num_tokens;
  }
  if (wake) cv_.notify_all();
}

void RequestStream::PushLogprobs(std::vector<TokenLogprob> prompt, std::vector<TokenLogprob> generated) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& t : prompt) pending_prompt_logprobs_.push_back(std::move(t));
  for (auto& t : generated) pending_logprobs_.push_back(std::move(t));
}

void RequestStream::Finish(FinishReason finish, Status error) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    finish_ = finish;
    error_ = std::move(error);
  }
  cv_.notify_all();
}

// --- ServingLoop ---

// Wakes the handlers of the streams the engine thread hands it, off the engine thread.
class ServingLoop::Waker {
 public:
  Waker() : thread_([this] { Run(); }) {}
  ~Waker() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  // Takes the streams out of `streams` (left empty).
  void Post(std::vector<std::shared_ptr<RequestStream>>& streams) {
    if (streams.empty()) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& s : streams) queue_.push_back(std::move(s));
    }
    streams.clear();
    cv_.notify_one();
  }

 private:
  void Run() {
    std::vector<std::shared_ptr<RequestStream>> batch;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, nothing left to wake
        batch.swap(queue_);
      }
      for (auto& s : batch) s->Wake();
      batch.clear();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::shared_ptr<RequestStream>> queue_;
  bool stop_ = false;
  std::thread thread_;
};

struct ServingLoop::Active {
  ServeRequest request;
  std::shared_ptr<RequestStream> stream;
  Clock::time_point arrival;
  Clock::time_point last_token;
  int64_t seq = -1;
  bool prefilled = false;
  int32_t last = 0;
  std::vector<int32_t> generated;
  std::unique_ptr<runtime::Sampler> sampler;
  std::unique_ptr<runtime::StreamDecoder> decoder;
  std::string text;    // decoded so far (cut at a stop string once found)
  size_t emitted = 0;  // bytes of `text` already pushed to the stream
  size_t max_stop = 0;
  std::vector<uint64_t> forecast;  // the prompt's (layer, expert) bits, when regrouping
  int overtaken = 0;               // admission rounds in which younger requests went first
  // Preempted when the KV cache ran out (its sequence dropped): the prompt and the tokens
  // generated so far, prefilled again when it is readmitted. Empty otherwise.
  std::vector<int32_t> resume;
  // Tokens its next prefill feeds.
  const std::vector<int32_t>& to_prefill() const { return resume.empty() ? request.prompt : resume; }
  // No logprobs and no penalties: the token the backend picks from its row is all it needs
  // (SeqChunk::token_only): the arg max, or a draw with the request's sampling (runtime::SampleRow,
  // as the host draws).
  bool TokenOnly() const { return request.logprobs < 0 && !request.sampling.adjusts_logits(); }
  std::optional<runtime::Penalties> penalties;  // over the prompt and the tokens generated so far
  // The parameters and random draw of its next token: drawn once, kept until a token is taken
  // (a failed or retried step draws nothing new), so the tokens are the seed's wherever rows are
  // sampled.
  const runtime::RowSampling& NextDraw() {
    if (!draw) draw = sampler->Next();
    return *draw;
  }
  std::optional<runtime::RowSampling> draw;
  size_t prefill_done = 0;           // of to_prefill(), in the engine (chunked prefill)
  size_t prefill_now = 0;            // fed by the step in flight
  std::vector<TokenLogprob> scored;  // prompt logprobs of the chunks so far

  // Length of the longest suffix of text[emitted:] that begins some stop string.
  size_t HeldBack() const {
    size_t held = 0;
    const size_t avail = text.size() - emitted;
    for (const std::string& s : request.stop) {
      for (size_t len = std::min(avail, s.size() - 1); len > held; --len) {
        if (text.compare(text.size() - len, len, s, 0, len) == 0) {
          held = len;
          break;
        }
      }
    }
    return held;
  }
};

ServingLoop::ServingLoop(runtime::Engine* engine, runtime::Tokenizer tokenizer, ServerMetrics* metrics,
                         ServingLoopOptions options)
    : engine_(engine),
      tokenizer_(std::move(tokenizer)),
      metrics_(metrics),
      options_(options),
      config_(engine_->config()),
      max_seq_len_(engine_->max_seq_len()),
      waker_(std::make_unique<Waker>()) {
  metrics_hook_ = engine_->AddRoutingObserver([m = metrics_](runtime::LayerRouting& r) {
    m->CountRouting(r.layer, r.ids.data(), static_cast<int64_t>(r.ids.size()));
    return Status::Ok();
  });
  if (options_.regroup_window > 1 && options_.forecast) {
    EF_CHECK_MSG(options_.forecast_layers >= 1 && options_.forecast_layers <= scheduler::kMaxLayers &&
                     options_.forecast_experts >= 1 && options_.forecast_experts <= scheduler::kMaxExpertsPerLayer,
                 "admission forecast shape out of range");
    forecast_words_ = (options_.forecast_layers * options_.forecast_experts + 63) / 64;
    EF_LOG(INFO, SERVE, "admission regrouping over %d batches, starvation bound %d steps", options_.regroup_window,
           options_.max_wait_steps);
  }
  thread_ = std::thread([this] { Run(); });
}

ServingLoop::~ServingLoop() {
  Stop();
  engine_->RemoveRoutingHook(metrics_hook_);
}

StatusOr<std::unique_ptr<ServingLoop::Active>> ServingLoop::Prepare(ServeRequest request) const {
  if (request.prompt.empty()) return InvalidArgument("the prompt is empty");
  if (static_cast<int64_t>(request.prompt.size()) >= max_seq_len_)
    return InvalidArgument("the prompt has " + std::to_string(request.prompt.size()) + " tokens; the context holds " +
                           std::to_string(max_seq_len_));
  if (request.max_new_tokens < 0) return InvalidArgument("max_tokens must be >= 0");
  if (request.logprobs > limits::kMaxTopLogprobs)
    return InvalidArgument("logprobs must be at most " + std::to_string(limits::kMaxTopLogprobs));
  if (static_cast<int64_t>(request.prompt.size()) + request.max_new_tokens > max_seq_len_)
    return InvalidArgument("prompt (" + std::to_string(request.prompt.size()) + " tokens) + max_tokens (" +
                           std::to_string(request.max_new_tokens) + ") exceeds the context of " +
                           std::to_string(max_seq_len_) + " tokens");
  EF_RETURN_IF_ERROR(request.sampling.Validate());
  // The most it will hold: its prompt and max_tokens, and at least one row past the prompt (the
  // prefill is admitted with room for its first token).
  const int64_t kv_blocks =
      engine_->KvBlocksFor(static_cast<int64_t>(request.prompt.size()) + std::max(request.max_new_tokens, 1));
  if (kv_blocks > engine_->kv_capacity_blocks())  // could never run, even alone
    return InvalidArgument("prompt (" + std::to_string(request.prompt.size()) + " tokens) + max_tokens (" +
                           std::to_string(request.max_new_tokens) + ") needs " + std::to_string(kv_blocks) +
                           " blocks of the KV cache, which holds " + std::to_string(engine_->kv_capacity_blocks()) +
                           " (runtime.kv_cache_tokens)");
  auto a = std::make_unique<Active>();
  a->stream = std::make_shared<RequestStream>();
  a->stream->prompt_tokens_ = static_cast<int>(request.prompt.size());
  a->request = std::move(request);
  a->arrival = Clock::now();
  for (const std::string& s : a->request.stop) a->max_stop = std::max(a->max_stop, s.size());
  if (regrouping()) {
    a->forecast.assign(forecast_words_, 0);
    options_.forecast(a->request, a->forecast.data());
  }
  return a;
}

StatusOr<std::shared_ptr<RequestStream>> ServingLoop::Submit(ServeRequest request) {
  std::vector<ServeRequest> one;
  one.push_back(std::move(request));
  EF_ASSIGN_OR_RETURN(auto streams, SubmitAll(std::move(one)));
  return streams[0];
}

StatusOr<std::vector<std::shared_ptr<RequestStream>>> ServingLoop::SubmitAll(std::vector<ServeRequest> requests) {
  std::vector<std::unique_ptr<Active>> entries;
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (size_t i = 0; i < requests.size(); ++i) {
    auto a = Prepare(std::move(requests[i]));
    if (!a.ok()) {
      if (requests.size() == 1) return a.status();
      return Status(a.status().code(), "request " + std::to_string(i) + ": " + a.status().message());
    }
    streams.push_back((*a)->stream);
    entries.push_back(std::move(a).value());
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return Unavailable("the server is shutting down");
    if (waiting_.size() + entries.size() > static_cast<size_t>(options_.max_queue))
      return Unavailable("the request queue is full (" + std::to_string(options_.max_queue) + " waiting)");
    for (auto& a : entries) waiting_.push_back(std::move(a));
  }
  cv_.notify_all();
  return streams;
}

void ServingLoop::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void ServingLoop::Abort(const Status& why) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    abort_ = why;
    for (auto& a : waiting_) a->stream->Finish(FinishReason::kCancelled, why);
    waiting_.clear();
  }
  cv_.notify_all();
}

void ServingLoop::Run() {
  // This thread drives the engine: bind it to the engine's device (the engine was built on another
  // thread; on a rank whose GPU is not device 0 every call would otherwise go to the wrong one).
  if (Status s = engine_->backend().BindToCallingThread(); !s.ok()) Fail(s);
  const auto tick = std::chrono::milliseconds(std::max(1, options_.idle_tick_ms));
  auto last_activity = Clock::now();
  for (;;) {
    bool idle_due = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Bounded wait: the loop also re-checks cancellations of running requests (and ticks).
      if (running_.empty()) {
        cv_.wait_for(lock, options_.idle_tick ? tick : std::chrono::milliseconds(200),
                     [&] { return stopping_ || !waiting_.empty(); });
        if (waiting_.empty() && stopping_) break;
      }
      Admit();
      metrics_->SetQueueDepth(static_cast<int64_t>(waiting_.size()), static_cast<int64_t>(running_.size()));
      const runtime::Engine::KvUsage kv = engine_->kv_usage();
      metrics_->SetKvCacheTokens(kv.used_tokens, kv.allocated_tokens);
      const runtime::Engine::GraphStats& g = engine_->graph_stats();
      metrics_->SetGraphCounts(g.replayed, g.recorded, g.refused);
      idle_due = running_.empty() && options_.idle_tick && Clock::now() - last_activity >= tick;
    }
    if (!running_.empty()) {
      Step();
      last_activity = Clock::now();
    } else if (idle_due) {
      Status s = options_.idle_tick();
      last_activity = Clock::now();
      if (!s.ok()) {
        Fail(s);
        break;
      }
    }
  }
  EF_LOG(INFO, SERVE, "engine thread done");
}

void ServingLoop::Fail(const Status& s) {
  EF_LOG(ERROR, SERVE, "engine thread stops: %s", s.ToString().c_str());
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    if (fatal_.ok()) fatal_ = s;
    for (auto& a : waiting_) a->stream->Finish(FinishReason::kCancelled, s);
    waiting_.clear();
  }
  if (options_.on_fatal) options_.on_fatal(s);
}

Status ServingLoop::fatal_error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return fatal_;
}

AdmissionStats ServingLoop::admission_stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return admission_;
}

void ServingLoop::Admit() {
  int free = options_.max_batch - static_cast<int>(running_.size());
  if (free <= 0 || waiting_.empty()) return;
  // After a preemption nothing joins until a running request finishes (a growing cache that hit
  // the device's limit would otherwise take the preempted request back at once, and again).
  if (kv_pressure_ && !running_.empty()) return;
  kv_pressure_ = false;
  if (int64_t left = engine_->kv_free_blocks(); left >= 0) {
    // A KV cache of fixed size: requests are admitted in arrival order while their prefill (and
    // one token more) fits in the free blocks, leaving a block for each running sequence's next
    // tokens; a sequence that later runs out preempts the youngest (Step).
    // Requests still prefilling (not started, or chunked) will take the rest of their prefill.
    left -= static_cast<int64_t>(running_.size());
    for (const auto& a : running_)
      if (!a->prefilled)
        left -= engine_->KvBlocksFor(static_cast<int64_t>(a->to_prefill().size()) + 1) -
                (a->seq < 0 ? 0 : engine_->KvBlocksFor(static_cast<int64_t>(a->prefill_done)));
    int fit = 0;
    for (const auto& w : waiting_) {
      // Cancelled ones take nothing (StartAndPrune drops them); alone, the head always goes in:
      // Submit checked that it fits an empty cache.
      const int64_t need =
          w->stream->cancelled() ? 0 : engine_->KvBlocksFor(static_cast<int64_t>(w->to_prefill().size()) + 1);
      if (fit == free || (need > left && !(running_.empty() && fit == 0))) break;
      left -= need;
      ++fit;
    }
    for (int i = 0; i < fit; ++i) {
      running_.push_back(std::move(waiting_.front()));
      waiting_.pop_front();
    }
    return;
  }
  const auto admit_front = [&](int n) {
    for (int i = 0; i < n && !waiting_.empty(); ++i) {
      running_.push_back(std::move(waiting_.front()));
      waiting_.pop_front();
    }
  };
  if (!regrouping() || static_cast<int>(waiting_.size()) <= free) {
    admit_front(free);
  } else {
    const auto t0 = Clock::now();
    const int n = std::min<int>(static_cast<int>(waiting_.size()), options_.regroup_window * free);
    // Candidates: the first n waiting requests, one path row each (their prompts' forecast).
    scheduler::ExpertPathSet& paths = paths_;
    paths = scheduler::ExpertPathSet(n, options_.forecast_layers, options_.forecast_experts);
    std::vector<int> capacities, deadline(n, (n + free - 1) / free - 1), overdue;
    for (int i = 0; i < n; ++i) {
      std::copy(waiting_[i]->forecast.begin(), waiting_[i]->forecast.end(), paths.row(i));
      if (waiting_[i]->overtaken >= options_.max_wait_steps) overdue.push_back(i);
    }
    for (int left = n; left > 0; left -= free) capacities.push_back(std::min(left, free));
    for (int i : overdue) deadline[i] = 0;  // admitted this round
    std::vector<int> chosen;
    int fcfs = 0, regrouped = 0;
    std::vector<int> first(free);
    std::iota(first.begin(), first.end(), 0);
    fcfs = paths.CountDistinct(first);
    if (static_cast<int>(overdue.size()) >= free) {
      chosen.assign(overdue.begin(), overdue.begin() + free);  // the bound alone fills the batch, oldest first
      regrouped = paths.CountDistinct(chosen);
    } else {
      auto r = regrouper_.Regroup(paths, capacities, {}, deadline);
      if (r.ok()) {
        chosen = r->batches[0];
        regrouped = paths.CountDistinct(chosen);
      } else {
        EF_LOG(WARN, SERVE, "admission regrouping failed (%s); admitting in arrival order",
               r.status().ToString().c_str());
        chosen = first;
        regrouped = fcfs;
      }
    }
    ++admission_.rounds;
    admission_.fcfs_distinct += fcfs;
    admission_.regrouped_distinct += regrouped;
    admission_.forced += static_cast<int64_t>(std::min<size_t>(overdue.size(), free));
    std::vector<bool> take(n, false);
    for (int i : chosen) take[i] = true;
    // Requests older than the youngest admitted one were overtaken this round.
    const int youngest = chosen.empty() ? -1 : *std::max_element(chosen.begin(), chosen.end());
    for (int i = 0; i < youngest; ++i)
      if (!take[i]) ++waiting_[i]->overtaken;
    std::deque<std::unique_ptr<Active>> rest;
    for (int i = 0; i < static_cast<int>(waiting_.size()); ++i) {
      if (i < n && take[i]) {
        admission_.max_overtaken = std::max<int64_t>(admission_.max_overtaken, waiting_[i]->overtaken);
        running_.push_back(std::move(waiting_[i]));
      } else {
        rest.push_back(std::move(waiting_[i]));
      }
    }
    waiting_.swap(rest);
    admission_.scheduler_us += std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
  }
}

void ServingLoop::Finish(Active& a, FinishReason finish, Status error) {
  if (a.seq >= 0) engine_->RemoveSequence(a.seq);
  kv_pressure_ = false;  // its blocks are free
  a.seq = -1;
  // Always: the last tokens may have added no text (special tokens), and the count must be final.
  a.stream->Push(a.text.substr(std::min(a.emitted, a.text.size())), static_cast<int>(a.generated.size()),
                 /*wake=*/false);
  a.emitted = a.text.size();
  a.stream->Finish(finish, std::move(error));
  metrics_->ObserveLatency(std::chrono::duration<double>(Clock::now() - a.arrival).count());
}

void ServingLoop::StartAndPrune() {
  Status aborted;
  {
    std::lock_guard<std::mutex> lock(mu_);
    aborted = abort_;
  }
  for (auto& a : running_) {
    if (!aborted.ok()) {
      Finish(*a, FinishReason::kCancelled, aborted);
      a.reset();
      continue;
    }
    if (a->seq < 0 && !a->prefilled) {
      a->seq = a->request.seq_id > 0 ? a->request.seq_id : next_seq_++;
      Status s = engine_->AddSequence(a->seq);
      if (!s.ok()) {
        a->seq = -1;
        Finish(*a, FinishReason::kCancelled, s);
        a.reset();
        continue;
      }
      if (a->resume.empty()) {  // a preempted request's sampler and decoder go on
        a->sampler = std::make_unique<runtime::Sampler>(a->request.sampling);
        std::vector<int32_t> end = a->request.stop_token_ids;  // barred before min_tokens
        if (!a->request.ignore_eos) end.insert(end.end(), config_.eos_token_ids.begin(), config_.eos_token_ids.end());
        a->penalties.emplace(a->request.sampling, a->request.prompt, end);
        a->draw.reset();  // a draw kept from a step that failed before its first token is the old sampler's
        a->decoder = std::make_unique<runtime::StreamDecoder>(tokenizer_, /*skip_special=*/true);
        // Nothing to run, unless the prompt itself is being scored.
        if (a->request.max_new_tokens == 0 && !a->request.prompt_logprobs) {
          Finish(*a, FinishReason::kLength, Status::Ok());
          a.reset();
          continue;
        }
      }
    }
    if (a && a->stream->cancelled()) {
      Finish(*a, FinishReason::kCancelled, Status::Ok());
      a.reset();
    }
  }
  running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
}

void ServingLoop::Step() {
  const Clock::time_point step_start = Clock::now();
  StartAndPrune();
  if (running_.empty()) return;

  std::vector<runtime::SeqChunk> batch;
  std::vector<Active*> members;  // batch[i] is members[i]'s chunk
  batch.reserve(running_.size());
  members.reserve(running_.size());
  int64_t tokens = 0;
  int64_t prompt_tokens = 0;
  // Chunked prefill: at most max_prefill_tokens prompt tokens per step (decodes always run), so a
  // long prompt does not stall the running requests' next tokens for a whole prefill.
  int64_t budget = options_.max_prefill_tokens > 0 ? options_.max_prefill_tokens : INT64_MAX;
  if (prefill_cap_.load() > 0) budget = std::min(budget, prefill_cap_.load());
  for (auto& a : running_) {
    if (!a->prefilled) {
      const std::vector<int32_t>& all = a->to_prefill();
      const size_t n = static_cast<size_t>(std::min<int64_t>(budget, all.size() - a->prefill_done));
      a->prefill_now = n;
      if (n == 0) continue;  // no budget left: waits for a later step
      budget -= static_cast<int64_t>(n);
      const bool scored = a->request.prompt_logprobs && a->resume.empty();
      batch.push_back(runtime::SeqChunk{a->seq, std::span<const int32_t>(all).subspan(a->prefill_done, n), scored,
                                        !scored && a->TokenOnly()});
      // Only the chunk that ends the prompt gives a token.
      if (batch.back().token_only && a->prefill_done + n == all.size()) batch.back().sampling = a->NextDraw();
      if (a->resume.empty()) prompt_tokens += static_cast<int64_t>(n);  // a recompute is not a prompt
    } else {
      batch.push_back(runtime::SeqChunk{a->seq, {&a->last, 1}, false, a->TokenOnly()});
      if (batch.back().token_only) batch.back().sampling = a->NextDraw();
    }
    members.push_back(a.get());
    tokens += static_cast<int64_t>(batch.back().tokens.size());
  }
  runtime::ForwardResult& fr = forward_;  // reused: its logits buffer stays allocated between steps
  const Clock::time_point t0 = Clock::now();
  if (params::DebugStepDelayUs() > 0)
    std::this_thread::sleep_for(std::chrono::microseconds(params::DebugStepDelayUs()));
  const bool injected = num_steps_++ == params::DebugFailAtStep();
  Status s =
      injected
          ? Internal("EF_DEBUG_FAIL_AT_STEP=" + std::to_string(params::DebugFailAtStep()) + ": injected engine failure")
          : engine_->Forward(batch, &fr);
  using OutOfMemory = runtime::Engine::OutOfMemory;
  const OutOfMemory oom = s.ok() || injected ? OutOfMemory::kNone : engine_->last_forward_out_of_memory();
  if (oom == OutOfMemory::kActivations) {
    // The step's activation buffers did not fit (nothing ran): its prompts are prefilled in
    // smaller pieces from now on, and the same requests go again.
    int64_t prefill = 0;
    for (const Active* a : members)
      if (!a->prefilled) prefill += static_cast<int64_t>(a->prefill_now);
    if (prefill > 1) {
      prefill_cap_.store(prefill / 2);
      EF_LOG(WARN, SERVE,
             "the activation buffers of a step of %lld tokens do not fit (%s): prompts are prefilled at most %lld "
             "tokens a step from now on",
             static_cast<long long>(tokens), s.message().c_str(), static_cast<long long>(prefill / 2));
      return;
    }
  }
  if (oom != OutOfMemory::kNone) {
    // The KV cache could not hold this step, or its decode rows alone need more activation memory
    // (nothing ran). The youngest request holding blocks gives them back and waits at the head of
    // the queue to be prefilled again with what it has generated; alone, a request that still
    // does not fit fails on its own and the loop goes on.
    size_t v = running_.size() - 1;
    while (v > 0 && !running_[v]->prefilled && running_[v]->prefill_done == 0) --v;
    std::unique_ptr<Active> victim = std::move(running_[v]);
    running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(v));
    if (running_.empty()) {
      EF_LOG(WARN, SERVE, "request dropped: %s", s.ToString().c_str());
      Finish(*victim, FinishReason::kCancelled, s);
      return;
    }
    EF_LOG(INFO, SERVE, "out of memory (%s): the request of sequence %lld is preempted (%zu tokens to prefill again)",
           s.message().c_str(), static_cast<long long>(victim->seq),
           victim->request.prompt.size() + victim->generated.size());
    engine_->RemoveSequence(victim->seq);
    victim->seq = -1;
    victim->prefill_done = 0;
    victim->scored.clear();
    if (victim->prefilled) {
      victim->resume = victim->request.prompt;
      victim->resume.insert(victim->resume.end(), victim->generated.begin(), victim->generated.end());
    }
    victim->prefilled = false;
    metrics_->CountPreemption();
    kv_pressure_ = true;
    std::lock_guard<std::mutex> lock(mu_);
    waiting_.push_front(std::move(victim));
    return;
  }
  metrics_->CountStep(tokens, std::chrono::duration<double>(Clock::now() - t0).count(),
                      engine_->last_forward_device_routed());
  metrics_->AddPromptTokens(prompt_tokens);
  if (!s.ok()) {
    EF_LOG(ERROR, SERVE, "forward pass failed: %s", s.ToString().c_str());
    for (auto& a : running_) Finish(*a, FinishReason::kCancelled, s);
    running_.clear();
    Fail(s);
    return;
  }
  // The next token of each request that samples this step: a request without logprobs takes the
  // token the backend picked (its logits may not have come to the host at all); the others draw
  // from their row with the same rule, all rows at once on the thread pool.
  const size_t vocab = static_cast<size_t>(config_.vocab_size);
  std::vector<int32_t> next(members.size(), -1);
  std::vector<size_t> to_draw;
  for (size_t b = 0; b < members.size(); ++b) {
    const Active& a = *members[b];
    if (!a.prefilled && a.prefill_done + a.prefill_now < a.to_prefill().size()) continue;  // more chunks to come
    if (batch[b].token_only) {
      next[b] = fr.tokens[fr.row_offset[b]];
    } else {
      to_draw.push_back(b);
    }
  }
  auto draw = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const size_t b = to_draw[i];
      // The sampling row: the chunk's last (a scored prefill has a row per token).
      const size_t row = static_cast<size_t>(fr.row_offset[b]) + (batch[b].all_logits ? batch[b].tokens.size() - 1 : 0);
      const float* logits = fr.logits.data() + row * vocab;
      if (members[b]->penalties->active()) {  // on a copy: logprobs report the model's own
        thread_local std::vector<float> penalized;
        penalized.assign(logits, logits + vocab);
        members[b]->penalties->Apply(penalized.data(), static_cast<int64_t>(vocab));
        logits = penalized.data();
      }
      next[b] = runtime::SampleRow(logits, static_cast<int64_t>(vocab), members[b]->NextDraw());
    }
  };
  if (to_draw.size() > 1) {
    // Rows of a small vocabulary in chunks, so waking the pool pays for itself.
    const int64_t min_rows = std::max<int64_t>(1, 65536 / static_cast<int64_t>(vocab));
    ThreadPool::Default().ParallelFor(static_cast<int64_t>(to_draw.size()), draw, min_rows);
  } else {
    draw(0, static_cast<int64_t>(to_draw.size()));
  }
  std::vector<bool> done(members.size(), false);
  for (size_t b = 0; b < members.size(); ++b)
    if (next[b] >= 0) members[b]->draw.reset();  // used
  for (size_t b = 0; b < members.size(); ++b) {
    const float* rows =
        batch[b].token_only ? nullptr : fr.logits.data() + static_cast<size_t>(fr.row_offset[b]) * vocab;
    done[b] = Advance(*members[b], rows, next[b]);
  }
  for (size_t b = 0; b < members.size(); ++b)
    if (done[b])
      for (auto& a : running_)
        if (a.get() == members[b]) a.reset();
  waker_->Post(to_wake_);
  running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
  metrics_->AddStepSeconds(std::chrono::duration<double>(Clock::now() - step_start).count());
}

bool ServingLoop::Advance(Active& a, const float* rows, int32_t token) {
  const size_t vocab = static_cast<size_t>(config_.vocab_size);
  const int top = std::max(a.request.logprobs, 0);
  const Clock::time_point now = Clock::now();
  if (!a.prefilled) {
    const size_t begin = a.prefill_done, n = a.prefill_now;
    a.prefill_done += n;
    if (a.resume.empty() && a.request.prompt_logprobs) {
      // Row i of this chunk predicts prompt token begin + i + 1; the sampling row is the last one.
      const std::vector<int32_t>& p = a.request.prompt;
      if (begin == 0) a.scored.assign(1, TokenLogprob{p[0], std::nullopt, {}});
      for (size_t i = 0; i < n && begin + i + 1 < p.size(); ++i)
        a.scored.push_back(LogprobOf({rows + i * vocab, vocab}, p[begin + i + 1], top));
      rows += (n - 1) * vocab;
    }
    if (a.prefill_done < a.to_prefill().size()) return false;  // more chunks to come
  }
  if (!a.prefilled && !a.resume.empty()) {
    // Prefilled again after a preemption: the row after its last generated token.
    a.prefilled = true;
    a.resume.clear();
    metrics_->ObserveInterTokenLatency(std::chrono::duration<double>(now - a.last_token).count());
  } else if (!a.prefilled) {
    a.prefilled = true;
    metrics_->ObserveTimeToFirstToken(std::chrono::duration<double>(now - a.arrival).count());
    if (a.request.prompt_logprobs) {
      a.stream->PushLogprobs(std::move(a.scored), {});
      a.scored.clear();
      if (a.request.max_new_tokens == 0) {
        Finish(a, FinishReason::kLength, Status::Ok());
        return true;
      }
    }
  } else {
    metrics_->ObserveInterTokenLatency(std::chrono::duration<double>(now - a.last_token).count());
  }
  const std::span<const float> row(rows, rows ? vocab : 0);
  const int32_t tok = token;
  a.last_token = now;
  a.last = tok;
  a.generated.push_back(tok);
  a.penalties->Add(tok);
  metrics_->AddGeneratedTokens(1);
  auto in = [tok](const std::vector<int32_t>& ids) { return std::find(ids.begin(), ids.end(), tok) != ids.end(); };
  // An end token (EOS unless ignored, or one of stop_token_ids) ends the request without its text.
  const bool eos = (!a.request.ignore_eos && in(config_.eos_token_ids)) || in(a.request.stop_token_ids);
  if (!eos) {
    a.text += a.decoder->Push(tok);
    if (a.request.logprobs >= 0) a.stream->PushLogprobs({}, {LogprobOf(row, tok, top)});
  }
  std::optional<FinishReason> done;
  if (eos) {
    done = FinishReason::kStop;
  } else if (static_cast<int>(a.generated.size()) >= a.request.sampling.min_tokens) {
    // A stop string can only begin at or after `emitted` (everything that could start one is held back).
    for (const std::string& st : a.request.stop) {
      const size_t at = a.text.find(st, a.emitted);
      if (at != std::string::npos) {
        a.text.resize(at);
        done = FinishReason::kStop;
      }
    }
  }
  if (!done && static_cast<int>(a.generated.size()) >= a.request.max_new_tokens) done = FinishReason::kLength;
  if (!done && engine_->SequenceLength(a.seq) + 1 >= max_seq_len_) done = FinishReason::kContext;
  if (done) {
    if (*done != FinishReason::kStop || eos) a.text += a.decoder->Flush();
    // Flushed text may complete a stop string.
    for (const std::string& st : a.request.stop) {
      const size_t at = a.text.find(st, a.emitted);
      if (at != std::string::npos) a.text.resize(at), done = FinishReason::kStop;
    }
    Finish(a, *done, Status::Ok());
    return true;
  }
  const size_t ready = a.text.size() - a.HeldBack();
  if (ready > a.emitted) {
    a.stream->Push(a.text.substr(a.emitted, ready - a.emitted), static_cast<int>(a.generated.size()), /*wake=*/false);
    to_wake_.push_back(a.stream);
    a.emitted = ready;
  }
  return false;
}

}  // namespace ef::launch
