#include "launch/server/http_server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <chrono>
#include <ctime>
#include <nlohmann/json.hpp>
#include <optional>

#include "runtime/core/logging.h"

namespace ef::launch {
namespace {

using json = nlohmann::json;
using runtime::FinishReason;

void SendError(httplib::Response& res, const ApiError& e) {
  json body = {{"error",
                {{"message", e.message},
                 {"type", e.type},
                 {"param", e.param.empty() ? json(nullptr) : json(e.param)},
                 {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
  res.status = e.status;
  res.set_content(body.dump(), "application/json");
}

ApiError FromStatus(const Status& s) {
  if (s.code() == StatusCode::kUnavailable) return ApiError{503, s.message(), "server_error", "unavailable"};
  if (s.code() == StatusCode::kInvalidArgument || s.code() == StatusCode::kOutOfRange)
    return ApiError{400, s.message(), "invalid_request_error", "invalid_value"};
  return ApiError{500, s.message(), "server_error", "internal_error"};
}

const char* FinishName(FinishReason r) {
  switch (r) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
    case FinishReason::kContext:
      return "length";
    case FinishReason::kCancelled:
      return "cancelled";
  }
  return "stop";
}

// Builds the response JSON of one request: envelopes, choices and their logprobs in the shapes
// the OpenAI clients parse (completions: {tokens, token_logprobs, top_logprobs, text_offset};
// chat: {content: [{token, logprob, bytes, top_logprobs}]}).
class ResponseBuilder {
 public:
  ResponseBuilder(const ApiRequest& r, const runtime::Tokenizer& tok, std::string id, int64_t created,
                  std::string model)
      : chat_(r.chat),
        tokens_as_ids_(r.tokens_as_ids),
        tok_(tok),
        id_(std::move(id)),
        created_(created),
        model_(std::move(model)) {}

  json Envelope(bool chunk) const {
    const char* object = chat_ ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion";
    return json{{"id", id_}, {"object", object}, {"created", created_}, {"model", model_}};
  }

  // Logprobs of `tokens`; `offset` is the completions text_offset of the first one, advanced past them.
  json Logprobs(const std::vector<TokenLogprob>& tokens, size_t* offset) const {
    if (chat_) {
      json content = json::array();
      for (const TokenLogprob& t : tokens) {
        json top = json::array();
        for (const auto& [id, lp] : t.top) top.push_back(Entry(id, lp));
        json e = Entry(t.token, t.logprob.value_or(0));
        e["top_logprobs"] = std::move(top);
        content.push_back(std::move(e));
      }
      return json{{"content", std::move(content)}, {"refusal", nullptr}};
    }
    json out = {{"tokens", json::array()},
                {"token_logprobs", json::array()},
                {"top_logprobs", json::array()},
                {"text_offset", json::array()}};
    for (const TokenLogprob& t : tokens) {
      const std::string text = Text(t.token);
      out["tokens"].push_back(text);
      out["token_logprobs"].push_back(t.logprob ? json(*t.logprob) : json(nullptr));
      json top = json::object();
      for (const auto& [id, lp] : t.top) top[Text(id)] = lp;
      // A prompt's first token has no prediction, so no alternatives either (as OpenAI).
      out["top_logprobs"].push_back(t.logprob ? top : json(nullptr));
      out["text_offset"].push_back(*offset);
      *offset += text.size();
    }
    return out;
  }

  // Appends completions logprobs `more` to `into` (echoed prompt tokens, then generated ones).
  static void Append(json* into, const json& more) {
    if (into->is_null()) {
      *into = more;
      return;
    }
    for (const char* k : {"tokens", "token_logprobs", "top_logprobs", "text_offset"})
      for (const json& v : more[k]) (*into)[k].push_back(v);
  }

  bool chat() const { return chat_; }

 private:
  // A token as text: its decoding alone (a piece of a multi-byte character decodes to U+FFFD),
  // or "token_id:N" when the client asked for ids.
  std::string Text(int32_t id) const {
    if (tokens_as_ids_) return "token_id:" + std::to_string(id);
    return tok_.Decode(std::span<const int32_t>(&id, 1));
  }
  json Entry(int32_t id, double logprob) const {
    const std::string text = Text(id);
    return json{{"token", text}, {"logprob", logprob}, {"bytes", std::vector<uint8_t>(text.begin(), text.end())}};
  }

  bool chat_;
  bool tokens_as_ids_;
  const runtime::Tokenizer& tok_;
  std::string id_;
  int64_t created_;
  std::string model_;
};

json Usage(int prompt_tokens, int completion_tokens) {
  return json{{"prompt_tokens", prompt_tokens},
              {"completion_tokens", completion_tokens},
              {"total_tokens", prompt_tokens + completion_tokens}};
}

// A whole (non-streaming) answer: waits for every choice, then one JSON body. Any choice's
// engine error fails the request (the other choices are cancelled).
void RespondWhole(const ApiRequest& r, const std::vector<std::shared_ptr<RequestStream>>& streams,
                  const ResponseBuilder& rb, int prompt_tokens, httplib::Response& res) {
  json choices = json::array();
  int completion_tokens = 0;
  for (size_t i = 0; i < streams.size(); ++i) {
    std::string text = r.echo ? r.prompt_texts[i / r.n] : "";
    std::vector<TokenLogprob> prompt_lp, gen_lp;
    StreamUpdate u;
    do {
      u = streams[i]->Take(std::chrono::milliseconds(1000));
      text += u.text;
      for (auto& t : u.prompt_logprobs) prompt_lp.push_back(std::move(t));
      for (auto& t : u.logprobs) gen_lp.push_back(std::move(t));
    } while (!u.done);
    if (!u.error.ok()) {
      for (const auto& s : streams) s->Cancel();
      return SendError(res, FromStatus(u.error));
    }
    completion_tokens += u.num_tokens;
    json choice = {{"index", i}, {"finish_reason", FinishName(u.finish)}, {"logprobs", nullptr}};
    if (r.top_logprobs >= 0) {
      size_t offset = 0;
      if (rb.chat()) {
        choice["logprobs"] = rb.Logprobs(gen_lp, &offset);
      } else {
        ResponseBuilder::Append(&choice["logprobs"], rb.Logprobs(prompt_lp, &offset));
        ResponseBuilder::Append(&choice["logprobs"], rb.Logprobs(gen_lp, &offset));
      }
    }
    if (r.chat) {
      choice["message"] = {{"role", "assistant"}, {"content", text}};
    } else {
      choice["text"] = text;
    }
    choices.push_back(std::move(choice));
  }
  json out = rb.Envelope(/*chunk=*/false);
  out["choices"] = std::move(choices);
  out["usage"] = Usage(prompt_tokens, completion_tokens);
  res.set_content(out.dump(), "application/json");
}

// A streamed answer as server-sent events: each event carries one choice's new text (and its
// logprobs); choices interleave as they progress. An engine error ends the stream with an
// error event, then [DONE].
class SseStream {
 public:
  SseStream(ApiRequest r, std::vector<std::shared_ptr<RequestStream>> streams, ResponseBuilder rb, int prompt_tokens)
      : r_(std::move(r)),
        streams_(std::move(streams)),
        rb_(std::move(rb)),
        prompt_tokens_(prompt_tokens),
        choices_(streams_.size()) {}

  // One round over the choices; false ends the response (the client left, or all is sent).
  bool Pump(httplib::DataSink& sink) {
    size_t open = 0;
    for (const Choice& c : choices_) open += c.done ? 0 : 1;
    bool waited = false;
    for (size_t i = 0; i < choices_.size(); ++i) {
      Choice& c = choices_[i];
      if (c.done) continue;
      if (!c.started) {
        c.started = true;
        if (r_.chat && !Write(sink, Event(i, json{{"role", "assistant"}, {"content", ""}}, json(), nullptr)))
          return false;
        if (r_.echo && !Write(sink, Event(i, json(r_.prompt_texts[i / r_.n]), json(), nullptr))) return false;
      }
      // Block (bounded) on the first open choice only, so every choice is visited each round.
      const auto wait = std::chrono::milliseconds(waited ? 0 : (open == 1 ? 500 : 20));
      waited = true;
      StreamUpdate u = streams_[i]->Take(wait);
      if (!u.error.ok()) return Fail(sink, u.error);
      json lp;
      if (r_.top_logprobs >= 0 && (!u.logprobs.empty() || !u.prompt_logprobs.empty())) {
        if (r_.chat) {
          lp = rb_.Logprobs(u.logprobs, &c.offset);
        } else {
          ResponseBuilder::Append(&lp, rb_.Logprobs(u.prompt_logprobs, &c.offset));
          ResponseBuilder::Append(&lp, rb_.Logprobs(u.logprobs, &c.offset));
        }
      }
      if (!u.text.empty() || !lp.is_null()) {
        const json delta = r_.chat ? json{{"content", u.text}} : json(u.text);
        if (!Write(sink, Event(i, delta, lp, nullptr))) return false;
      }
      if (!u.done) continue;
      c.done = true;
      completion_tokens_ += u.num_tokens;
      if (!Write(sink, Event(i, r_.chat ? json::object() : json(""), json(), FinishName(u.finish)))) return false;
    }
    for (const Choice& c : choices_)
      if (!c.done) return sink.is_writable();
    if (r_.include_usage) {
      json ev = rb_.Envelope(/*chunk=*/true);
      ev["choices"] = json::array();
      ev["usage"] = Usage(prompt_tokens_, completion_tokens_);
      if (!Write(sink, ev)) return false;
    }
    return End(sink);
  }

  // The client went away or the stream failed: stop generating for it.
  void Cancel() {
    if (finished_) return;
    for (const auto& s : streams_) s->Cancel();
  }

 private:
  struct Choice {
    bool started = false;
    bool done = false;
    size_t offset = 0;  // completions text_offset of the next token
  };

  json Event(size_t index, const json& delta_or_text, const json& logprobs, const char* finish) const {
    json choice = {{"index", index}, {"finish_reason", finish ? json(finish) : json(nullptr)}};
    choice[r_.chat ? "delta" : "text"] = delta_or_text;
    choice["logprobs"] = logprobs;
    json ev = rb_.Envelope(/*chunk=*/true);
    ev["choices"] = json::array({std::move(choice)});
    return ev;
  }
  static bool Write(httplib::DataSink& sink, const json& ev) {
    const std::string line = "data: " + ev.dump() + "\n\n";
    return sink.write(line.data(), line.size());
  }
  bool Fail(httplib::DataSink& sink, const Status& error) {
    Cancel();
    const ApiError e = FromStatus(error);
    Write(sink, json{{"error", {{"message", e.message}, {"type", e.type}, {"param", nullptr}, {"code", e.code}}}});
    return End(sink);
  }
  bool End(httplib::DataSink& sink) {
    static const std::string kDone = "data: [DONE]\n\n";
    sink.write(kDone.data(), kDone.size());
    finished_ = true;
    sink.done();
    return true;
  }

  ApiRequest r_;
  std::vector<std::shared_ptr<RequestStream>> streams_;
  ResponseBuilder rb_;
  int prompt_tokens_;
  std::vector<Choice> choices_;
  int completion_tokens_ = 0;
  bool finished_ = false;
};

}  // namespace

HttpServer::HttpServer(HttpServerOptions options, ServingLoop* loop, const runtime::Tokenizer* tokenizer,
                       const ChatTemplate* chat, ServerMetrics* metrics)
    : options_(std::move(options)),
      loop_(loop),
      tokenizer_(tokenizer),
      chat_(chat),
      metrics_(metrics),
      svr_(std::make_unique<httplib::Server>()) {
  InstallHooks();
  InstallRoutes();
}

HttpServer::~HttpServer() = default;

namespace {
void ReuseAddress(socket_t sock) {
  int yes = 1;
  setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
}
}  // namespace

StatusOr<int> HttpServer::Bind() {
  // libcpp-httplib listens with a backlog of 5 (compiled in), so a burst of connections
  // overflows the accept queue and clients see resets. Keep the socket httplib creates and
  // listen() on it again with a deep backlog (Linux updates the backlog of a listening socket).
  // SO_REUSEADDR alone: a restart binds past the old socket's TIME_WAIT, but a second server on a
  // port in use fails (httplib's default adds SO_REUSEPORT, which lets two servers share the port
  // and the kernel split the connections between them).
  socket_t listen_fd = -1;
  svr_->set_socket_options([&listen_fd](socket_t sock) {
    ReuseAddress(sock);
    listen_fd = sock;
  });
  int port = options_.port;
  if (port == 0) {
    port = svr_->bind_to_any_port(options_.host);
    if (port < 0) return Unavailable("cannot bind " + options_.host + " on any port");
  } else if (!svr_->bind_to_port(options_.host, port)) {
    return Unavailable("cannot bind " + options_.host + ":" + std::to_string(port) +
                       " (in use, or not an address of this host)");
  }
  svr_->set_socket_options(ReuseAddress);  // the lambda's reference dies here
  if (listen_fd >= 0 && ::listen(listen_fd, SOMAXCONN) != 0)
    EF_LOG(WARN, SERVE, "cannot deepen the listen backlog; bursts of connections may be refused");
  return port;
}

Status HttpServer::Listen() {
  if (stopping_.load()) return Status::Ok();
  if (!svr_->listen_after_bind() && !stopping_.load()) return Internal("the HTTP server stopped unexpectedly");
  return Status::Ok();
}

void HttpServer::Stop(bool now) {
  // Generate counts itself in before it reads stopping_, and Stop sets stopping_ before it reads
  // the count: a request either sees the stop and is refused, or is counted and waited for.
  stopping_.store(true);
  if (now || in_flight_->load() == 0) svr_->stop();
}

void HttpServer::InstallHooks() {
  httplib::Server& svr = *svr_;
  const int threads = std::max(1, options_.num_threads);
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  svr.set_payload_max_length(options_.max_body_bytes);
  svr.set_keep_alive_timeout(2);
  // Seconds a read of the request (headers or body) may wait for the client's next bytes: each
  // stalled client holds one of the pool's threads for that long.
  svr.set_read_timeout(10);
  svr.set_write_timeout(30);

  svr.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    static const char* kKnown[] = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"};
    std::string endpoint = "other";
    for (const char* k : kKnown)
      if (req.path == k) endpoint = k;
    metrics_->CountRequest(endpoint, res.status);
    EF_LOG(DEBUG, SERVE, "%s %s -> %d", req.method.c_str(), req.path.c_str(), res.status);
  });
  const size_t max_body = options_.max_body_bytes;
  svr.set_error_handler([max_body](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty() || res.is_chunked_content_provider_) return;
    if (res.status == 404) {
      SendError(res,
                ApiError{404, "no route for " + req.method + " " + req.path, "invalid_request_error", "not_found"});
    } else if (res.status == 413) {
      SendError(res, ApiError{413,
                              "the request body is larger than this server's limit of " + std::to_string(max_body) +
                                  " bytes (server.max_body_bytes)",
                              "invalid_request_error", "payload_too_large"});
    } else {
      SendError(res, ApiError{res.status, "request failed with HTTP status " + std::to_string(res.status),
                              "invalid_request_error", ""});
    }
  });
  svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    EF_LOG(ERROR, SERVE, "handler failed: %s", what.c_str());
    SendError(res, ApiError{500, "internal error: " + what, "server_error", "internal_error"});
  });

  // Authentication for /v1/*: checked before any routing so a bad key never learns more.
  svr.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (options_.api_key.empty() || req.path.rfind("/v1/", 0) != 0) return httplib::Server::HandlerResponse::Unhandled;
    const std::string want = "Bearer " + options_.api_key;
    if (req.get_header_value("Authorization") != want) {
      SendError(res, ApiError{401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                              "invalid_request_error", "invalid_api_key"});
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
}

void HttpServer::InstallRoutes() {
  httplib::Server& svr = *svr_;
  svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(stopping_.load() ? R"({"status":"stopping"})" : R"({"status":"ok"})", "application/json");
  });
  svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_->Render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  svr.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    json model = {{"id", options_.model_name},
                  {"object", "model"},
                  {"created", 0},
                  {"owned_by", "expertflow"},
                  {"max_model_len", loop_->max_seq_len()}};
    json body = {{"object", "list"}, {"data", json::array({model})}};
    res.set_content(body.dump(), "application/json");
  });
  // The body is read here, not by httplib: httplib caps a body it reads itself at 8 KiB when it is
  // sent as form data (curl -d's default Content-Type), whatever server.max_body_bytes allows.
  // Through a content reader it checks max_body_bytes alone (413) and leaves the bytes as they are.
  auto generate = [this](bool chat) {
    return [this, chat](const httplib::Request&, httplib::Response& res, const httplib::ContentReader& read) {
      std::string body;
      if (!read([&body](const char* data, size_t n) {
            body.append(data, n);
            return true;
          }))
        return;  // httplib set the status (413 past max_body_bytes, 400 for a broken body)
      Generate(body, res, chat);
    };
  };
  svr.Post("/v1/completions", generate(/*chat=*/false));
  svr.Post("/v1/chat/completions", generate(/*chat=*/true));
}

void HttpServer::Generate(const std::string& request_body, httplib::Response& res, bool chat) {
  const auto arrival = std::chrono::system_clock::now();
  // Counted in until the answer is out: for a stream, until httplib releases its provider.
  in_flight_->fetch_add(1);
  std::shared_ptr<void> counted(nullptr, [n = in_flight_](void*) { n->fetch_sub(1); });
  if (stopping_.load())
    return SendError(res, ApiError{503, "the server is shutting down", "server_error", "shutting_down"});
  json body = json::parse(request_body, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded())
    return SendError(res, ApiError{400, "the request body is not valid JSON", "invalid_request_error", "invalid_json"});
  const ApiLimits limits{options_.model_name, loop_->max_seq_len(), loop_->config().vocab_size,
                         options_.max_tokens_limit, options_.default_max_tokens};
  ApiRequest r;
  const uint64_t default_seed = static_cast<uint64_t>(next_id_.load());
  if (auto e = ParseApiRequest(body, chat, limits, *tokenizer_, *chat_, default_seed, &r)) return SendError(res, *e);

  std::vector<ServeRequest> choices;
  for (int i = 0; i < r.num_choices(); ++i) choices.push_back(r.Choice(i));
  // All choices in one admission round: they share the prefill step and finish together.
  StatusOr<std::vector<std::shared_ptr<RequestStream>>> submitted = loop_->SubmitAll(std::move(choices));
  if (!submitted.ok()) return SendError(res, FromStatus(submitted.status()));

  int prompt_tokens = 0;  // each prompt counts once, however many choices answer it
  for (const auto& p : r.prompts) prompt_tokens += static_cast<int>(p.size());
  const std::string id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id_.fetch_add(1));
  const int64_t created = std::chrono::duration_cast<std::chrono::seconds>(arrival.time_since_epoch()).count();
  ResponseBuilder rb(r, *tokenizer_, id, created, options_.model_name);
  if (!r.stream) return RespondWhole(r, *submitted, rb, prompt_tokens, res);

  // Streaming: the provider blocks (bounded) on the streams; a failed write means the client
  // left, which cancels the request.
  auto sse = std::make_shared<SseStream>(std::move(r), std::move(submitted).value(), std::move(rb), prompt_tokens);
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream", [sse](size_t, httplib::DataSink& sink) { return sse->Pump(sink); },
      [sse, counted](bool) { sse->Cancel(); });
}

}  // namespace ef::launch
