// Tokenizer for Hugging Face `tokenizer.json` files (the `tokenizers` library format), in
// plain C++ with no Python and no third-party tokenizer library.
//
// Supported pipeline components (anything else is rejected at load time with an
// Unimplemented status that names the component):
//   normalizer:    Sequence, Prepend, Replace (String pattern), NFC (assumes input is already
//                  NFC: it is passed through unchanged)
//   pre_tokenizer: Sequence, ByteLevel (GPT-2 regex or none), Metaspace, Split (Regex
//                  patterns of GPT-2, Qwen2 and Llama-3 with behavior Isolated; String patterns)
//   model:         BPE (merges as "a b" strings or [a, b] pairs, byte_fallback, unk_token,
//                  fuse_unk, ignore_merges)
//   decoder:       Sequence, ByteLevel, Metaspace, Replace (String), ByteFallback, Fuse, Strip
//   post_processor: ignored (Encode never adds special tokens)
// Added tokens (`added_tokens`) are matched in the text as whole tokens before the
// normalizer runs (leftmost-longest, honouring lstrip/rstrip/single_word/normalized), as
// the `tokenizers` library does.
//
// Thread safety: a Tokenizer is immutable after loading except for an internal word
// cache that is guarded by a mutex; Encode/Decode may be called from many threads.
// Copies share the loaded tables (cheap to copy).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/core/status.h"

namespace ef::runtime {

using ::ef::Status;
using ::ef::StatusOr;

class Tokenizer {
 public:
  // Loads a tokenizer.json. Errors: NotFound (missing file), InvalidArgument (malformed
  // JSON or inconsistent contents), Unimplemented (a component type this runtime lacks).
  static StatusOr<Tokenizer> FromFile(const std::string& path);
  // Parses tokenizer.json text; `origin` names it in errors. Same errors as FromFile.
  static StatusOr<Tokenizer> FromJsonText(const std::string& text, const std::string& origin);
  // Loads dir/tokenizer.json.
  static StatusOr<Tokenizer> FromModelDir(const std::string& dir);

  // Text -> ids. Adds no BOS/EOS. Added/special tokens occurring in `text` become their ids.
  std::vector<int32_t> Encode(std::string_view text) const;
  // Ids -> text through the configured decoder. Unknown ids are dropped; with
  // `skip_special`, tokens marked special are dropped too.
  std::string Decode(std::span<const int32_t> ids, bool skip_special = false) const;

  // Number of ids including added tokens (max id + 1).
  int32_t vocab_size() const;
  std::optional<int32_t> TokenToId(std::string_view token) const;
  // The token string of `id` (added token content or model vocab entry); nullopt if unknown.
  std::optional<std::string> IdToToken(int32_t id) const;
  // Guessed from the added tokens' names (<s>, <|bos|>, <|begin_of_text|>, ... and </s>,
  // <|eos|>, <|endoftext|>, ...); nullopt when none is present.
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  bool IsSpecial(int32_t id) const;
  // tokenizer_config.json (where chat templates live) is read elsewhere: always "".
  std::string ChatTemplate() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// Incremental decoding for streaming output. Push ids one at a time; each call returns the
// text that became complete. Text is never split inside a UTF-8 character: byte-fallback
// or byte-level pieces of a character are held back until the character is complete.
// The concatenation of all Push results and the final Flush equals
// tok.Decode(all ids, skip_special) whenever the ids decode to valid UTF-8 (invalid byte
// runs come out as U+FFFD, possibly fewer of them than a full Decode gives). Holds a reference to `tok`, which must
// outlive it. Not thread-safe (one decoder per stream).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = false);
  // Newly completed text (may be empty).
  std::string Push(int32_t id);
  // Whatever is still held back (incomplete bytes come out as U+FFFD); resets the stream.
  std::string Flush();

 private:
  static constexpr size_t kMaxHeldIds = 8;
  // The not-yet-emitted part of `window_text` (the decoding of ids_).
  std::string Pending(const std::string& window_text) const;

  const Tokenizer& tok_;
  bool skip_special_;
  std::vector<int32_t> ids_;  // window: ids_[0, prefix_index_) are already emitted (kept as context)
  size_t prefix_index_ = 0;
  std::string prefix_;  // Decode(ids_[0, prefix_index_)): the window's already-emitted text
};

}  // namespace ef::runtime
