// Minimal Unicode support for the tokenizer: UTF-8 decoding/encoding and the character
// classes the pre-tokenizer regexes use (\p{L}, \p{N}, \s).
//
// Decoding never fails: an invalid or truncated sequence decodes as one byte with
// code point U+FFFD and length 1, so callers can always make progress and keep byte
// offsets exact. Letter/number tables are generated from the Unicode Character Database
// (unicode_tables.cc). All functions are pure and thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace ef::runtime::unicode {

struct CodeRange {
  char32_t first;
  char32_t last;  // inclusive
};

inline constexpr char32_t kReplacementChar = 0xFFFD;

// Decodes the code point starting at text[pos]; sets *len to the number of bytes used (>= 1).
char32_t DecodeUtf8(std::string_view text, size_t pos, size_t* len);
// Appends the UTF-8 encoding of `cp` to `out`.
void AppendUtf8(char32_t cp, std::string* out);
// Length in bytes of a complete UTF-8 character starting at text[pos] (1 for invalid bytes).
inline size_t Utf8CharLen(std::string_view text, size_t pos) {
  size_t len = 0;
  DecodeUtf8(text, pos, &len);
  return len;
}
// True when `text` is entirely well-formed UTF-8.
bool IsValidUtf8(std::string_view text);
// Replaces each maximal ill-formed subsequence with U+FFFD (like Rust's from_utf8_lossy).
std::string ToValidUtf8Lossy(std::string_view bytes);

bool IsLetter(char32_t cp);      // general category L*
bool IsNumber(char32_t cp);      // general category N*
bool IsWhitespace(char32_t cp);  // White_Space property (what \s matches in Rust's regex)

}  // namespace ef::runtime::unicode
