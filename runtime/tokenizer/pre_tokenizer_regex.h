// Hand-written equivalents of the pre-tokenizer regexes found in tokenizer.json files.
// Each function returns the byte ranges [begin, end) of the successive regex matches over
// `text` (the matches cover the whole text for these patterns). They implement the same
// leftmost-first alternation and backtracking (e.g. `\s+(?!\S)`) as the regex engines
// used by the `tokenizers` library, with \p{L}, \p{N} and \s from unicode.h.
#pragma once

#include <string_view>
#include <utility>
#include <vector>

namespace ef::runtime {

using ByteRange = std::pair<size_t, size_t>;

// GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
std::vector<ByteRange> SplitGpt2(std::string_view text);

// Qwen2 (max_digits 1) and Llama-3 (max_digits 3):
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}|
//  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
std::vector<ByteRange> SplitQwen2(std::string_view text, int max_digits);

}  // namespace ef::runtime
