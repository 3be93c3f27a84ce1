// Fuzzes ChatTemplate (launch/server/chat_template.cc): parsing a Jinja chat template and
// rendering it.
//
// Input: SOURCE, or SOURCE \0 CONTENT \0 CONTENT ... Messages take the contents in turn with
// the roles system, user, assistant, user, ...; without contents a fixed three-message chat is
// rendered. A generation prompt is asked for when the number of messages is odd.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "launch/server/chat_template.h"
#include "tests/fuzz/fuzz_check.h"

using ef::launch::ChatMessage;
using ef::launch::ChatTemplate;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto [source, rest] = ef::fuzz::SplitAtNul(std::string_view(reinterpret_cast<const char*>(data), size));
  std::vector<ChatMessage> messages;
  if (rest.empty()) {
    messages = {{"system", "be brief"}, {"user", "hi"}, {"assistant", "hello"}};
  } else {
    static const char* const kRoles[] = {"user", "assistant"};
    for (size_t i = 0; !rest.empty() || i == 0; ++i) {
      auto [content, tail] = ef::fuzz::SplitAtNul(rest);
      messages.push_back({i == 0 ? "system" : kRoles[(i - 1) % 2], std::string(content)});
      rest = tail;
    }
  }
  auto t = ChatTemplate::FromSource(std::string(source), "<s>", "</s>");
  if (!t.ok()) return 0;
  (void)t->Apply(messages, messages.size() % 2 == 1);
  return 0;
}
