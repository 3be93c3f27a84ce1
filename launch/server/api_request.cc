#include "launch/server/api_request.h"

#include <algorithm>
#include <cmath>

#include "runtime/core/limits.h"

namespace ef::launch {
namespace {

using json = nlohmann::json;
using Error = std::optional<ApiError>;

ApiError Bad(std::string param, std::string message, std::string code = "invalid_value") {
  return ApiError{400, std::move(message), "invalid_request_error", std::move(code), std::move(param)};
}

std::string Quoted(const char* key) { return std::string("'") + key + "'"; }

// Typed optional field readers: a present field of the wrong type is an error naming it.
Error GetInt(const json& body, const char* key, std::optional<int64_t>* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer()) {
    // 2.0 is an integer to most clients.
    if (it->is_number_float()) {
      const double v = it->get<double>();
      if (std::abs(v) < 1e15 && v == std::trunc(v)) {
        *out = static_cast<int64_t>(v);
        return std::nullopt;
      }
    }
    return Bad(key, Quoted(key) + " must be an integer", "invalid_type");
  }
  if (it->is_number_unsigned() && it->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
    return Bad(key, Quoted(key) + " is too large");
  *out = it->get<int64_t>();
  return std::nullopt;
}

Error GetNumber(const json& body, const char* key, std::optional<double>* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) return Bad(key, Quoted(key) + " must be a number", "invalid_type");
  *out = it->get<double>();
  return std::nullopt;
}

Error GetBool(const json& body, const char* key, bool* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) return Bad(key, Quoted(key) + " must be a boolean", "invalid_type");
  *out = it->get<bool>();
  return std::nullopt;
}

Error ParseModel(const json& body, const ApiLimits& limits) {
  auto model = body.find("model");
  if (model == body.end() || model->is_null()) return Bad("model", "'model' is required", "missing_field");
  if (!model->is_string()) return Bad("model", "'model' must be a string", "invalid_type");
  if (model->get<std::string>() != limits.model_name)
    return ApiError{
        404,
        "the model '" + model->get<std::string>() + "' does not exist; this server serves '" + limits.model_name + "'",
        "invalid_request_error", "model_not_found", "model"};
  return std::nullopt;
}

// messages -> the chat template's text -> one prompt.
Error ParseMessages(const json& body, const runtime::Tokenizer& tokenizer, const ChatTemplate& chat_template,
                    ApiRequest* out) {
  auto msgs = body.find("messages");
  if (msgs == body.end() || msgs->is_null()) return Bad("messages", "'messages' is required", "missing_field");
  if (!msgs->is_array() || msgs->empty())
    return Bad("messages", "'messages' must be a non-empty array", "invalid_type");
  // Tool calls and structured output are not implemented: refused by name, not ignored (a client
  // that asked for JSON would otherwise parse free text).
  for (const char* key : {"tools", "functions"}) {
    auto it = body.find(key);
    if (it != body.end() && !it->is_null() && !it->empty())
      return Bad(key, Quoted(key) + " is not supported by this server (no tool calls)");
  }
  if (auto it = body.find("tool_choice"); it != body.end() && !it->is_null() && *it != "none")
    return Bad("tool_choice", "'tool_choice' is not supported by this server; only \"none\" is accepted");
  if (auto it = body.find("response_format"); it != body.end() && !it->is_null()) {
    if (!it->is_object() || !it->contains("type") || (*it)["type"] != "text")
      return Bad("response_format",
                 "'response_format' is not supported by this server beyond {\"type\": \"text\"} (no JSON mode)");
  }
  static const char* const kRoles[] = {"system", "developer", "user", "assistant", "tool"};
  std::vector<ChatMessage> messages;
  for (const json& m : *msgs) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      return Bad("messages", "each message must be an object with a string 'role'", "invalid_type");
    ChatMessage cm;
    cm.role = m["role"].get<std::string>();
    if (std::find(std::begin(kRoles), std::end(kRoles), cm.role) == std::end(kRoles))
      return Bad("messages", "unknown message role '" + cm.role + "' (system, developer, user, assistant or tool)");
    auto content = m.find("content");
    if (content == m.end() || content->is_null()) {
      if (cm.role != "assistant") return Bad("messages", "a " + cm.role + " message needs 'content'", "missing_field");
      cm.content.clear();
    } else if (content->is_string()) {
      cm.content = content->get<std::string>();
    } else if (content->is_array()) {
      for (const json& part : *content) {
        if (!part.is_object() || !part.contains("type") || part["type"] != "text" || !part.contains("text") ||
            !part["text"].is_string())
          return Bad("messages", "only text content parts are supported", "invalid_type");
        cm.content += part["text"].get<std::string>();
      }
    } else {
      return Bad("messages", "a message's 'content' must be a string or an array of text parts", "invalid_type");
    }
    messages.push_back(std::move(cm));
  }
  StatusOr<std::string> text = chat_template.Apply(messages, /*add_generation_prompt=*/true);
  if (!text.ok()) return Bad("messages", "chat template: " + text.status().message(), "template_error");
  out->prompts.push_back(tokenizer.Encode(*text));
  return std::nullopt;
}

// One prompt of `prompt`: a string or a list of token ids.
Error ParseOnePrompt(const json& p, const ApiLimits& limits, const runtime::Tokenizer& tokenizer, ApiRequest* out) {
  if (p.is_string()) {
    out->prompts.push_back(tokenizer.Encode(p.get<std::string>()));
    out->prompt_texts.push_back(p.get<std::string>());
    return std::nullopt;
  }
  std::vector<int32_t> ids;
  for (const json& t : p) {
    if (!t.is_number_integer())
      return Bad("prompt",
                 "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists",
                 "invalid_type");
    const int64_t v = t.get<int64_t>();
    if (v < 0 || v >= limits.vocab_size)
      return Bad("prompt", "token id " + std::to_string(v) + " is outside the vocabulary [0, " +
                               std::to_string(limits.vocab_size) + ")");
    ids.push_back(static_cast<int32_t>(v));
  }
  out->prompt_texts.push_back(tokenizer.Decode(ids));
  out->prompts.push_back(std::move(ids));
  return std::nullopt;
}

// `prompt`, as OpenAI takes it: a string, a list of token ids, or a batch (a list of strings or
// of token-id lists), each batch entry a prompt of its own.
Error ParsePrompts(const json& body, const ApiLimits& limits, const runtime::Tokenizer& tokenizer, ApiRequest* out) {
  auto prompt = body.find("prompt");
  if (prompt == body.end() || prompt->is_null()) return Bad("prompt", "'prompt' is required", "missing_field");
  const json& p = *prompt;
  const bool batch = p.is_array() && !p.empty() && (p[0].is_string() || p[0].is_array());
  if (!p.is_string() && !p.is_array())
    return Bad("prompt", "'prompt' must be a string, a list of strings or a list of token ids", "invalid_type");
  if (!batch) return ParseOnePrompt(p, limits, tokenizer, out);
  if (p.size() > static_cast<size_t>(limits::kMaxChoices))
    return Bad("prompt", "'prompt' holds " + std::to_string(p.size()) + " prompts; at most " +
                             std::to_string(limits::kMaxChoices) + " per request");
  for (const json& one : p) {
    if (!one.is_string() && !one.is_array())
      return Bad("prompt", "a batch 'prompt' must hold only strings or only token-id lists", "invalid_type");
    if (auto e = ParseOnePrompt(one, limits, tokenizer, out)) return e;
  }
  return std::nullopt;
}

// Each prompt must leave room for at least one generated token.
Error CheckPromptLengths(const ApiRequest& r, const ApiLimits& limits) {
  for (size_t i = 0; i < r.prompts.size(); ++i) {
    const std::string which = r.prompts.size() > 1 ? "prompt " + std::to_string(i) : "the prompt";
    const size_t len = r.prompts[i].size();
    if (len == 0) return Bad(r.chat ? "messages" : "prompt", which + " is empty");
    if (static_cast<int64_t>(len) >= limits.context)
      return Bad(r.chat ? "messages" : "prompt",
                 which + " has " + std::to_string(len) + " tokens; the context holds " +
                     std::to_string(limits.context) + " (prompt plus at least one generated token)",
                 "context_length_exceeded");
  }
  return std::nullopt;
}

Error ParseMaxTokens(const json& body, const ApiLimits& limits, ApiRequest* out) {
  // Chat: max_completion_tokens (OpenAI's name since max_tokens was deprecated there) before max_tokens.
  std::optional<int64_t> max_tokens;
  const char* key = "max_tokens";
  if (out->chat) {
    key = "max_completion_tokens";
    if (auto e = GetInt(body, key, &max_tokens)) return e;
  }
  if (!max_tokens) {
    key = "max_tokens";
    if (auto e = GetInt(body, key, &max_tokens)) return e;
  }
  size_t longest = 0;
  for (const auto& p : out->prompts) longest = std::max(longest, p.size());
  const int64_t room = limits.context - static_cast<int64_t>(longest);
  const int64_t limit = limits.max_tokens_limit > 0 ? limits.max_tokens_limit : limits.context;
  if (!max_tokens) {
    out->base.max_new_tokens =
        static_cast<int>(std::min<int64_t>({static_cast<int64_t>(limits.default_max_tokens), room, limit}));
    return std::nullopt;
  }
  if (*max_tokens < 0) return Bad(key, Quoted(key) + " must be >= 0");
  if (*max_tokens > limit)
    return Bad(key, Quoted(key) + " is " + std::to_string(*max_tokens) + "; this server allows at most " +
                        std::to_string(limit));
  if (*max_tokens > room)
    return Bad(key,
               "the prompt (" + std::to_string(longest) + " tokens) plus " + key + " (" + std::to_string(*max_tokens) +
                   ") exceeds the context of " + std::to_string(limits.context) + " tokens",
               "context_length_exceeded");
  out->base.max_new_tokens = static_cast<int>(*max_tokens);
  return std::nullopt;
}

Error ParseSampling(const json& body, uint64_t default_seed, ApiRequest* out) {
  std::optional<double> temperature, top_p;
  std::optional<int64_t> top_k, seed;
  if (auto e = GetNumber(body, "temperature", &temperature)) return e;
  if (auto e = GetNumber(body, "top_p", &top_p)) return e;
  if (auto e = GetInt(body, "top_k", &top_k)) return e;
  if (auto e = GetInt(body, "seed", &seed)) return e;
  runtime::SamplingParams& sp = out->base.sampling;
  if (temperature) {
    if (!(*temperature >= 0 && *temperature <= limits::kMaxTemperature))
      return Bad("temperature", std::string("'temperature' must be in ") + limits::kTemperatureRange);
    sp.temperature = static_cast<float>(*temperature);
  }
  if (top_p) {
    if (!(*top_p > 0 && *top_p <= 1)) return Bad("top_p", "'top_p' must be in (0, 1]");
    sp.top_p = static_cast<float>(*top_p);
  }
  if (top_k) {
    if (*top_k < -1 || *top_k > (1 << 22)) return Bad("top_k", "'top_k' must be -1, 0 or a positive count");
    sp.top_k = *top_k < 0 ? 0 : static_cast<int>(*top_k);
  }
  sp.seed = seed ? static_cast<uint64_t>(*seed) : default_seed;
  std::optional<double> presence, frequency, repetition;
  if (auto e = GetNumber(body, "presence_penalty", &presence)) return e;
  if (auto e = GetNumber(body, "frequency_penalty", &frequency)) return e;
  if (auto e = GetNumber(body, "repetition_penalty", &repetition)) return e;
  if (presence) {
    if (!(*presence >= -2 && *presence <= 2)) return Bad("presence_penalty", "'presence_penalty' must be in [-2, 2]");
    sp.presence_penalty = static_cast<float>(*presence);
  }
  if (frequency) {
    if (!(*frequency >= -2 && *frequency <= 2))
      return Bad("frequency_penalty", "'frequency_penalty' must be in [-2, 2]");
    sp.frequency_penalty = static_cast<float>(*frequency);
  }
  if (repetition) {
    if (!(*repetition >= 1e-3 && *repetition <= 10))
      return Bad("repetition_penalty", "'repetition_penalty' must be in [0.001, 10]");
    sp.repetition_penalty = static_cast<float>(*repetition);
  }
  // Parameters other servers take that this one does not implement: their neutral value (or null)
  // is accepted, anything else refused by name rather than silently ignored.
  struct Neutral {
    const char* key;
    double value;
  };
  for (const Neutral& n : {Neutral{"min_p", 0}, Neutral{"typical_p", 1}, Neutral{"best_of", 1}}) {
    std::optional<double> v;
    if (auto e = GetNumber(body, n.key, &v)) return e;
    if (v && *v != n.value)
      return Bad(n.key, Quoted(n.key) + " is not supported by this server; only " +
                            std::to_string(static_cast<int>(n.value)) + " (no effect) is accepted");
  }
  for (const char* key : {"bad_words", "allowed_token_ids"}) {
    auto it = body.find(key);
    if (it != body.end() && !it->is_null() && !it->empty())
      return Bad(key, Quoted(key) + " is not supported by this server (only an empty or null value is accepted)");
  }
  return GetBool(body, "ignore_eos", &out->base.ignore_eos);
}

// logit_bias ({"token id": bias in [-100, 100]}), min_tokens and stop_token_ids.
Error ParseTokenControls(const json& body, const ApiLimits& limits, ApiRequest* out) {
  auto token_id = [&](const char* key, const json& v, const std::string& text) -> Error {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= limits.vocab_size)
      return Bad(key,
                 Quoted(key) + ": " + text + " is not a token id in [0, " + std::to_string(limits.vocab_size) + ")");
    return std::nullopt;
  };
  runtime::SamplingParams& sp = out->base.sampling;
  auto bias = body.find("logit_bias");
  if (bias != body.end() && !bias->is_null()) {
    if (!bias->is_object())
      return Bad("logit_bias", "'logit_bias' must be an object of token id: bias", "invalid_type");
    if (bias->size() > 1024) return Bad("logit_bias", "'logit_bias' holds at most 1024 tokens");
    for (auto it = bias->begin(); it != bias->end(); ++it) {
      const json id = json::parse(it.key(), nullptr, /*allow_exceptions=*/false);
      if (auto e = token_id("logit_bias", id, "key \"" + it.key() + "\"")) return e;
      if (!it.value().is_number() || !(it.value().get<double>() >= -100 && it.value().get<double>() <= 100))
        return Bad("logit_bias", "'logit_bias' values must be numbers in [-100, 100]");
      sp.logit_bias.emplace_back(id.get<int32_t>(), static_cast<float>(it.value().get<double>()));
    }
  }
  std::optional<int64_t> min_tokens;
  if (auto e = GetInt(body, "min_tokens", &min_tokens)) return e;
  if (min_tokens) {
    if (*min_tokens < 0 || *min_tokens > out->base.max_new_tokens)
      return Bad("min_tokens",
                 "'min_tokens' must be in [0, max_tokens (" + std::to_string(out->base.max_new_tokens) + ")]");
    sp.min_tokens = static_cast<int>(*min_tokens);
  }
  auto ids = body.find("stop_token_ids");
  if (ids != body.end() && !ids->is_null()) {
    if (!ids->is_array())
      return Bad("stop_token_ids", "'stop_token_ids' must be an array of token ids", "invalid_type");
    if (ids->size() > 64) return Bad("stop_token_ids", "'stop_token_ids' holds at most 64 tokens");
    for (const json& v : *ids) {
      if (auto e = token_id("stop_token_ids", v, v.dump())) return e;
      out->base.stop_token_ids.push_back(v.get<int32_t>());
    }
  }
  return std::nullopt;
}

Error ParseStop(const json& body, ApiRequest* out) {
  auto stop = body.find("stop");
  if (stop == body.end() || stop->is_null()) return std::nullopt;
  std::vector<json> items = stop->is_array() ? stop->get<std::vector<json>>() : std::vector<json>{*stop};
  if (items.size() > 16) return Bad("stop", "'stop' holds at most 16 strings");
  for (const json& s : items) {
    if (!s.is_string()) return Bad("stop", "'stop' must be a string or an array of strings", "invalid_type");
    if (s.get<std::string>().empty()) return Bad("stop", "'stop' strings must not be empty");
    out->base.stop.push_back(s.get<std::string>());
  }
  return std::nullopt;
}

Error CheckTopN(const char* key, int64_t v) {
  if (v < 0 || v > limits::kMaxTopLogprobs)
    return Bad(key, Quoted(key) + " is " + std::to_string(v) + "; it must be in [0, " +
                        std::to_string(limits::kMaxTopLogprobs) + "]");
  return std::nullopt;
}

// Completions: `logprobs: N` (an integer). Chat: `logprobs: true` with `top_logprobs: N`.
Error ParseLogprobs(const json& body, ApiRequest* out) {
  if (!out->chat) {
    std::optional<int64_t> n;
    if (auto e = GetInt(body, "logprobs", &n)) return e;
    if (n) {
      if (auto e = CheckTopN("logprobs", *n)) return e;
      out->top_logprobs = static_cast<int>(*n);
    }
  } else {
    bool want = false;
    std::optional<int64_t> n;
    if (auto e = GetBool(body, "logprobs", &want)) return e;
    if (auto e = GetInt(body, "top_logprobs", &n)) return e;
    if (n && !want) return Bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    if (n)
      if (auto e = CheckTopN("top_logprobs", *n)) return e;
    if (want) out->top_logprobs = n ? static_cast<int>(*n) : 0;
  }
  if (auto e = GetBool(body, "return_tokens_as_token_ids", &out->tokens_as_ids)) return e;
  out->base.logprobs = out->top_logprobs;
  // Echoed prompts' logprobs come from the same prefill (all positions' logits): cheap.
  out->base.prompt_logprobs = out->echo && out->top_logprobs >= 0;
  return std::nullopt;
}

Error ParseChoicesAndStream(const json& body, ApiRequest* out) {
  std::optional<int64_t> n;
  if (auto e = GetInt(body, "n", &n)) return e;
  if (n) {
    const int64_t prompts = static_cast<int64_t>(out->prompts.size());
    if (*n < 1 || *n * prompts > limits::kMaxChoices)
      return Bad("n", "'n' is " + std::to_string(*n) + "; it must be >= 1 and n x prompts (" + std::to_string(prompts) +
                          ") at most " + std::to_string(limits::kMaxChoices));
    out->n = static_cast<int>(*n);
  }
  if (auto e = GetBool(body, "stream", &out->stream)) return e;
  auto so = body.find("stream_options");
  if (so != body.end() && so->is_object()) {
    if (auto e = GetBool(*so, "include_usage", &out->include_usage)) return e;
  }
  if (!out->chat) {
    if (auto e = GetBool(body, "echo", &out->echo)) return e;
  }
  return std::nullopt;
}

// SplitMix64's finaliser: neighbouring request seeds give unrelated choice seeds.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

uint64_t ApiRequest::ChoiceSeed(int choice) const {
  // Choice 0 keeps the request's seed, so n = 1 samples exactly as before.
  return choice == 0 ? base.sampling.seed : Mix(base.sampling.seed ^ Mix(static_cast<uint64_t>(choice)));
}

ServeRequest ApiRequest::Choice(int choice) const {
  ServeRequest r = base;
  r.prompt = prompts[static_cast<size_t>(choice / n)];
  r.sampling.seed = ChoiceSeed(choice);
  return r;
}

std::optional<ApiError> ParseApiRequest(const json& body, bool chat, const ApiLimits& limits,
                                        const runtime::Tokenizer& tokenizer, const ChatTemplate& chat_template,
                                        uint64_t default_seed, ApiRequest* out) {
  if (!body.is_object()) return Bad("", "the request body must be a JSON object", "invalid_type");
  out->chat = chat;
  if (auto e = ParseModel(body, limits)) return e;
  if (auto e = chat ? ParseMessages(body, tokenizer, chat_template, out) : ParsePrompts(body, limits, tokenizer, out))
    return e;
  if (auto e = CheckPromptLengths(*out, limits)) return e;
  if (auto e = ParseChoicesAndStream(body, out)) return e;
  if (auto e = ParseMaxTokens(body, limits, out)) return e;
  if (auto e = ParseSampling(body, default_seed, out)) return e;
  if (auto e = ParseTokenControls(body, limits, out)) return e;
  if (auto e = ParseStop(body, out)) return e;
  return ParseLogprobs(body, out);
}

}  // namespace ef::launch
