// Fuzzes ParseApiRequest (launch/server/api_request.cc), the server's validation of
// /v1/completions and /v1/chat/completions bodies, called directly with the limits and the
// tokenizer of models/tiny-code-moe. A body with "messages" goes to the chat endpoint. An
// accepted request must fit the limits: nothing invalid may reach the engine.
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "launch/server/api_request.h"
#include "launch/server/chat_template.h"
#include "runtime/core/limits.h"
#include "runtime/tokenizer/tokenizer.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using ef::launch::ApiLimits;
using ef::launch::ApiRequest;
using ef::launch::ChatTemplate;
using ef::runtime::Tokenizer;

struct Fixture {
  Tokenizer tokenizer;
  ChatTemplate chat_template;
  ApiLimits limits;
};

const Fixture& GetFixture() {
  static const Fixture* fixture = [] {
    auto tok = Tokenizer::FromModelDir(EF_MODELS_DIR "/tiny-code-moe");
    EF_FUZZ_CHECK(tok.ok());
    // ChatML, as chat models commonly ship it.
    auto chat = ChatTemplate::FromSource(
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "", "<|im_end|>");
    EF_FUZZ_CHECK(chat.ok());
    ApiLimits limits;
    limits.model_name = "tiny-code-moe";
    limits.context = 256;
    limits.vocab_size = tok->vocab_size();
    limits.max_tokens_limit = 128;
    return new Fixture{std::move(tok).value(), std::move(chat).value(), limits};
  }();
  return *fixture;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Fixture& f = GetFixture();
  const nlohmann::json body = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) return 0;
  const bool chat = body.is_object() && body.contains("messages");
  ApiRequest request;
  if (ef::launch::ParseApiRequest(body, chat, f.limits, f.tokenizer, f.chat_template, /*default_seed=*/7, &request))
    return 0;
  EF_FUZZ_CHECK(request.chat == chat);
  EF_FUZZ_CHECK(!request.prompts.empty());
  EF_FUZZ_CHECK(request.n >= 1 && request.num_choices() <= ef::limits::kMaxChoices);
  EF_FUZZ_CHECK(request.top_logprobs <= ef::limits::kMaxTopLogprobs);
  for (const auto& prompt : request.prompts) {
    EF_FUZZ_CHECK(!prompt.empty());
    EF_FUZZ_CHECK(static_cast<int>(prompt.size()) < f.limits.context);
    for (int32_t id : prompt) EF_FUZZ_CHECK(id >= 0 && id < f.limits.vocab_size);
  }
  for (int i = 0; i < request.num_choices(); ++i) {
    const auto choice = request.Choice(i);
    EF_FUZZ_CHECK(choice.max_new_tokens >= 0 && choice.max_new_tokens <= f.limits.max_tokens_limit);
    EF_FUZZ_CHECK(!choice.prompt.empty());
    EF_FUZZ_CHECK(static_cast<int64_t>(choice.prompt.size()) + choice.max_new_tokens <= f.limits.context);
  }
  return 0;
}
