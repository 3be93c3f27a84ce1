#include "runtime/core/packed_bf16.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/core/thread_pool.h"

namespace ef {
namespace {

using F = PackedBf16Format;

constexpr int64_t kValuesPerThread = int64_t{1} << 20;
constexpr int64_t kMaxThreads = 16;

int Exponent(uint16_t v) { return (v >> 7) & 0xff; }
uint8_t Low(uint16_t v) { return static_cast<uint8_t>(((v >> 8) & 0x80) | (v & 0x7f)); }

// The sections of a block of [rows, cols].
template <typename Byte>
struct Sections {
  Byte* block;
  int64_t rows, cols;
  Byte* low() const { return block; }
  Byte* codes() const { return block + F::codes_offset(rows, cols); }
  Byte* base() const { return block + F::base_offset(rows, cols); }
  Byte* row_end() const { return block + F::row_end_offset(rows, cols); }
  Byte* exceptions() const { return block + F::exceptions_offset(rows, cols); }
};

uint32_t LoadU32(const uint8_t* p, int64_t i) {
  uint32_t v;
  std::memcpy(&v, p + 4 * i, 4);
  return v;
}

// Packs rows [begin, end) into their low, code and base bytes; appends their exceptions to `exc`
// and each row's count to `counts`.
void PackRows(const uint16_t* src, const Sections<uint8_t>& s, int64_t begin, int64_t end, std::vector<uint32_t>* exc,
              std::vector<uint32_t>* counts) {
  const int64_t cols = s.cols, groups = cols / F::kGroup;
  uint8_t code[F::kGroup];
  for (int64_t r = begin; r < end; ++r) {
    const size_t before = exc->size();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = r * cols + g * F::kGroup;
      const uint16_t* v = src + first;
      int base = 0;
      for (int i = 0; i < F::kGroup; ++i) base = std::max(base, Exponent(v[i]));
      s.base()[r * groups + g] = static_cast<uint8_t>(base);
      uint8_t* low = s.low() + first;
      for (int i = 0; i < F::kGroup; ++i) {
        const int e = Exponent(v[i]);
        if (e == 0 || base - e <= F::kMaxOffset) {
          code[i] = static_cast<uint8_t>(e == 0 ? F::kEscape : base - e);
          low[i] = Low(v[i]);
        } else {
          code[i] = F::kEscape;
          low[i] = 0;
          exc->push_back(static_cast<uint32_t>(g * F::kGroup + i) | static_cast<uint32_t>(v[i]) << 16);
        }
      }
      uint8_t* codes = s.codes() + first / 2;
      for (int j = 0; j < F::kGroup / 2; ++j) codes[j] = static_cast<uint8_t>(code[j] | code[j + F::kGroup / 2] << 4);
    }
    counts->push_back(static_cast<uint32_t>(exc->size() - before));
  }
}

std::string ShapeName(int64_t rows, int64_t cols) {
  return "PBF16 [" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
}

}  // namespace

StatusOr<size_t> PackBf16(const uint16_t* src, int64_t rows, int64_t cols, void* dst, size_t dst_bytes,
                          int max_threads) {
  if (rows < 1 || !F::divides(cols))
    return InvalidArgument("pack bf16: " + ShapeName(rows, cols) + ": cols must be a positive multiple of " +
                           std::to_string(F::kGroup) + " up to " + std::to_string(F::kMaxCols) +
                           " (keep this weight bf16)");
  const size_t bytes = F::bytes(rows, cols);
  if (dst_bytes < bytes)
    return InvalidArgument("pack bf16: " + ShapeName(rows, cols) + " needs " + std::to_string(bytes) +
                           " bytes, the destination has " + std::to_string(dst_bytes));
  const Sections<uint8_t> s{static_cast<uint8_t*>(dst), rows, cols};

  const int64_t hw = max_threads > 0 ? max_threads : AvailableCpus();
  const int64_t num_threads =
      std::clamp<int64_t>(rows * cols / kValuesPerThread, 1, std::min<int64_t>({hw, kMaxThreads, rows}));
  const int64_t chunk = (rows + num_threads - 1) / num_threads;
  std::vector<std::vector<uint32_t>> exc(static_cast<size_t>(num_threads)), counts(exc.size());
  const auto run = [&](int64_t t) {
    const int64_t begin = std::min(rows, t * chunk), end = std::min(rows, begin + chunk);
    PackRows(src, s, begin, end, &exc[t], &counts[t]);
  };
  RunOnThreads(num_threads, run);

  int64_t total = 0;
  for (const auto& e : exc) total += static_cast<int64_t>(e.size());
  const int64_t capacity = F::exception_capacity(rows, cols);
  if (total > capacity)
    return OutOfRange("pack bf16: " + ShapeName(rows, cols) + ": " + std::to_string(total) + " values lie more than " +
                      std::to_string(F::kMaxOffset) + " binades below their group's largest, past the format's " +
                      std::to_string(capacity) + " exceptions: it cannot be packed losslessly");
  uint32_t end = 0;
  uint8_t* row_end = s.row_end();
  uint8_t* out = s.exceptions();
  int64_t r = 0;
  for (size_t t = 0; t < exc.size(); ++t) {
    for (uint32_t c : counts[t]) {
      end += c;
      std::memcpy(row_end + 4 * r++, &end, 4);
    }
    if (exc[t].empty()) continue;  // (memcpy from an empty vector's null data is undefined)
    std::memcpy(out, exc[t].data(), exc[t].size() * 4);
    out += exc[t].size() * 4;
  }
  // Padding and unused entries zeroed, so that equal weights give equal blocks.
  auto* b = static_cast<uint8_t*>(dst);
  std::fill(b + rows * cols, s.codes(), 0);
  std::fill(s.codes() + rows * cols / 2, s.base(), 0);
  std::fill(s.base() + rows * (cols / F::kGroup), s.row_end(), 0);
  std::fill(s.row_end() + 4 * rows, s.exceptions(), 0);
  std::fill(out, b + bytes, 0);
  return bytes;
}

namespace {

// Row `row` decoded into dst[cols], each value's bits through `out` (uint16_t: as they are; float:
// widened).
template <typename T, typename Out>
void UnpackRow(const void* src, int64_t rows, int64_t cols, int64_t row, T* dst, Out out) {
  const Sections<const uint8_t> s{static_cast<const uint8_t*>(src), rows, cols};
  const int64_t groups = cols / F::kGroup;
  constexpr int kHalf = F::kGroup / 2;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = row * cols + g * F::kGroup;
    const int base = s.base()[row * groups + g];
    const uint8_t* low = s.low() + first;
    const uint8_t* codes = s.codes() + first / 2;
    T* o = dst + g * F::kGroup;
    for (int j = 0; j < kHalf; ++j) {
      o[j] = out(F::Decode(low[j], codes[j] & 0xf, base));
      o[j + kHalf] = out(F::Decode(low[j + kHalf], codes[j] >> 4, base));
    }
  }
  const uint32_t begin = row == 0 ? 0 : LoadU32(s.row_end(), row - 1), end = LoadU32(s.row_end(), row);
  for (uint32_t i = begin; i < end; ++i) {
    const uint32_t e = LoadU32(s.exceptions(), i);
    dst[e & 0xffff] = out(static_cast<uint16_t>(e >> 16));
  }
}

}  // namespace

void UnpackBf16Row(const void* src, int64_t rows, int64_t cols, int64_t row, uint16_t* dst) {
  UnpackRow(src, rows, cols, row, dst, [](uint16_t b) { return b; });
}

void UnpackBf16RowF32(const void* src, int64_t rows, int64_t cols, int64_t row, float* dst) {
  UnpackRow(src, rows, cols, row, dst, [](uint16_t b) { return Bf16ToF32(b); });
}

Status UnpackBf16(const void* src, int64_t rows, int64_t cols, uint16_t* dst) {
  if (rows < 1 || !F::divides(cols))
    return InvalidArgument("unpack bf16: " + ShapeName(rows, cols) + ": cols must be a positive multiple of " +
                           std::to_string(F::kGroup) + " up to " + std::to_string(F::kMaxCols));
  const Sections<const uint8_t> s{static_cast<const uint8_t*>(src), rows, cols};
  const int64_t capacity = F::exception_capacity(rows, cols);
  uint32_t prev = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t end = LoadU32(s.row_end(), r);
    if (end < prev || end > capacity)
      return InvalidArgument("unpack bf16: " + ShapeName(rows, cols) + ": row " + std::to_string(r) +
                             "'s exceptions end at " + std::to_string(end) + " (after " + std::to_string(prev) +
                             ", capacity " + std::to_string(capacity) + ")");
    for (uint32_t i = prev; i < end; ++i)
      if ((LoadU32(s.exceptions(), i) & 0xffff) >= cols)
        return InvalidArgument("unpack bf16: " + ShapeName(rows, cols) + ": exception " + std::to_string(i) +
                               " names a column past the row");
    prev = end;
  }
  for (int64_t r = 0; r < rows; ++r) UnpackBf16Row(src, rows, cols, r, dst + r * cols);
  return Status::Ok();
}

int64_t CountBf16Exceptions(const uint16_t* src, int64_t rows, int64_t cols) {
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g + F::kGroup <= cols; g += F::kGroup) {
      const uint16_t* v = src + r * cols + g;
      int base = 0;
      for (int i = 0; i < F::kGroup; ++i) base = std::max(base, Exponent(v[i]));
      for (int i = 0; i < F::kGroup; ++i) n += Exponent(v[i]) != 0 && base - Exponent(v[i]) > F::kMaxOffset;
    }
  return n;
}

}  // namespace ef
