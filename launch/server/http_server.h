// HttpServer: the OpenAI-compatible HTTP front of `expertflow serve`.
//
// Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
// server-sent events: `data: {json}\n\n` chunks then `data: [DONE]\n\n`), GET /v1/models,
// GET /health, GET /metrics (Prometheus text). Handler threads parse and validate a request
// (api_request.h: batch prompts, n, echo, logprobs), submit its choices to the ServingLoop and
// wait on their RequestStreams; every bad input gets a 4xx with the body
// {"error": {"message", "type", "param", "code"}} and never reaches the engine. A request whose
// engine step fails gets a 5xx body (or, streaming, an error event before [DONE]). With an API
// key, /v1/* needs `Authorization: Bearer <key>` (401 otherwise); /health and /metrics stay open
// for probes and scrapers.
//
// Thread safety: Stop() may be called from any thread (a signal watcher); the rest from the
// thread that owns the server.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "launch/server/api_request.h"
#include "launch/server/chat_template.h"
#include "launch/server/server_metrics.h"
#include "launch/server/serving_loop.h"
#include "runtime/core/status.h"
#include "runtime/tokenizer/tokenizer.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace ef::launch {

struct HttpServerOptions {
  std::string host = "127.0.0.1";    // loopback unless asked otherwise
  int port = 8080;                   // 0: any free port (Bind() says which)
  std::string api_key;               // empty: no authentication
  std::string model_name;            // the id /v1/models lists and requests must name
  int max_tokens_limit = 0;          // largest max_tokens accepted; 0: the context length
  int default_max_tokens = 16;       // when a request gives none
  int num_threads = 64;              // HTTP handler threads (each waits on one request)
  size_t max_body_bytes = 8u << 20;  // larger request bodies get 413
};

class HttpServer {
 public:
  // `loop`, `tokenizer`, `chat` and `metrics` must outlive the server.
  HttpServer(HttpServerOptions options, ServingLoop* loop, const runtime::Tokenizer* tokenizer,
             const ChatTemplate* chat, ServerMetrics* metrics);
  ~HttpServer();

  // Binds the listening socket; returns the port.
  StatusOr<int> Bind();
  // Serves until Stop(); returns once every in-flight request has been answered.
  Status Listen();
  // Stops serving: from the first call new requests get 503, and once every request in flight has
  // been answered (streams included) the server stops accepting connections and Listen returns.
  // `now` stops at once, cutting open streams (a second signal, a dead engine). Call it again until
  // Listen returns: a call that finds requests in flight only marks the server stopping.
  // Idempotent, any thread.
  void Stop(bool now = false);

 private:
  // Handler threads, limits, the access log, error bodies for httplib's own errors, authentication.
  void InstallHooks();
  void InstallRoutes();
  // POST /v1/completions and /v1/chat/completions: parse, submit every choice, answer.
  void Generate(const std::string& request_body, httplib::Response& res, bool chat);

  HttpServerOptions options_;
  ServingLoop* loop_;
  const runtime::Tokenizer* tokenizer_;
  const ChatTemplate* chat_;
  ServerMetrics* metrics_;
  std::unique_ptr<httplib::Server> svr_;
  std::atomic<bool> stopping_{false};
  // Generation requests being answered: handlers running, and streams until their last event.
  std::shared_ptr<std::atomic<int>> in_flight_ = std::make_shared<std::atomic<int>>(0);
  std::atomic<int64_t> next_id_{1};
};

}  // namespace ef::launch
