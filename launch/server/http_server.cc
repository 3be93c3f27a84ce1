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

// A rejected request: HTTP status and the OpenAI error object.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string code;
};

void SendError(httplib::Response& res, const ApiError& e) {
  json body = {{"error",
                {{"message", e.message},
                 {"type", e.type},
                 {"param", nullptr},
                 {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
  res.status = e.status;
  res.set_content(body.dump(), "application/json");
}

ApiError Bad(std::string message, std::string code = "invalid_value") {
  return ApiError{400, std::move(message), "invalid_request_error", std::move(code)};
}

ApiError FromStatus(const Status& s) {
  if (s.code() == StatusCode::kUnavailable) return ApiError{503, s.message(), "server_error", "unavailable"};
  if (s.code() == StatusCode::kInvalidArgument || s.code() == StatusCode::kOutOfRange) return Bad(s.message());
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

// A parsed generation request, common to both endpoints.
struct Parsed {
  bool chat = false;
  bool stream = false;
  bool include_usage = false;
  ServeRequest request;
};

// Typed optional field readers: a present field of the wrong type is an error naming it.
std::optional<ApiError> GetInt(const json& body, const char* key, std::optional<int64_t>* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer()) {
    // 2.0 is an integer to most clients.
    if (it->is_number_float() && it->get<double>() == static_cast<double>(static_cast<int64_t>(it->get<double>())) &&
        std::abs(it->get<double>()) < 1e15) {
      *out = static_cast<int64_t>(it->get<double>());
      return std::nullopt;
    }
    return Bad(std::string("'") + key + "' must be an integer", "invalid_type");
  }
  if (it->is_number_unsigned() && it->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
    return Bad(std::string("'") + key + "' is too large");
  *out = it->get<int64_t>();
  return std::nullopt;
}

std::optional<ApiError> GetNumber(const json& body, const char* key, std::optional<double>* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) return Bad(std::string("'") + key + "' must be a number", "invalid_type");
  *out = it->get<double>();
  return std::nullopt;
}

std::optional<ApiError> GetBool(const json& body, const char* key, bool* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) return Bad(std::string("'") + key + "' must be a boolean", "invalid_type");
  *out = it->get<bool>();
  return std::nullopt;
}

}  // namespace

HttpServer::HttpServer(HttpServerOptions options, ServingLoop* loop, const runtime::Tokenizer* tokenizer,
                       const ChatTemplate* chat, ServerMetrics* metrics)
    : options_(std::move(options)),
      loop_(loop),
      tokenizer_(tokenizer),
      chat_(chat),
      metrics_(metrics),
      svr_(std::make_unique<httplib::Server>()) {
  Routes();
}

HttpServer::~HttpServer() = default;

StatusOr<int> HttpServer::Bind() {
  // libcpp-httplib listens with a backlog of 5 (compiled in), so a burst of connections
  // overflows the accept queue and clients see resets. Keep the socket httplib creates and
  // listen() on it again with a deep backlog (Linux updates the backlog of a listening socket).
  socket_t listen_fd = -1;
  svr_->set_socket_options([&listen_fd](socket_t sock) {
    httplib::default_socket_options(sock);
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
  svr_->set_socket_options(httplib::default_socket_options);  // the lambda's reference dies here
  if (listen_fd >= 0 && ::listen(listen_fd, SOMAXCONN) != 0)
    EF_LOG(WARN, SERVE, "cannot deepen the listen backlog; bursts of connections may be refused");
  return port;
}

Status HttpServer::Listen() {
  if (stopping_.load()) return Status::Ok();
  if (!svr_->listen_after_bind() && !stopping_.load()) return Internal("the HTTP server stopped unexpectedly");
  return Status::Ok();
}

void HttpServer::Stop() {
  stopping_.store(true);
  svr_->stop();
}

void HttpServer::Routes() {
  httplib::Server& svr = *svr_;
  const int threads = std::max(1, options_.num_threads);
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  svr.set_payload_max_length(options_.max_body_bytes);
  svr.set_keep_alive_timeout(2);
  svr.set_read_timeout(30);
  svr.set_write_timeout(30);

  svr.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    static const char* kKnown[] = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"};
    std::string endpoint = "other";
    for (const char* k : kKnown)
      if (req.path == k) endpoint = k;
    metrics_->CountRequest(endpoint, res.status);
    EF_LOG(DEBUG, SERVE, "%s %s -> %d", req.method.c_str(), req.path.c_str(), res.status);
  });
  svr.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty() || res.is_chunked_content_provider_) return;
    if (res.status == 404) {
      SendError(res,
                ApiError{404, "no route for " + req.method + " " + req.path, "invalid_request_error", "not_found"});
    } else if (res.status == 413) {
      SendError(res, ApiError{413, "the request body is too large", "invalid_request_error", "payload_too_large"});
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

  auto generate = [this](bool chat) {
    return [this, chat](const httplib::Request& req, httplib::Response& res) {
      const auto arrival = std::chrono::system_clock::now();
      json body = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
      if (body.is_discarded()) return SendError(res, Bad("the request body is not valid JSON", "invalid_json"));
      if (!body.is_object()) return SendError(res, Bad("the request body must be a JSON object", "invalid_type"));

      Parsed p;
      p.chat = chat;
      // model
      auto model = body.find("model");
      if (model == body.end() || model->is_null()) return SendError(res, Bad("'model' is required", "missing_field"));
      if (!model->is_string()) return SendError(res, Bad("'model' must be a string", "invalid_type"));
      if (model->get<std::string>() != options_.model_name)
        return SendError(res, ApiError{404,
                                       "the model '" + model->get<std::string>() +
                                           "' does not exist; this server serves '" + options_.model_name + "'",
                                       "invalid_request_error", "model_not_found"});
      // prompt / messages
      std::vector<int32_t>& ids = p.request.prompt;
      if (chat) {
        auto msgs = body.find("messages");
        if (msgs == body.end() || msgs->is_null())
          return SendError(res, Bad("'messages' is required", "missing_field"));
        if (!msgs->is_array() || msgs->empty())
          return SendError(res, Bad("'messages' must be a non-empty array", "invalid_type"));
        std::vector<ChatMessage> messages;
        for (const json& m : *msgs) {
          if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
            return SendError(res, Bad("each message must be an object with a string 'role'", "invalid_type"));
          ChatMessage cm;
          cm.role = m["role"].get<std::string>();
          auto content = m.find("content");
          if (content == m.end() || content->is_null()) {
            cm.content.clear();
          } else if (content->is_string()) {
            cm.content = content->get<std::string>();
          } else if (content->is_array()) {
            for (const json& part : *content) {
              if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
                  !part["text"].is_string())
                return SendError(res, Bad("only text content parts are supported", "invalid_type"));
              cm.content += part["text"].get<std::string>();
            }
          } else {
            return SendError(res,
                             Bad("a message's 'content' must be a string or an array of text parts", "invalid_type"));
          }
          messages.push_back(std::move(cm));
        }
        StatusOr<std::string> text = chat_->Apply(messages, /*add_generation_prompt=*/true);
        if (!text.ok()) return SendError(res, Bad("chat template: " + text.status().message(), "template_error"));
        ids = tokenizer_->Encode(*text);
      } else {
        auto prompt = body.find("prompt");
        if (prompt == body.end() || prompt->is_null())
          return SendError(res, Bad("'prompt' is required", "missing_field"));
        const json* pr = &*prompt;
        // A batch of one prompt is the prompt itself; more than one is n > 1 in disguise.
        if (pr->is_array() && pr->size() == 1 && ((*pr)[0].is_string() || (*pr)[0].is_array())) pr = &(*pr)[0];
        if (pr->is_string()) {
          ids = tokenizer_->Encode(pr->get<std::string>());
        } else if (pr->is_array()) {
          const int64_t vocab = loop_->config().vocab_size;
          for (const json& t : *pr) {
            if (!t.is_number_integer())
              return SendError(res, Bad("'prompt' must be a string or an array of token ids (one prompt per request)",
                                        "invalid_type"));
            const int64_t v = t.get<int64_t>();
            if (v < 0 || v >= vocab)
              return SendError(res, Bad("token id " + std::to_string(v) + " is outside the vocabulary [0, " +
                                        std::to_string(vocab) + ")"));
            ids.push_back(static_cast<int32_t>(v));
          }
        } else {
          return SendError(res, Bad("'prompt' must be a string or an array of token ids", "invalid_type"));
        }
      }
      if (ids.empty()) return SendError(res, Bad("the prompt is empty"));
      const int ctx = loop_->max_seq_len();
      if (static_cast<int64_t>(ids.size()) >= ctx)
        return SendError(res, Bad("the prompt has " + std::to_string(ids.size()) + " tokens; the context holds " +
                                      std::to_string(ctx) + " (prompt plus at least one generated token)",
                                  "context_length_exceeded"));
      // n
      std::optional<int64_t> n;
      if (auto e = GetInt(body, "n", &n)) return SendError(res, *e);
      if (n && *n != 1) return SendError(res, Bad("only n = 1 is supported"));
      // max_tokens
      std::optional<int64_t> max_tokens;
      if (auto e = GetInt(body, "max_tokens", &max_tokens)) return SendError(res, *e);
      if (chat && !max_tokens) {
        if (auto e = GetInt(body, "max_completion_tokens", &max_tokens)) return SendError(res, *e);
      }
      const int64_t room = ctx - static_cast<int64_t>(ids.size());
      const int64_t limit = options_.max_tokens_limit > 0 ? options_.max_tokens_limit : ctx;
      if (max_tokens) {
        if (*max_tokens < 0) return SendError(res, Bad("'max_tokens' must be >= 0"));
        if (*max_tokens > limit)
          return SendError(res, Bad("'max_tokens' is " + std::to_string(*max_tokens) + "; this server allows at most " +
                                    std::to_string(limit)));
        if (*max_tokens > room)
          return SendError(
              res, Bad("the prompt (" + std::to_string(ids.size()) + " tokens) plus max_tokens (" +
                           std::to_string(*max_tokens) + ") exceeds the context of " + std::to_string(ctx) + " tokens",
                       "context_length_exceeded"));
        p.request.max_new_tokens = static_cast<int>(*max_tokens);
      } else {
        p.request.max_new_tokens =
            static_cast<int>(std::min<int64_t>({static_cast<int64_t>(options_.default_max_tokens), room, limit}));
      }
      // sampling
      std::optional<double> temperature, top_p;
      std::optional<int64_t> top_k, seed;
      if (auto e = GetNumber(body, "temperature", &temperature)) return SendError(res, *e);
      if (auto e = GetNumber(body, "top_p", &top_p)) return SendError(res, *e);
      if (auto e = GetInt(body, "top_k", &top_k)) return SendError(res, *e);
      if (auto e = GetInt(body, "seed", &seed)) return SendError(res, *e);
      runtime::SamplingParams& sp = p.request.sampling;
      if (temperature) {
        if (!(*temperature >= 0 && *temperature <= 2)) return SendError(res, Bad("'temperature' must be in [0, 2]"));
        sp.temperature = static_cast<float>(*temperature);
      }
      if (top_p) {
        if (!(*top_p > 0 && *top_p <= 1)) return SendError(res, Bad("'top_p' must be in (0, 1]"));
        sp.top_p = static_cast<float>(*top_p);
      }
      if (top_k) {
        if (*top_k < -1 || *top_k > (1 << 22)) return SendError(res, Bad("'top_k' must be -1, 0 or a positive count"));
        sp.top_k = *top_k < 0 ? 0 : static_cast<int>(*top_k);
      }
      if (seed) {
        sp.seed = static_cast<uint64_t>(*seed);
      } else {
        sp.seed = static_cast<uint64_t>(next_id_.load());
      }
      // stop
      auto stop = body.find("stop");
      if (stop != body.end() && !stop->is_null()) {
        std::vector<json> items = stop->is_array() ? stop->get<std::vector<json>>() : std::vector<json>{*stop};
        if (items.size() > 16) return SendError(res, Bad("'stop' holds at most 16 strings"));
        for (const json& s : items) {
          if (!s.is_string())
            return SendError(res, Bad("'stop' must be a string or an array of strings", "invalid_type"));
          if (s.get<std::string>().empty()) return SendError(res, Bad("'stop' strings must not be empty"));
          p.request.stop.push_back(s.get<std::string>());
        }
      }
      if (auto e = GetBool(body, "stream", &p.stream)) return SendError(res, *e);
      auto so = body.find("stream_options");
      if (so != body.end() && so->is_object()) {
        if (auto e = GetBool(*so, "include_usage", &p.include_usage)) return SendError(res, *e);
      }
      bool ignore_eos = false;
      if (auto e = GetBool(body, "ignore_eos", &ignore_eos)) return SendError(res, *e);
      p.request.ignore_eos = ignore_eos;

      const int prompt_tokens = static_cast<int>(ids.size());
      StatusOr<std::shared_ptr<RequestStream>> submitted = loop_->Submit(std::move(p.request));
      if (!submitted.ok()) return SendError(res, FromStatus(submitted.status()));
      std::shared_ptr<RequestStream> stream = *submitted;

      const std::string id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id_.fetch_add(1));
      const int64_t created = std::chrono::duration_cast<std::chrono::seconds>(arrival.time_since_epoch()).count();
      const std::string model_name = options_.model_name;
      auto usage = [prompt_tokens](int completion) {
        return json{{"prompt_tokens", prompt_tokens},
                    {"completion_tokens", completion},
                    {"total_tokens", prompt_tokens + completion}};
      };

      if (!p.stream) {
        std::string text;
        StreamUpdate u;
        do {
          u = stream->Take(std::chrono::milliseconds(1000));
          text += u.text;
        } while (!u.done);
        if (!u.error.ok()) return SendError(res, FromStatus(u.error));
        json choice = {{"index", 0}, {"finish_reason", FinishName(u.finish)}, {"logprobs", nullptr}};
        if (chat) {
          choice["message"] = {{"role", "assistant"}, {"content", text}};
        } else {
          choice["text"] = text;
        }
        json out = {{"id", id},
                    {"object", chat ? "chat.completion" : "text_completion"},
                    {"created", created},
                    {"model", model_name},
                    {"choices", json::array({choice})},
                    {"usage", usage(u.num_tokens)}};
        res.set_content(out.dump(), "application/json");
        return;
      }

      // Streaming: one SSE event per batch of new text. The provider blocks (bounded) on the
      // stream; a failed write means the client left, which cancels the request.
      struct State {
        bool sent_role = false;
        bool finished = false;
      };
      auto state = std::make_shared<State>();
      const bool include_usage = p.include_usage;
      res.set_header("Cache-Control", "no-cache");
      res.set_chunked_content_provider(
          "text/event-stream",
          [=](size_t, httplib::DataSink& sink) {
            auto chunk = [&](const json& delta_or_text, const json& finish) {
              json choice = {{"index", 0}, {"finish_reason", finish}};
              if (chat) {
                choice["delta"] = delta_or_text;
              } else {
                choice["text"] = delta_or_text;
                choice["logprobs"] = nullptr;
              }
              json ev = {{"id", id},
                         {"object", chat ? "chat.completion.chunk" : "text_completion"},
                         {"created", created},
                         {"model", model_name},
                         {"choices", json::array({choice})}};
              const std::string line = "data: " + ev.dump() + "\n\n";
              return sink.write(line.data(), line.size());
            };
            if (chat && !state->sent_role) {
              state->sent_role = true;
              if (!chunk(json{{"role", "assistant"}, {"content", ""}}, nullptr)) return false;
            }
            StreamUpdate u = stream->Take(std::chrono::milliseconds(500));
            if (!u.text.empty()) {
              if (!chunk(chat ? json{{"content", u.text}} : json(u.text), nullptr)) return false;
            }
            if (!u.done) return sink.is_writable();
            if (!u.error.ok()) {
              json err = {{"error", {{"message", u.error.message()}, {"type", "server_error"}, {"code", nullptr}}}};
              const std::string line = "data: " + err.dump() + "\n\n";
              sink.write(line.data(), line.size());
            } else {
              if (!chunk(chat ? json::object() : json(""), FinishName(u.finish))) return false;
              if (include_usage) {
                json ev = {{"id", id},
                           {"object", chat ? "chat.completion.chunk" : "text_completion"},
                           {"created", created},
                           {"model", model_name},
                           {"choices", json::array()},
                           {"usage", usage(u.num_tokens)}};
                const std::string line = "data: " + ev.dump() + "\n\n";
                if (!sink.write(line.data(), line.size())) return false;
              }
            }
            static const std::string kDone = "data: [DONE]\n\n";
            sink.write(kDone.data(), kDone.size());
            state->finished = true;
            sink.done();
            return true;
          },
          [stream, state](bool success) {
            if (!success || !state->finished) stream->Cancel();
          });
    };
  };
  svr.Post("/v1/completions", generate(false));
  svr.Post("/v1/chat/completions", generate(true));
}

}  // namespace ef::launch
