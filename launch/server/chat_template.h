// ChatTemplate: turns chat messages into a prompt string.
//
// With a `chat_template` in the model's tokenizer_config.json it renders that Jinja template
// through a small interpreter covering what common chat templates use: {{ expr }}, {% if/elif/
// else/endif %}, {% for x in list %} with loop.first/last/index/index0/length, {% set x = expr %},
// whitespace control ({%- -%}), comments, string/number/bool literals, list literals, attribute
// and index access, slices [a:b], + - ~ == != < > <= >= and or not in, `is defined/none/string`,
// filters trim/length/upper/lower/tojson, and raise_exception(). Variables: messages,
// add_generation_prompt, bos_token, eos_token. A construct outside this subset is an error at
// load time or at render time that names it, never silently wrong output.
// Without a template: "<role>: <content>\n" per message, then "assistant:" when a generation
// prompt is asked for.
//
// Thread safety: immutable after loading; Apply may run on many threads.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "runtime/core/status.h"

namespace ef::launch {

struct ChatMessage {
  std::string role;
  std::string content;
};

class ChatTemplate {
 public:
  // The plain template.
  ChatTemplate() = default;
  // Reads dir/tokenizer_config.json when present (chat_template, bos_token, eos_token); the plain
  // template when the file or its chat_template is absent.
  static StatusOr<ChatTemplate> FromModelDir(const std::string& dir);
  // From template source directly (tests).
  static StatusOr<ChatTemplate> FromSource(const std::string& source, std::string bos_token, std::string eos_token);

  StatusOr<std::string> Apply(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;
  bool is_plain() const { return program_ == nullptr; }

  struct Program;

 private:
  std::shared_ptr<const Program> program_;
  std::string bos_token_, eos_token_;
};

}  // namespace ef::launch
