#include "runtime/tokenizer/unicode.h"

#include <algorithm>

namespace ef::runtime::unicode {

extern const CodeRange kLetterRanges[];
extern const size_t kLetterRangesSize;
extern const CodeRange kNumberRanges[];
extern const size_t kNumberRangesSize;

namespace {

bool InRanges(const CodeRange* ranges, size_t n, char32_t cp) {
  const CodeRange* end = ranges + n;
  const CodeRange* it = std::upper_bound(ranges, end, cp, [](char32_t c, const CodeRange& r) { return c < r.first; });
  if (it == ranges) return false;
  --it;
  return cp <= it->last;
}

// Number of bytes of the well-formed sequence at text[pos], or 0 if ill-formed. Follows
// the Unicode table of well-formed byte sequences (no overlongs, no surrogates, <= U+10FFFF).
size_t WellFormedLen(std::string_view text, size_t pos, char32_t* cp) {
  const auto b = [&](size_t i) { return static_cast<unsigned char>(text[pos + i]); };
  const size_t avail = text.size() - pos;
  const unsigned char b0 = b(0);
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (avail < 2 || b(1) < lo || b(1) > hi) return 0;
  for (size_t i = 2; i < n; ++i) {
    if (avail <= i || b(i) < 0x80 || b(i) > 0xBF) return 0;
  }
  char32_t c = b0 & (0x7F >> n);
  for (size_t i = 1; i < n; ++i) c = (c << 6) | (b(i) & 0x3F);
  *cp = c;
  return n;
}

// Length of the maximal prefix of an ill-formed sequence at pos (the bytes that one
// U+FFFD replaces, per the Unicode "substitution of maximal subparts" practice).
size_t MaximalSubpart(std::string_view text, size_t pos) {
  const auto b = [&](size_t i) { return static_cast<unsigned char>(text[pos + i]); };
  const size_t avail = text.size() - pos;
  const unsigned char b0 = b(0);
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 1;
  }
  size_t i = 1;
  if (i < avail && b(1) >= lo && b(1) <= hi) {
    ++i;
    while (i < n && i < avail && b(i) >= 0x80 && b(i) <= 0xBF) ++i;
  }
  return i;
}

}  // namespace

char32_t DecodeUtf8(std::string_view text, size_t pos, size_t* len) {
  char32_t cp = 0;
  const size_t n = WellFormedLen(text, pos, &cp);
  if (n == 0) {
    *len = 1;
    return kReplacementChar;
  }
  *len = n;
  return cp;
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsValidUtf8(std::string_view text) {
  char32_t cp;
  for (size_t pos = 0; pos < text.size();) {
    const size_t n = WellFormedLen(text, pos, &cp);
    if (n == 0) return false;
    pos += n;
  }
  return true;
}

std::string ToValidUtf8Lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  char32_t cp;
  for (size_t pos = 0; pos < bytes.size();) {
    const size_t n = WellFormedLen(bytes, pos, &cp);
    if (n > 0) {
      out.append(bytes.substr(pos, n));
      pos += n;
    } else {
      AppendUtf8(kReplacementChar, &out);
      pos += MaximalSubpart(bytes, pos);
    }
  }
  return out;
}

bool IsLetter(char32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return InRanges(kLetterRanges, kLetterRangesSize, cp);
}

bool IsNumber(char32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return InRanges(kNumberRanges, kNumberRangesSize, cp);
}

bool IsWhitespace(char32_t cp) {
  switch (cp) {
    case 0x09:
    case 0x0A:
    case 0x0B:
    case 0x0C:
    case 0x0D:
    case 0x20:
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

}  // namespace ef::runtime::unicode
