#include "runtime/tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "runtime/core/limits.h"
#include "runtime/tokenizer/bpe_model.h"
#include "runtime/tokenizer/pre_tokenizer_regex.h"
#include "runtime/tokenizer/unicode.h"

namespace ef::runtime {
namespace {

using json = nlohmann::json;
constexpr std::string_view kMetaspace = "\xE2\x96\x81";  // U+2581 "▁"

// ---------------------------------------------------------------------------------------
// GPT-2 byte <-> unicode mapping: printable bytes map to themselves, the others to
// U+0100 + k in byte order, so every byte string becomes a printable string.
struct ByteLevelTables {
  std::array<std::string, 256> byte_to_str;
  std::unordered_map<char32_t, uint8_t> char_to_byte;
};

const ByteLevelTables& ByteTables() {
  static const ByteLevelTables tables = [] {
    ByteLevelTables t;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      unicode::AppendUtf8(cp, &t.byte_to_str[b]);
      t.char_to_byte[cp] = static_cast<uint8_t>(b);
    }
    return t;
  }();
  return tables;
}

void ReplaceAll(std::string* s, std::string_view from, std::string_view to) {
  if (from.empty() || s->find(from) == std::string::npos) return;
  std::string out;
  out.reserve(s->size());
  size_t pos = 0;
  for (size_t hit; (hit = s->find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(*s, pos, hit - pos);
    out.append(to);
  }
  out.append(*s, pos);
  *s = std::move(out);
}

std::string PrefixedWith(std::string_view prefix, std::string_view s) {
  std::string out;
  out.reserve(prefix.size() + s.size());
  out.append(prefix);
  out.append(s);
  return out;
}

// Small typed accessors over nlohmann::json that never throw.
std::string GetString(const json& j, const char* key, std::string def = "") {
  auto it = j.find(key);
  return (it != j.end() && it->is_string()) ? it->get<std::string>() : def;
}
bool GetBool(const json& j, const char* key, bool def) {
  auto it = j.find(key);
  return (it != j.end() && it->is_boolean()) ? it->get<bool>() : def;
}
int64_t GetInt(const json& j, const char* key, int64_t def) {
  auto it = j.find(key);
  return (it != j.end() && it->is_number_integer()) ? it->get<int64_t>() : def;
}
StatusOr<std::string> GetType(const json& j, std::string_view what) {
  if (!j.is_object()) return InvalidArgument(std::string(what) + " is not a JSON object");
  auto it = j.find("type");
  if (it == j.end() || !it->is_string()) return InvalidArgument(std::string(what) + " has no string 'type'");
  return it->get<std::string>();
}
// A {"String": s} pattern; {"Regex": r} is reported as unsupported.
StatusOr<std::string> GetStringPattern(const json& j, std::string_view what) {
  auto it = j.find("pattern");
  if (it == j.end() || !it->is_object()) return InvalidArgument(std::string(what) + " has no pattern object");
  if (auto s = it->find("String"); s != it->end() && s->is_string()) return s->get<std::string>();
  if (auto r = it->find("Regex"); r != it->end() && r->is_string()) {
    return Unimplemented(std::string(what) + " with Regex pattern '" + r->get<std::string>() + "' is not supported");
  }
  return InvalidArgument(std::string(what) + " pattern is neither String nor Regex");
}

// ---------------------------------------------------------------------------------------
// Normalizers: string -> string.
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void Apply(std::string* s) const = 0;
};

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts) : parts_(std::move(parts)) {}
  void Apply(std::string* s) const override {
    for (const auto& p : parts_) p->Apply(s);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  void Apply(std::string* s) const override {
    if (!s->empty()) *s = PrefixedWith(prefix_, *s);
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(std::string from, std::string to) : from_(std::move(from)), to_(std::move(to)) {}
  void Apply(std::string* s) const override { ReplaceAll(s, from_, to_); }

 private:
  std::string from_, to_;
};

// NFC without composition tables: text that is already NFC (nearly all text) is unchanged.
class NfcPassThroughNormalizer final : public Normalizer {
 public:
  void Apply(std::string*) const override {}
};

StatusOr<std::unique_ptr<Normalizer>> MakeNormalizer(const json& j) {
  EF_ASSIGN_OR_RETURN(std::string type, GetType(j, "normalizer"));
  if (type == "Sequence") {
    auto it = j.find("normalizers");
    if (it == j.end() || !it->is_array()) return InvalidArgument("normalizer Sequence has no 'normalizers' array");
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (const json& sub : *it) {
      EF_ASSIGN_OR_RETURN(auto p, MakeNormalizer(sub));
      parts.push_back(std::move(p));
    }
    return std::unique_ptr<Normalizer>(new SequenceNormalizer(std::move(parts)));
  }
  if (type == "Prepend") return std::unique_ptr<Normalizer>(new PrependNormalizer(GetString(j, "prepend")));
  if (type == "Replace") {
    EF_ASSIGN_OR_RETURN(std::string from, GetStringPattern(j, "normalizer Replace"));
    return std::unique_ptr<Normalizer>(new ReplaceNormalizer(std::move(from), GetString(j, "content")));
  }
  if (type == "NFC") return std::unique_ptr<Normalizer>(new NfcPassThroughNormalizer());
  return Unimplemented("tokenizer normalizer type '" + type + "' is not supported");
}

// ---------------------------------------------------------------------------------------
// Pre-tokenizers: split a segment into words. A piece remembers whether it starts the
// original text (Metaspace prepend_scheme "first" needs it).
struct Piece {
  std::string text;
  bool at_start;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void Apply(std::vector<Piece>* pieces) const = 0;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Splits every piece at `matches(piece)` according to `behavior` (as `tokenizers` does).
template <typename MatchFn>
void SplitPieces(std::vector<Piece>* pieces, SplitBehavior behavior, MatchFn matches) {
  std::vector<Piece> out;
  out.reserve(pieces->size());
  for (Piece& piece : *pieces) {
    const std::string& t = piece.text;
    // All segments in order: (begin, end, is_match).
    struct Seg {
      size_t b, e;
      bool match;
    };
    std::vector<Seg> segs;
    size_t pos = 0;
    for (const ByteRange& m : matches(t)) {
      if (m.first > pos) segs.push_back({pos, m.first, false});
      if (m.second > m.first) segs.push_back({m.first, m.second, true});
      pos = m.second;
    }
    if (pos < t.size()) segs.push_back({pos, t.size(), false});
    std::vector<Seg> merged;
    switch (behavior) {
      case SplitBehavior::kIsolated:
        merged = std::move(segs);
        break;
      case SplitBehavior::kRemoved:
        for (const Seg& s : segs)
          if (!s.match) merged.push_back(s);
        break;
      case SplitBehavior::kMergedWithPrevious: {
        bool prev_match = false;
        for (const Seg& s : segs) {
          if (s.match && !prev_match && !merged.empty()) {
            merged.back().e = s.e;
          } else {
            merged.push_back(s);
          }
          prev_match = s.match;
        }
        break;
      }
      case SplitBehavior::kMergedWithNext: {
        bool next_match = false;
        for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
          if (it->match && !next_match && !merged.empty()) {
            merged.back().b = it->b;
          } else {
            merged.push_back(*it);
          }
          next_match = it->match;
        }
        std::reverse(merged.begin(), merged.end());
        break;
      }
      case SplitBehavior::kContiguous: {
        bool prev_match = false;
        for (const Seg& s : segs) {
          if (s.match && prev_match && !merged.empty()) {
            merged.back().e = s.e;
          } else {
            merged.push_back(s);
          }
          prev_match = s.match;
        }
        break;
      }
    }
    for (const Seg& s : merged) out.push_back({t.substr(s.b, s.e - s.b), piece.at_start && s.b == 0});
  }
  *pieces = std::move(out);
}

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts) : parts_(std::move(parts)) {}
  void Apply(std::vector<Piece>* pieces) const override {
    for (const auto& p : parts_) p->Apply(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, bool use_regex)
      : add_prefix_space_(add_prefix_space), use_regex_(use_regex) {}
  void Apply(std::vector<Piece>* pieces) const override {
    if (add_prefix_space_) {
      for (Piece& p : *pieces)
        if (!p.text.empty() && p.text[0] != ' ') p.text = PrefixedWith(" ", p.text);
    }
    if (use_regex_) SplitPieces(pieces, SplitBehavior::kIsolated, [](std::string_view t) { return SplitGpt2(t); });
    const ByteLevelTables& tables = ByteTables();
    for (Piece& p : *pieces) {
      std::string mapped;
      mapped.reserve(p.text.size() * 2);
      for (unsigned char b : p.text) mapped += tables.byte_to_str[b];
      p.text = std::move(mapped);
    }
  }

 private:
  bool add_prefix_space_;
  bool use_regex_;
};

enum class PrependScheme { kAlways, kFirst, kNever };

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split) {}
  void Apply(std::vector<Piece>* pieces) const override {
    for (Piece& p : *pieces) {
      ReplaceAll(&p.text, " ", replacement_);
      const bool prepend = scheme_ == PrependScheme::kAlways || (scheme_ == PrependScheme::kFirst && p.at_start);
      if (prepend && !p.text.empty() && !p.text.starts_with(replacement_)) p.text = PrefixedWith(replacement_, p.text);
    }
    if (split_) {
      SplitPieces(pieces, SplitBehavior::kMergedWithNext, [this](std::string_view t) {
        std::vector<ByteRange> m;
        for (size_t pos = 0; (pos = t.find(replacement_, pos)) != std::string_view::npos; pos += replacement_.size()) {
          m.emplace_back(pos, pos + replacement_.size());
        }
        return m;
      });
    }
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
};

class SplitPreTokenizer final : public PreTokenizer {
 public:
  enum class Kind { kString, kGpt2, kQwen2, kLlama3 };
  SplitPreTokenizer(Kind kind, std::string pattern, SplitBehavior behavior)
      : kind_(kind), pattern_(std::move(pattern)), behavior_(behavior) {}
  void Apply(std::vector<Piece>* pieces) const override {
    SplitPieces(pieces, behavior_, [this](std::string_view t) {
      switch (kind_) {
        case Kind::kGpt2:
          return SplitGpt2(t);
        case Kind::kQwen2:
          return SplitQwen2(t, 1);
        case Kind::kLlama3:
          return SplitQwen2(t, 3);
        case Kind::kString:
          break;
      }
      std::vector<ByteRange> m;
      if (pattern_.empty()) return m;
      for (size_t pos = 0; (pos = t.find(pattern_, pos)) != std::string_view::npos; pos += pattern_.size()) {
        m.emplace_back(pos, pos + pattern_.size());
      }
      return m;
    });
  }

 private:
  Kind kind_;
  std::string pattern_;
  SplitBehavior behavior_;
};

constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

StatusOr<PrependScheme> GetPrependScheme(const json& j, std::string_view what) {
  if (auto it = j.find("prepend_scheme"); it != j.end() && it->is_string()) {
    const std::string s = it->get<std::string>();
    if (s == "always") return PrependScheme::kAlways;
    if (s == "first") return PrependScheme::kFirst;
    if (s == "never") return PrependScheme::kNever;
    return InvalidArgument(std::string(what) + " has unknown prepend_scheme '" + s + "'");
  }
  // Older files: add_prefix_space (default true).
  return GetBool(j, "add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
}

StatusOr<std::unique_ptr<PreTokenizer>> MakePreTokenizer(const json& j) {
  EF_ASSIGN_OR_RETURN(std::string type, GetType(j, "pre_tokenizer"));
  if (type == "Sequence") {
    auto it = j.find("pretokenizers");
    if (it == j.end() || !it->is_array()) return InvalidArgument("pre_tokenizer Sequence has no 'pretokenizers' array");
    std::vector<std::unique_ptr<PreTokenizer>> parts;
    for (const json& sub : *it) {
      EF_ASSIGN_OR_RETURN(auto p, MakePreTokenizer(sub));
      parts.push_back(std::move(p));
    }
    return std::unique_ptr<PreTokenizer>(new SequencePreTokenizer(std::move(parts)));
  }
  if (type == "ByteLevel") {
    return std::unique_ptr<PreTokenizer>(
        new ByteLevelPreTokenizer(GetBool(j, "add_prefix_space", true), GetBool(j, "use_regex", true)));
  }
  if (type == "Metaspace") {
    EF_ASSIGN_OR_RETURN(PrependScheme scheme, GetPrependScheme(j, "pre_tokenizer Metaspace"));
    return std::unique_ptr<PreTokenizer>(new MetaspacePreTokenizer(GetString(j, "replacement", std::string(kMetaspace)),
                                                                   scheme, GetBool(j, "split", true)));
  }
  if (type == "Split") {
    if (GetBool(j, "invert", false)) return Unimplemented("pre_tokenizer Split with invert=true is not supported");
    const std::string b = GetString(j, "behavior", "Isolated");
    SplitBehavior behavior;
    if (b == "Removed") {
      behavior = SplitBehavior::kRemoved;
    } else if (b == "Isolated") {
      behavior = SplitBehavior::kIsolated;
    } else if (b == "MergedWithPrevious") {
      behavior = SplitBehavior::kMergedWithPrevious;
    } else if (b == "MergedWithNext") {
      behavior = SplitBehavior::kMergedWithNext;
    } else if (b == "Contiguous") {
      behavior = SplitBehavior::kContiguous;
    } else {
      return InvalidArgument("pre_tokenizer Split has unknown behavior '" + b + "'");
    }
    auto pit = j.find("pattern");
    if (pit == j.end() || !pit->is_object()) return InvalidArgument("pre_tokenizer Split has no pattern object");
    if (auto r = pit->find("Regex"); r != pit->end() && r->is_string()) {
      const std::string re = r->get<std::string>();
      SplitPreTokenizer::Kind kind;
      if (re == kGpt2Pattern) {
        kind = SplitPreTokenizer::Kind::kGpt2;
      } else if (re == kQwen2Pattern) {
        kind = SplitPreTokenizer::Kind::kQwen2;
      } else if (re == kLlama3Pattern) {
        kind = SplitPreTokenizer::Kind::kLlama3;
      } else {
        return Unimplemented("pre_tokenizer Split with Regex pattern '" + re +
                             "' is not supported (known: GPT-2, Qwen2, Llama-3 patterns)");
      }
      if (behavior != SplitBehavior::kIsolated) {
        return Unimplemented("pre_tokenizer Split with a Regex pattern supports only behavior Isolated, got '" + b +
                             "'");
      }
      return std::unique_ptr<PreTokenizer>(new SplitPreTokenizer(kind, re, behavior));
    }
    EF_ASSIGN_OR_RETURN(std::string s, GetStringPattern(j, "pre_tokenizer Split"));
    return std::unique_ptr<PreTokenizer>(new SplitPreTokenizer(SplitPreTokenizer::Kind::kString, s, behavior));
  }
  return Unimplemented("tokenizer pre_tokenizer type '" + type + "' is not supported");
}

// ---------------------------------------------------------------------------------------
// Decoders: a chain over token strings, as in `tokenizers` (each step maps the list of
// token strings to a new list; the final list is concatenated).
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void Apply(std::vector<std::string>* tokens) const = 0;
};

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts) : parts_(std::move(parts)) {}
  void Apply(std::vector<std::string>* tokens) const override {
    for (const auto& p : parts_) p->Apply(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

// Maps each character back to its byte; a token with a character outside the table keeps
// its raw UTF-8 bytes. The bytes are decoded lossily (invalid sequences -> U+FFFD).
class ByteLevelDecoder final : public Decoder {
 public:
  void Apply(std::vector<std::string>* tokens) const override {
    const ByteLevelTables& tables = ByteTables();
    std::string bytes;
    for (const std::string& t : *tokens) {
      const size_t mark = bytes.size();
      for (size_t pos = 0; pos < t.size();) {
        size_t len = 0;
        const char32_t cp = unicode::DecodeUtf8(t, pos, &len);
        pos += len;
        auto it = tables.char_to_byte.find(cp);
        if (it == tables.char_to_byte.end()) {
          bytes.resize(mark);
          bytes += t;
          break;
        }
        bytes.push_back(static_cast<char>(it->second));
      }
    }
    tokens->assign(1, unicode::ToValidUtf8Lossy(bytes));
  }
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(std::string from, std::string to) : from_(std::move(from)), to_(std::move(to)) {}
  void Apply(std::vector<std::string>* tokens) const override {
    for (std::string& t : *tokens) ReplaceAll(&t, from_, to_);
  }

 private:
  std::string from_, to_;
};

// Runs of "<0xNN>" tokens become their bytes if they form valid UTF-8, else one U+FFFD per byte.
class ByteFallbackDecoder final : public Decoder {
 public:
  void Apply(std::vector<std::string>* tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens->size());
    std::string pending;
    const auto flush = [&] {
      if (pending.empty()) return;
      if (unicode::IsValidUtf8(pending)) {
        out.push_back(pending);
      } else {
        for (size_t i = 0; i < pending.size(); ++i) out.push_back("\xEF\xBF\xBD");
      }
      pending.clear();
    };
    for (std::string& t : *tokens) {
      int byte = -1;
      if (t.size() == 6 && t.starts_with("<0x") && t.back() == '>') byte = ParseHexByte(t[3], t[4]);
      if (byte >= 0) {
        pending.push_back(static_cast<char>(byte));
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    *tokens = std::move(out);
  }

 private:
  static int HexDigit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }
  static int ParseHexByte(char hi, char lo) {
    const int h = HexDigit(hi), l = HexDigit(lo);
    return (h < 0 || l < 0) ? -1 : h * 16 + l;
  }
};

class FuseDecoder final : public Decoder {
 public:
  void Apply(std::vector<std::string>* tokens) const override {
    std::string all;
    for (const std::string& t : *tokens) all += t;
    tokens->assign(1, std::move(all));
  }
};

// Removes up to `start` leading and `stop` trailing occurrences of one character per token.
class StripDecoder final : public Decoder {
 public:
  StripDecoder(std::string content, size_t start, size_t stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  void Apply(std::vector<std::string>* tokens) const override {
    if (content_.empty()) return;
    for (std::string& t : *tokens) {
      size_t b = 0, e = t.size();
      for (size_t i = 0; i < start_ && t.compare(b, content_.size(), content_) == 0 && b < e; ++i) b += content_.size();
      for (size_t i = 0;
           i < stop_ && e >= b + content_.size() && t.compare(e - content_.size(), content_.size(), content_) == 0;
           ++i) {
        e -= content_.size();
      }
      t = t.substr(b, e - b);
    }
  }

 private:
  std::string content_;
  size_t start_, stop_;
};

// Replacement char -> space; in the first token, replacement chars are dropped unless the
// prepend scheme is "never" (mirrors `tokenizers`).
class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, PrependScheme scheme)
      : replacement_(std::move(replacement)), scheme_(scheme) {}
  void Apply(std::vector<std::string>* tokens) const override {
    for (size_t i = 0; i < tokens->size(); ++i) {
      const bool drop = i == 0 && scheme_ != PrependScheme::kNever;
      ReplaceAll(&(*tokens)[i], replacement_, drop ? "" : " ");
    }
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
};

StatusOr<std::unique_ptr<Decoder>> MakeDecoder(const json& j) {
  EF_ASSIGN_OR_RETURN(std::string type, GetType(j, "decoder"));
  if (type == "Sequence") {
    auto it = j.find("decoders");
    if (it == j.end() || !it->is_array()) return InvalidArgument("decoder Sequence has no 'decoders' array");
    std::vector<std::unique_ptr<Decoder>> parts;
    for (const json& sub : *it) {
      EF_ASSIGN_OR_RETURN(auto p, MakeDecoder(sub));
      parts.push_back(std::move(p));
    }
    return std::unique_ptr<Decoder>(new SequenceDecoder(std::move(parts)));
  }
  if (type == "ByteLevel") return std::unique_ptr<Decoder>(new ByteLevelDecoder());
  if (type == "Replace") {
    EF_ASSIGN_OR_RETURN(std::string from, GetStringPattern(j, "decoder Replace"));
    return std::unique_ptr<Decoder>(new ReplaceDecoder(std::move(from), GetString(j, "content")));
  }
  if (type == "ByteFallback") return std::unique_ptr<Decoder>(new ByteFallbackDecoder());
  if (type == "Fuse") return std::unique_ptr<Decoder>(new FuseDecoder());
  if (type == "Strip") {
    const int64_t start = GetInt(j, "start", 0), stop = GetInt(j, "stop", 0);
    if (start < 0 || stop < 0) return InvalidArgument("decoder Strip has negative start/stop");
    return std::unique_ptr<Decoder>(new StripDecoder(GetString(j, "content", " "), start, stop));
  }
  if (type == "Metaspace") {
    EF_ASSIGN_OR_RETURN(PrependScheme scheme, GetPrependScheme(j, "decoder Metaspace"));
    return std::unique_ptr<Decoder>(new MetaspaceDecoder(GetString(j, "replacement", std::string(kMetaspace)), scheme));
  }
  return Unimplemented("tokenizer decoder type '" + type + "' is not supported");
}

// ---------------------------------------------------------------------------------------
// Added tokens, matched as whole tokens in the text (leftmost-longest).
struct AddedToken {
  std::string content;  // as matched (normalized form for normalized tokens)
  int32_t id;
  bool special;
  bool lstrip, rstrip, single_word;
};

class AddedTokenMatcher {
 public:
  void Add(AddedToken t) {
    if (t.content.empty()) return;
    tokens_.push_back(std::move(t));
  }
  void Build() {
    for (auto& b : by_first_byte_) b.clear();
    for (size_t i = 0; i < tokens_.size(); ++i) {
      by_first_byte_[static_cast<unsigned char>(tokens_[i].content[0])].push_back(static_cast<int32_t>(i));
    }
    for (auto& b : by_first_byte_) {
      std::stable_sort(b.begin(), b.end(),
                       [&](int32_t x, int32_t y) { return tokens_[x].content.size() > tokens_[y].content.size(); });
    }
  }
  bool empty() const { return tokens_.empty(); }

  // Calls on_text(begin, end) for text between matches and on_token(id, begin) per match.
  template <typename OnText, typename OnToken>
  void Split(std::string_view text, OnText on_text, OnToken on_token) const {
    size_t emitted = 0;  // text[0, emitted) already handed out
    size_t pos = 0;
    while (pos < text.size()) {
      const AddedToken* hit = nullptr;
      for (int32_t idx : by_first_byte_[static_cast<unsigned char>(text[pos])]) {
        const AddedToken& t = tokens_[idx];
        if (text.compare(pos, t.content.size(), t.content) == 0) {
          hit = &t;
          break;  // longest first
        }
      }
      if (hit == nullptr) {
        ++pos;
        continue;
      }
      size_t b = pos, e = pos + hit->content.size();
      if (hit->single_word && !(IsWordBoundaryBefore(text, b) && IsWordBoundaryAfter(text, e))) {
        pos = e;
        continue;
      }
      if (hit->lstrip) {
        while (b > emitted) {
          size_t k = b - 1;
          while (k > emitted && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
          size_t len = 0;
          if (!unicode::IsWhitespace(unicode::DecodeUtf8(text, k, &len))) break;
          b = k;
        }
      }
      if (hit->rstrip) {
        while (e < text.size()) {
          size_t len = 0;
          if (!unicode::IsWhitespace(unicode::DecodeUtf8(text, e, &len))) break;
          e += len;
        }
      }
      if (b > emitted) on_text(emitted, b);
      on_token(hit->id, b);
      emitted = pos = e;
    }
    if (emitted < text.size()) on_text(emitted, text.size());
  }

 private:
  static bool IsWordChar(char32_t c) { return unicode::IsLetter(c) || unicode::IsNumber(c) || c == '_'; }
  static bool IsWordBoundaryBefore(std::string_view text, size_t b) {
    if (b == 0) return true;
    size_t k = b - 1;
    while (k > 0 && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
    size_t len = 0;
    return !IsWordChar(unicode::DecodeUtf8(text, k, &len));
  }
  static bool IsWordBoundaryAfter(std::string_view text, size_t e) {
    if (e >= text.size()) return true;
    size_t len = 0;
    return !IsWordChar(unicode::DecodeUtf8(text, e, &len));
  }

  std::vector<AddedToken> tokens_;
  std::array<std::vector<int32_t>, 256> by_first_byte_;
};

StatusOr<std::string> ReadFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return NotFound("tokenizer file not found: " + path);
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot open tokenizer file: " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (!in.good() && !in.eof()) return DataLoss("error reading tokenizer file: " + path);
  return ss.str();
}

}  // namespace

// ---------------------------------------------------------------------------------------
struct Tokenizer::Impl {
  std::unique_ptr<Normalizer> normalizer;       // may be null
  std::unique_ptr<PreTokenizer> pre_tokenizer;  // may be null
  std::unique_ptr<BpeModel> model;
  std::unique_ptr<Decoder> decoder;    // may be null
  AddedTokenMatcher raw_added;         // matched before normalization
  AddedTokenMatcher normalized_added;  // matched in normalized text
  std::unordered_map<int32_t, std::string> added_id_to_token;
  TokenMap added_token_to_id;
  std::vector<bool> special;  // by id
  int32_t vocab_size = 0;
  std::optional<int32_t> bos, eos;

  void EncodeSegment(std::string_view text, bool at_start, std::vector<int32_t>* ids) const;
  const std::string* IdToToken(int32_t id) const {
    if (auto it = added_id_to_token.find(id); it != added_id_to_token.end()) return &it->second;
    return model->IdToToken(id);
  }
};

StatusOr<Tokenizer> Tokenizer::FromModelDir(const std::string& dir) {
  return FromFile((std::filesystem::path(dir) / "tokenizer.json").string());
}

StatusOr<Tokenizer> Tokenizer::FromFile(const std::string& path) {
  EF_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  return FromJsonText(text, path);
}

StatusOr<Tokenizer> Tokenizer::FromJsonText(const std::string& text, const std::string& path) {
  const json root = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return InvalidArgument("tokenizer file is not valid JSON: " + path);
  if (!root.is_object()) return InvalidArgument("tokenizer file is not a JSON object: " + path);

  auto impl = std::make_shared<Impl>();
  // The accessors below check types, so nlohmann should not throw; the catch is a backstop
  // so that no exception ever crosses this API.
  try {
    auto component = [&](const char* key) -> const json* {
      auto it = root.find(key);
      return (it == root.end() || it->is_null()) ? nullptr : &*it;
    };
    const json* model = component("model");
    if (model == nullptr) return InvalidArgument("tokenizer file has no 'model': " + path);
    auto with_path = [&](Status s) {
      s.Prepend("loading tokenizer " + path);
      return s;
    };
    {
      auto m = BpeModel::FromJson(*model);
      if (!m.ok()) return with_path(m.status());
      impl->model = std::move(m).value();
    }
    if (const json* j = component("normalizer")) {
      auto n = MakeNormalizer(*j);
      if (!n.ok()) return with_path(n.status());
      impl->normalizer = std::move(n).value();
    }
    if (const json* j = component("pre_tokenizer")) {
      auto p = MakePreTokenizer(*j);
      if (!p.ok()) return with_path(p.status());
      impl->pre_tokenizer = std::move(p).value();
    }
    if (const json* j = component("decoder")) {
      auto d = MakeDecoder(*j);
      if (!d.ok()) return with_path(d.status());
      impl->decoder = std::move(d).value();
    }

    int32_t max_id = impl->model->size() - 1;
    std::vector<std::pair<int32_t, bool>> specials;
    if (const json* added = component("added_tokens")) {
      if (!added->is_array()) return with_path(InvalidArgument("'added_tokens' is not an array"));
      for (const json& a : *added) {
        if (!a.is_object() || !a.contains("content") || !a["content"].is_string() || !a.contains("id") ||
            !a["id"].is_number_integer()) {
          return with_path(InvalidArgument("an added_tokens entry lacks a string 'content' or an integer 'id'"));
        }
        const int64_t id = a["id"].get<int64_t>();
        if (id < 0 || id >= limits::kMaxVocab) {
          return with_path(InvalidArgument("added token id " + std::to_string(id) + " is out of range"));
        }
        AddedToken t{a["content"].get<std::string>(), static_cast<int32_t>(id),    GetBool(a, "special", false),
                     GetBool(a, "lstrip", false),     GetBool(a, "rstrip", false), GetBool(a, "single_word", false)};
        impl->added_id_to_token[t.id] = t.content;
        impl->added_token_to_id[t.content] = t.id;
        specials.emplace_back(t.id, t.special);
        max_id = std::max(max_id, t.id);
        // Tokens flagged "normalized" are matched in normalized text (default: non-special ones).
        if (GetBool(a, "normalized", !t.special)) {
          if (impl->normalizer) impl->normalizer->Apply(&t.content);
          impl->normalized_added.Add(std::move(t));
        } else {
          impl->raw_added.Add(std::move(t));
        }
      }
    }
    impl->raw_added.Build();
    impl->normalized_added.Build();
    impl->vocab_size = max_id + 1;
    impl->special.assign(impl->vocab_size, false);
    for (auto [id, sp] : specials) impl->special[id] = impl->special[id] || sp;
  } catch (const std::exception& e) {
    return InvalidArgument("malformed tokenizer file " + path + ": " + e.what());
  }

  Tokenizer tok(impl);
  for (const char* name : {"<s>", "<|bos|>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"}) {
    if (auto id = tok.TokenToId(name)) {
      impl->bos = id;
      break;
    }
  }
  for (const char* name : {"</s>", "<|eos|>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>"}) {
    if (auto id = tok.TokenToId(name)) {
      impl->eos = id;
      break;
    }
  }
  return tok;
}

void Tokenizer::Impl::EncodeSegment(std::string_view text, bool at_start, std::vector<int32_t>* ids) const {
  std::string normalized(text);
  if (normalizer) normalizer->Apply(&normalized);
  const auto encode_words = [&](std::string_view s, bool first) {
    if (s.empty()) return;
    if (!pre_tokenizer) {
      model->EncodeWord(s, ids);
      return;
    }
    std::vector<Piece> pieces{{std::string(s), first}};
    pre_tokenizer->Apply(&pieces);
    for (const Piece& p : pieces) model->EncodeWord(p.text, ids);
  };
  if (normalized_added.empty()) {
    encode_words(normalized, at_start);
    return;
  }
  normalized_added.Split(
      normalized,
      [&](size_t b, size_t e) { encode_words(std::string_view(normalized).substr(b, e - b), at_start && b == 0); },
      [&](int32_t id, size_t) { ids->push_back(id); });
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  impl_->raw_added.Split(
      text, [&](size_t b, size_t e) { impl_->EncodeSegment(text.substr(b, e - b), b == 0, &ids); },
      [&](int32_t id, size_t) { ids.push_back(id); });
  return ids;
}

std::string Tokenizer::Decode(std::span<const int32_t> ids, bool skip_special) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (skip_special && IsSpecial(id)) continue;
    if (const std::string* t = impl_->IdToToken(id)) tokens.push_back(*t);
  }
  if (!impl_->decoder) {
    // `tokenizers` joins with spaces when there is no decoder.
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i > 0) out += ' ';
      out += tokens[i];
    }
    return out;
  }
  impl_->decoder->Apply(&tokens);
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  if (auto it = impl_->added_token_to_id.find(token); it != impl_->added_token_to_id.end()) return it->second;
  return impl_->model->TokenToId(token);
}

std::optional<std::string> Tokenizer::IdToToken(int32_t id) const {
  if (const std::string* t = impl_->IdToToken(id)) return *t;
  return std::nullopt;
}

std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < static_cast<int32_t>(impl_->special.size()) && impl_->special[id];
}

std::string Tokenizer::ChatTemplate() const { return ""; }

// ---------------------------------------------------------------------------------------
// StreamDecoder keeps a small window of ids: the last already-emitted token(s) for context
// (so decoders that strip or prepend at the start of a sequence behave as in a full
// decode) plus the ids not emitted yet. Text is emitted only when the window's decoding
// grew and does not end in U+FFFD (an incomplete character decodes to U+FFFD).

StreamDecoder::StreamDecoder(const Tokenizer& tok, bool skip_special) : tok_(tok), skip_special_(skip_special) {}

std::string StreamDecoder::Push(int32_t id) {
  ids_.push_back(id);
  std::string text = tok_.Decode(ids_, skip_special_);
  const size_t num_pending = ids_.size() - prefix_index_;
  // A U+FFFD at the end is normally an incomplete character; no valid character needs more
  // than 4 byte tokens, so after kMaxHeldIds the text is emitted anyway (it may contain a
  // real U+FFFD).
  const bool incomplete = text.ends_with("\xEF\xBF\xBD") && num_pending <= kMaxHeldIds;
  if (text.size() <= prefix_.size() || incomplete) return "";
  std::string fresh = Pending(text);
  // The next window starts at the first id not emitted before this call; it decodes to the
  // new prefix.
  ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(prefix_index_));
  prefix_ = tok_.Decode(ids_, skip_special_);
  prefix_index_ = ids_.size();
  return fresh;
}

std::string StreamDecoder::Flush() {
  std::string rest = Pending(tok_.Decode(ids_, skip_special_));
  ids_.clear();
  prefix_.clear();
  prefix_index_ = 0;
  return rest;
}

std::string StreamDecoder::Pending(const std::string& window_text) const {
  if (window_text.starts_with(prefix_)) return window_text.substr(prefix_.size());
  // The new ids changed how earlier ones decode (a byte-fallback run that became invalid as
  // a whole). Emitted text cannot be taken back: decode the new ids on their own.
  const std::span<const int32_t> pending(ids_.data() + prefix_index_, ids_.size() - prefix_index_);
  return tok_.Decode(pending, skip_special_);
}

}  // namespace ef::runtime
