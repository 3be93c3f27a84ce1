// The request side of the OpenAI API: parsing and validating the JSON body of
// POST /v1/completions and /v1/chat/completions into the requests the ServingLoop runs.
//
// Every rejection is an ApiError naming the offending field (`param`), so a client sees which
// field to fix; nothing invalid reaches the engine. Parsing needs no engine: it is a pure
// function of the body, the limits and the tokenizer.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "launch/server/chat_template.h"
#include "launch/server/serving_loop.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ef::launch {

// A rejected request: the HTTP status and the OpenAI error object {message, type, param, code}.
struct ApiError {
  ApiError(int status, std::string message, std::string type, std::string code, std::string param = {})
      : status(status),
        message(std::move(message)),
        type(std::move(type)),
        code(std::move(code)),
        param(std::move(param)) {}

  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string code;
  std::string param;  // the request field at fault; empty: none
};

// What the server allows; the parser checks every request against it.
struct ApiLimits {
  std::string model_name;    // requests must name it
  int context = 0;           // the engine's context (prompt + generated tokens)
  int vocab_size = 0;        // token ids must lie in [0, vocab_size)
  int max_tokens_limit = 0;  // largest max_tokens; 0: the context
  int default_max_tokens = 16;
};

// A parsed generation request. Choice i (OpenAI's `index`) answers prompt i / n with seed
// ChoiceSeed(i): the prompts of a batch are consecutive blocks of n choices.
struct ApiRequest {
  bool chat = false;
  bool stream = false;
  bool include_usage = false;
  bool echo = false;  // completions: the prompt's text (and, with logprobs, its tokens) lead each choice
  int n = 1;
  int top_logprobs = -1;       // -1: no logprobs; N: each token's logprob and N alternatives
  bool tokens_as_ids = false;  // vLLM's return_tokens_as_token_ids: tokens spelled "token_id:N"
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> prompt_texts;  // with echo: the text each prompt answers with
  ServeRequest base;                      // sampling, stop, max_new_tokens, logprobs; prompt unset

  int num_choices() const { return static_cast<int>(prompts.size()) * n; }
  // Request seed for choice 0; distinct seeds derived from it for the others.
  uint64_t ChoiceSeed(int choice) const;
  // The ServeRequest of choice i.
  ServeRequest Choice(int choice) const;
};

// Parses `body` (already JSON) for the chat or the completions endpoint. `default_seed` is used
// when the request gives none. On error returns it and leaves `out` partly filled.
std::optional<ApiError> ParseApiRequest(const nlohmann::json& body, bool chat, const ApiLimits& limits,
                                        const runtime::Tokenizer& tokenizer, const ChatTemplate& chat_template,
                                        uint64_t default_seed, ApiRequest* out);

}  // namespace ef::launch
