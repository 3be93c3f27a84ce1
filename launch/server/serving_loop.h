// ServingLoop: the engine thread of `expertflow serve`, running continuous batching.
//
// HTTP handler threads Submit() requests and get a RequestStream back; the engine thread owns
// the Engine. Between two forward passes it admits waiting requests into the running batch (up
// to `max_batch` sequences), so a new request's prefill runs in the same Forward() as the
// running requests' decode steps: requests join and leave the batch at every step, they are
// never serialised whole. Each request has its own Sampler (seeded per request), its own
// StreamDecoder and its stop strings; text reaches the stream as soon as it cannot be the
// beginning of a stop string.
//
// (scheduler::ContinuousBatcher plans a fixed number of decode steps per request and has no way
// to drop a request that stops early on EOS, a stop string or a disconnect, so the loop keeps
// its own admission; its units are the same: a whole prompt or one decode token.)
//
// Admission is FIFO unless `regroup_window` W > 1 and a `forecast` of each prompt's experts is
// given: when more requests wait than the batch has room for (F free places), the first W x F
// waiting requests are split by scheduler::TokenRegrouper into W virtual batches of F so that
// each activates few distinct (layer, expert) pairs, and the first of them is admitted now — the
// prefill batch needs fewer experts (fewer weights to fetch, fuller expert GEMMs). The
// regrouper's seeding keeps FCFS progress (every admission round takes the oldest waiting
// request), and a request that younger ones have overtaken in `max_wait_steps` rounds is admitted
// before any regrouped one: regrouping delays no request by more than that many admission rounds
// beyond its FIFO turn (starvation bound).
//
// With a paged KV cache of fixed size (runtime.kv_cache_tokens), admission is FIFO (regrouping
// off) while each request's prefill fits in the free blocks (a block left for every running
// sequence; the head of the queue always goes in when nothing runs); a request
// whose prompt + max_tokens could never fit is refused at Submit. When a step cannot get the
// blocks it needs (a fixed cache full, or a growing one that no longer fits the device), the
// youngest running request is preempted: its sequence is dropped and it waits at the head of the
// queue to be prefilled again with its prompt and what it has generated (recompute, as vLLM
// does), then goes on where it stopped; what it has streamed is not sent again.
//
// Thread safety: Submit/Stop and every RequestStream method may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "launch/server/server_metrics.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/generator.h"
#include "runtime/engine/sampler.h"
#include "runtime/tokenizer/tokenizer.h"
#include "scheduler/expert_path_set.h"
#include "scheduler/token_regrouper.h"

namespace ef::launch {

// One token's log-probability under the model: log-softmax of the raw logits of the step that
// produced it (before the sampling temperature, top_k or top_p, as OpenAI reports them).
struct TokenLogprob {
  int32_t token = 0;
  std::optional<double> logprob;                // none for a prompt's first token (nothing predicts it)
  std::vector<std::pair<int32_t, double>> top;  // the most likely tokens at that step, most likely first
};

struct ServeRequest {
  std::vector<int32_t> prompt;  // >= 1 token, < the engine's context
  int max_new_tokens = 16;      // >= 0, prompt + max_new_tokens <= context
  runtime::SamplingParams sampling;
  std::vector<std::string> stop;        // the text ends before the first occurrence of any of them
  std::vector<int32_t> stop_token_ids;  // end the request like EOS (even with ignore_eos)
  bool ignore_eos = false;
  // -1: no log-probabilities; N in [0, kMaxTopLogprobs]: each generated token's logprob with the
  // N most likely alternatives.
  int logprobs = -1;
  // Also the prompt's tokens' logprobs (with the same N); the prefill then keeps the logits of
  // every prompt position. max_new_tokens may be 0 (scoring a text).
  bool prompt_logprobs = false;
  // The engine's sequence id for this request (the key of sequence-keyed trace routing, so a
  // benchmark request keeps its routing on any rank); 0: the loop picks one. An id already
  // running fails the request.
  int64_t seq_id = 0;
};

// What a handler has not consumed yet of one request's output.
struct StreamUpdate {
  std::string text;    // new text since the previous Take
  int num_tokens = 0;  // generated tokens so far
  bool done = false;
  runtime::FinishReason finish = runtime::FinishReason::kLength;
  Status error;  // set when the engine failed; done is then true
  // With ServeRequest::logprobs >= 0: entries new since the previous Take, one per generated token
  // (an EOS that ends the request has none: it adds no text). They may run ahead of `text`, which
  // holds back what could begin a stop string.
  std::vector<TokenLogprob> logprobs;
  std::vector<TokenLogprob> prompt_logprobs;  // with prompt_logprobs: every prompt token, in the first update
};

// The channel from the engine thread to one handler thread.
class RequestStream {
 public:
  // Waits up to `timeout` for new text or the end; returns what arrived (possibly nothing).
  StreamUpdate Take(std::chrono::milliseconds timeout);
  // The client went away: the engine drops the request at its next step.
  void Cancel();
  bool cancelled() const;
  int prompt_tokens() const { return prompt_tokens_; }

 private:
  friend class ServingLoop;
  // Appends text; wakes the handler unless `wake` is false (the engine thread then hands the stream
  // to the loop's waker thread, which calls Wake).
  void Push(const std::string& text, int num_tokens, bool wake = true);
  void Wake() { cv_.notify_all(); }
  void PushLogprobs(std::vector<TokenLogprob> prompt, std::vector<TokenLogprob> generated);
  void Finish(runtime::FinishReason finish, Status error);

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::string pending_;
  std::vector<TokenLogprob> pending_logprobs_;
  std::vector<TokenLogprob> pending_prompt_logprobs_;
  int num_tokens_ = 0;
  bool done_ = false;
  bool cancelled_ = false;
  runtime::FinishReason finish_ = runtime::FinishReason::kLength;
  Status error_;
  int prompt_tokens_ = 0;
};

// The (layer, expert) pairs a request's prompt is forecast to activate, as a bitset row of
// `words` 64-bit words (bit layer * num_experts + expert, scheduler::ExpertPathSet's layout).
// Called once per request from Submit's thread.
using RequestForecast = std::function<void(const ServeRequest& request, uint64_t* row)>;

struct ServingLoopOptions {
  int max_batch = 32;  // sequences in the running batch
  // Chunked prefill: prompt tokens prefilled per step, over all new requests (a longer prompt is
  // prefilled over several steps while the running requests keep decoding). 0: no limit.
  int max_prefill_tokens = 0;
  int max_queue = 4096;  // waiting requests beyond this are refused (Unavailable)
  // Admission regrouping (see the file comment); off unless regroup_window > 1 and forecast set.
  int regroup_window = 0;
  int max_wait_steps = 16;  // rounds a request may be overtaken by younger ones
  RequestForecast forecast;
  int forecast_layers = 0;  // the forecast's shape (MoE layers x experts)
  int forecast_experts = 0;
  // Called on the engine thread after `idle_tick_ms` without a step, and again every
  // idle_tick_ms while idle: under mpirun it keeps the other ranks' wait for the next
  // expert-parallel step alive. An error stops the loop (waiting requests fail with it) and is
  // passed to `on_fatal` (e.g. to stop the HTTP server).
  std::function<Status()> idle_tick;
  int idle_tick_ms = 100;
  std::function<void(const Status&)> on_fatal;
};

// What admission regrouping did, summed over the rounds where it ran (more waiting than room).
struct AdmissionStats {
  int64_t rounds = 0;
  int64_t fcfs_distinct = 0;       // distinct (layer, expert) pairs of the batch FIFO would admit
  int64_t regrouped_distinct = 0;  // ... of the batch admitted instead
  int64_t forced = 0;              // requests admitted by the starvation bound
  int64_t max_overtaken = 0;       // most rounds any admitted request was overtaken (<= the bound)
  double scheduler_us = 0;         // time spent regrouping
};

class ServingLoop {
 public:
  // The engine (its owner: a Deployment) and `metrics` must outlive the loop; the loop drives the
  // engine from its own thread until Stop(). Starts the engine thread.
  ServingLoop(runtime::Engine* engine, runtime::Tokenizer tokenizer, ServerMetrics* metrics,
              ServingLoopOptions options);
  ~ServingLoop();  // Stop()s, then removes its routing hook from the engine

  // Queues a request. Errors: InvalidArgument (does not fit the context), Unavailable (stopping
  // or the queue is full).
  StatusOr<std::shared_ptr<RequestStream>> Submit(ServeRequest request);
  // Queues requests that arrive together: all or none (the first error, naming the request's
  // index), and the engine thread sees them in one admission round.
  StatusOr<std::vector<std::shared_ptr<RequestStream>>> SubmitAll(std::vector<ServeRequest> requests);
  // Refuses new requests, lets every queued and running request finish, joins the engine thread.
  void Stop();
  // Refuses new requests and ends every queued and running one with `why` (running ones at the
  // engine's next step); Stop() then returns once the step in flight ends.
  void Abort(const Status& why);

  int max_seq_len() const { return max_seq_len_; }
  AdmissionStats admission_stats() const;
  // The error that stopped the loop (idle_tick or device binding), OK otherwise.
  Status fatal_error() const;
  // Prompt tokens a step may prefill since a step's activation buffers did not fit the backend
  // (halved at each such failure; 0: no cap beyond max_prefill_tokens).
  int64_t prefill_token_cap() const { return prefill_cap_.load(); }
  const runtime::ModelConfig& config() const { return config_; }

 private:
  struct Active;
  class Waker;
  void Run();
  // One step over the running batch; finished requests leave it. A pass the KV cache cannot hold
  // preempts the youngest request (see the file comment); any other failed forward pass is fatal
  // (Fail): the engine's state is unknown, so every request fails with the error and the loop stops.
  void Step();
  // Starts the admitted requests' sequences and drops cancelled requests (the head of Step).
  void StartAndPrune();
  // Takes one request's output of a step: its rows of the logits (null for a greedy request without
  // logprobs: none came back) and the token it samples, chosen by Step (ignored while more prefill
  // chunks are to come). True when it is done.
  bool Advance(Active& a, const float* rows, int32_t token);
  // Ends a request: frees its sequence, pushes what text is left, closes its stream.
  void Finish(Active& a, runtime::FinishReason finish, Status error);
  // Moves waiting requests into the running batch (FIFO or regrouped). mu_ held.
  void Admit();
  // Stops taking requests after an error: waiting ones fail with it. mu_ not held.
  void Fail(const Status& s);
  bool regrouping() const { return forecast_words_ > 0; }
  // Validates a request and builds its queue entry (with its forecast when regrouping).
  StatusOr<std::unique_ptr<Active>> Prepare(ServeRequest request) const;

  runtime::Engine* engine_;
  int metrics_hook_ = -1;
  runtime::Tokenizer tokenizer_;
  ServerMetrics* metrics_;
  ServingLoopOptions options_;
  runtime::ModelConfig config_;
  int max_seq_len_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Active>> waiting_;   // guarded by mu_
  bool kv_pressure_ = false;                      // a request was preempted and none has finished since (engine thread)
  std::atomic<int64_t> prefill_cap_{0};           // prefill_token_cap() (written by the engine thread)
  bool stopping_ = false;                         // guarded by mu_
  std::vector<std::unique_ptr<Active>> running_;  // engine thread only
  AdmissionStats admission_;                      // guarded by mu_
  Status fatal_;                                  // guarded by mu_
  Status abort_;                                  // guarded by mu_: Abort's reason
  int forecast_words_ = 0;                        // > 0: admission regrouping is on
  scheduler::ExpertPathSet paths_;                // guarded by mu_ (scratch of Admit)
  scheduler::TokenRegrouper regrouper_;           // guarded by mu_
  int64_t next_seq_ = int64_t{1} << 40;           // engine thread only; above explicit seq_ids
  int64_t num_steps_ = 0;                         // engine thread only; forward passes so far
  runtime::ForwardResult forward_;                // engine thread only; the last step's logits (buffer reused)
  // Streams that got text this step, woken by waker_ once the step's tokens are all out: waking a
  // handler thread is a system call of several microseconds, and at 64 running requests those
  // calls on the engine thread cost more than a millisecond a step.
  std::vector<std::shared_ptr<RequestStream>> to_wake_;  // engine thread only
  std::unique_ptr<Waker> waker_;
  std::thread thread_;
};

}  // namespace ef::launch
