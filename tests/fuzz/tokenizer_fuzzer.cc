// Fuzzes the tokenizer (runtime/tokenizer): loading tokenizer.json and encoding/decoding text.
//
// Input: TEXT, or TEXT \0 TOKENIZER_JSON. Without a tokenizer the text goes through
// models/tiny-code-moe's byte-level BPE, where decoding what was encoded must give the text
// back when it is valid UTF-8, and streaming decoding must equal whole decoding. With one,
// the fuzzed tokenizer is loaded and, when accepted, encodes and decodes the text.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tokenizer/tokenizer.h"
#include "runtime/tokenizer/unicode.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

using ef::runtime::StreamDecoder;
using ef::runtime::Tokenizer;

const Tokenizer& TinyTokenizer() {
  static const Tokenizer* tok = [] {
    auto t = Tokenizer::FromModelDir(EF_MODELS_DIR "/tiny-code-moe");
    EF_FUZZ_CHECK(t.ok());
    return new Tokenizer(std::move(t).value());
  }();
  return *tok;
}

std::string StreamDecode(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  StreamDecoder stream(tok);
  std::string out;
  for (int32_t id : ids) out += stream.Push(id);
  return out + stream.Flush();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto [text, tokenizer_json] = ef::fuzz::SplitAtNul(std::string_view(reinterpret_cast<const char*>(data), size));
  if (tokenizer_json.empty()) {
    const Tokenizer& tok = TinyTokenizer();
    const std::vector<int32_t> ids = tok.Encode(text);
    for (int32_t id : ids) EF_FUZZ_CHECK(id >= 0 && id < tok.vocab_size());
    const std::string decoded = tok.Decode(ids);
    if (ef::runtime::unicode::IsValidUtf8(text)) {
      EF_FUZZ_CHECK(decoded == text);
      EF_FUZZ_CHECK(StreamDecode(tok, ids) == decoded);
    }
    (void)tok.Decode(ids, /*skip_special=*/true);
    return 0;
  }
  auto tok = Tokenizer::FromJsonText(std::string(tokenizer_json), "fuzz/tokenizer.json");
  if (!tok.ok()) return 0;
  std::vector<int32_t> ids = tok->Encode(text);
  for (int32_t id : ids) EF_FUZZ_CHECK(id >= 0 && id < tok->vocab_size());
  (void)tok->Decode(ids);
  (void)StreamDecode(*tok, ids);
  // Ids the text did not produce: out-of-range ones are dropped, never read past a table.
  ids.push_back(-1);
  ids.push_back(tok->vocab_size());
  ids.push_back(tok->vocab_size() - 1);
  (void)tok->Decode(ids, /*skip_special=*/true);
  for (int32_t id : ids) (void)tok->IdToToken(id);
  (void)tok->bos_id();
  (void)tok->eos_id();
  return 0;
}
