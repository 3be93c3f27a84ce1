#include "runtime/tokenizer/pre_tokenizer_regex.h"

#include "runtime/tokenizer/unicode.h"

namespace ef::runtime {
namespace {

enum class CharClass { kLetter, kNumber, kSpace, kOther };

struct Char {
  char32_t cp;
  size_t pos;
  size_t len;
  CharClass cls;
};

// Decodes `text` once into code points with their class, plus a sentinel at the end.
std::vector<Char> Classify(std::string_view text) {
  std::vector<Char> chars;
  chars.reserve(text.size() + 1);
  for (size_t pos = 0; pos < text.size();) {
    size_t len = 0;
    const char32_t cp = unicode::DecodeUtf8(text, pos, &len);
    CharClass cls = CharClass::kOther;
    if (unicode::IsLetter(cp)) {
      cls = CharClass::kLetter;
    } else if (unicode::IsNumber(cp)) {
      cls = CharClass::kNumber;
    } else if (unicode::IsWhitespace(cp)) {
      cls = CharClass::kSpace;
    }
    chars.push_back({cp, pos, len, cls});
    pos += len;
  }
  chars.push_back({0, text.size(), 0, CharClass::kOther});  // sentinel, never consumed
  return chars;
}

char32_t Lower(char32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

// Length in chars of a contraction ('s 't 're 've 'm 'll 'd) at i, or 0.
size_t MatchContraction(const std::vector<Char>& c, size_t i, size_t n, bool ignore_case) {
  if (c[i].cp != '\'' || i + 1 >= n) return 0;
  const auto f = [&](size_t k) { return ignore_case ? Lower(c[k].cp) : c[k].cp; };
  const char32_t a = f(i + 1);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (i + 2 < n) {
    const char32_t b = f(i + 2);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  }
  return 0;
}

// Whitespace handling shared by both patterns: `\s+(?!\S)|\s+` at i (c[i] is whitespace).
// Returns the end index (exclusive) of the match.
size_t MatchTrailingSpace(const std::vector<Char>& c, size_t i, size_t n) {
  size_t k = i;
  while (k < n && c[k].cls == CharClass::kSpace) ++k;
  if (k == n) return k;          // run reaches the end: (?!\S) holds
  if (k - i >= 2) return k - 1;  // backtrack one so the lookahead sees whitespace
  return k;                      // single whitespace before \S: plain \s+
}

}  // namespace

std::vector<ByteRange> SplitGpt2(std::string_view text) {
  const std::vector<Char> c = Classify(text);
  const size_t n = c.size() - 1;
  std::vector<ByteRange> out;
  size_t i = 0;
  while (i < n) {
    size_t end = i;
    if (size_t m = MatchContraction(c, i, n, /*ignore_case=*/false)) {
      end = i + m;
    } else {
      // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional leading space, then a run.
      const size_t j = (c[i].cp == ' ' && i + 1 < n) ? i + 1 : i;
      const CharClass cls = c[j].cls;
      if (j < n && cls != CharClass::kSpace) {
        end = j;
        while (end < n && c[end].cls == cls) ++end;
      } else {
        end = MatchTrailingSpace(c, i, n);
      }
    }
    out.emplace_back(c[i].pos, c[end].pos);
    i = end;
  }
  return out;
}

std::vector<ByteRange> SplitQwen2(std::string_view text, int max_digits) {
  const std::vector<Char> c = Classify(text);
  const size_t n = c.size() - 1;
  std::vector<ByteRange> out;
  const auto is_newline = [&](size_t k) { return c[k].cp == '\r' || c[k].cp == '\n'; };
  size_t i = 0;
  while (i < n) {
    size_t end = i;
    const CharClass cls = c[i].cls;
    if (size_t m = MatchContraction(c, i, n, /*ignore_case=*/true)) {
      end = i + m;
    } else if (cls == CharClass::kLetter ||
               (cls != CharClass::kNumber && !is_newline(i) && i + 1 < n && c[i + 1].cls == CharClass::kLetter)) {
      // [^\r\n\p{L}\p{N}]?\p{L}+
      end = cls == CharClass::kLetter ? i : i + 1;
      while (end < n && c[end].cls == CharClass::kLetter) ++end;
    } else if (cls == CharClass::kNumber) {
      // \p{N}{1,max_digits}
      while (end < n && c[end].cls == CharClass::kNumber && end - i < static_cast<size_t>(max_digits)) ++end;
    } else {
      const size_t j = (c[i].cp == ' ' && i + 1 < n) ? i + 1 : i;
      if (c[j].cls == CharClass::kOther && j < n) {
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        end = j;
        while (end < n && c[end].cls == CharClass::kOther) ++end;
        while (end < n && is_newline(end)) ++end;
      } else {
        // c[i] is whitespace. `\s*[\r\n]+`: up to and including the last newline of the run.
        size_t k = i;
        size_t last_newline = n;
        while (k < n && c[k].cls == CharClass::kSpace) {
          if (is_newline(k)) last_newline = k;
          ++k;
        }
        end = last_newline != n ? last_newline + 1 : MatchTrailingSpace(c, i, n);
      }
    }
    out.emplace_back(c[i].pos, c[end].pos);
    i = end;
  }
  return out;
}

}  // namespace ef::runtime
