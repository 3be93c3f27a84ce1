// PackedBf16Format: the layout of DType kPbf16, bf16 weights packed losslessly into about 12 bits
// a value (0.756x the bytes), in one place.
//
// Why it works: in models/tiny-code-moe (trained) and in the weights of every family we ship
// fixtures for (Mixtral, DeepSeek-V2/V3, Qwen2/3-MoE, OLMoE, GPT-OSS; random initialisations at
// their configs' scale), all but 0.006-0.009% of the values of a group of 128 consecutive values of
// a row have a bf16 exponent within 14 of the group's largest (PackedBf16Test).
// So a value keeps its sign and 7 mantissa bits (one byte) and a 4-bit code for its exponent below
// the group's; the rare rest go to a list of exceptions. Every bit of the bf16 weight is kept: a miss
// of the expert cache moves 0.756x the bytes with outputs unchanged, and a device slot holds 1.32x
// the experts.
//
// A weight [rows, cols] (row-major, y = x W^T; cols a multiple of 128, at most 65536) is one block:
//
//   low         rows * cols bytes: (sign << 7) | mantissa of each value (0 for an exception)
//   codes       rows * cols / 2 bytes. Group g of a row (values 128g .. 128g + 127) owns 64 bytes;
//               byte j holds the code of value 128g + j in its low nibble and of 128g + 64 + j in
//               its high one. Code c < 15: exponent field = base - c. Code 15: exponent field 0
//               (zeros and subnormals, exact) or an exception (low is 0, so it decodes to +0).
//   base        rows * cols / 128 bytes: each group's largest exponent field
//   row_end     rows uint32: row r's exceptions are entries [row_end[r - 1], row_end[r]) (0 for r = 0)
//   exceptions  exception_capacity entries of uint32: column (low 16 bits) | bf16 bits << 16;
//               sorted by row, then column; unused entries 0
//
// Each section starts on a 16-byte boundary. The capacity, one exception per 1024 values, is 10x
// the rate measured above (not yet measured on a full published checkpoint); a weight with more
// cannot use the format: PackBf16 says so, and the expert cache reports the expert (run such a
// model with cache.miss_precision native).
//
// Decoding a value: bits = (low & 0x80) << 8 | exponent << 7 | (low & 0x7f), then each exception
// of the row overwrites its column (or, in a dot product, adds bf16(bits) * x[column], since the
// packed value decodes to +0).
#pragma once

#include <cstddef>
#include <cstdint>

namespace ef {

struct PackedBf16Format {
  static constexpr int kGroup = 128;
  static constexpr int kEscape = 15;     // code: exponent field 0, or an exception
  static constexpr int kMaxOffset = 14;  // codes 0..14: exponent field base - code
  static constexpr int64_t kValuesPerException = 1024;
  static constexpr int64_t kMaxCols = 65536;  // an exception's column is 16 bits
  static constexpr int64_t kAlign = 16;

  static constexpr bool divides(int64_t cols) { return cols > 0 && cols % kGroup == 0 && cols <= kMaxCols; }
  static constexpr int64_t AlignUp(int64_t b) { return (b + kAlign - 1) / kAlign * kAlign; }

  static constexpr int64_t codes_offset(int64_t rows, int64_t cols) { return AlignUp(rows * cols); }
  static constexpr int64_t base_offset(int64_t rows, int64_t cols) {
    return AlignUp(codes_offset(rows, cols) + rows * cols / 2);
  }
  static constexpr int64_t row_end_offset(int64_t rows, int64_t cols) {
    return AlignUp(base_offset(rows, cols) + rows * (cols / kGroup));
  }
  static constexpr int64_t exceptions_offset(int64_t rows, int64_t cols) {
    return AlignUp(row_end_offset(rows, cols) + rows * 4);
  }
  static constexpr int64_t exception_capacity(int64_t rows, int64_t cols) {
    return (rows * cols + kValuesPerException - 1) / kValuesPerException;
  }
  // Defined for any shape (one that divides() refuses is never packed, but its size is well defined).
  static constexpr size_t bytes(int64_t rows, int64_t cols) {
    return static_cast<size_t>(AlignUp(exceptions_offset(rows, cols) + exception_capacity(rows, cols) * 4));
  }

  // One value from its low byte, its code and its group's base.
  static constexpr uint16_t Decode(uint8_t low, int code, int base) {
    const int exponent = code == kEscape ? 0 : base - code;
    return static_cast<uint16_t>(((low & 0x80) << 8) | (exponent << 7) | (low & 0x7f));
  }
};

static_assert(PackedBf16Format::Decode(0x3f, 0, 127) == 0x3fbf);                          // 1.4921875
static_assert(PackedBf16Format::Decode(0x80, PackedBf16Format::kEscape, 200) == 0x8000);  // -0
// Mixtral's w1: 0.756x the bytes of bf16.
static_assert(PackedBf16Format::bytes(14336, 4096) * 1000 / (14336ull * 4096 * 2) == 756);

}  // namespace ef
