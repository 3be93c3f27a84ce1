#include "runtime/core/dtype.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/core/block_scaled_format.h"
#include "runtime/core/packed_bf16_format.h"
#include "runtime/core/quant_format.h"
#include "runtime/core/thread_pool.h"

namespace ef {
namespace {

// Values of [begin, end) whose exponent bits are all ones (NaN or infinity). First the largest
// magnitude's bits (a max reduction the compiler vectorises: finite iff below the exponent mask),
// then, only where that finds one, the count and the first.
template <typename U>
int64_t CountExponentAllOnes(const U* x, int64_t begin, int64_t end, U mask, int64_t* first) {
  const U magnitude = static_cast<U>(~(U{1} << (8 * sizeof(U) - 1)));
  U largest = 0;
  for (int64_t i = begin; i < end; ++i) largest = std::max<U>(largest, x[i] & magnitude);
  *first = -1;
  if (largest < mask) return 0;
  int64_t count = 0;
  for (int64_t i = begin; i < end; ++i)
    if ((x[i] & mask) == mask) {
      if (count++ == 0) *first = i;
    }
  return count;
}

template <typename U>
int64_t CountNonFiniteBits(const U* x, int64_t n, U mask, int64_t* first) {
  constexpr int64_t kMinChunkBytes = int64_t{64} << 20, kMaxThreads = 16;
  const int64_t bytes = n * static_cast<int64_t>(sizeof(U));
  const int64_t threads =
      std::clamp<int64_t>(bytes / kMinChunkBytes, 1, std::min<int64_t>(AvailableCpus(), kMaxThreads));
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<int64_t> counts(static_cast<size_t>(threads)), firsts(static_cast<size_t>(threads));
  const auto run = [&](int64_t t) {
    const int64_t b = std::min(n, t * chunk), e = std::min(n, b + chunk);
    counts[static_cast<size_t>(t)] = CountExponentAllOnes(x, b, e, mask, &firsts[static_cast<size_t>(t)]);
  };
  RunOnThreads(threads, run);
  int64_t count = 0;
  *first = -1;
  for (size_t t = 0; t < counts.size(); ++t) {
    count += counts[t];
    if (*first < 0) *first = firsts[t];
  }
  return count;
}

}  // namespace

int64_t CountNonFinite(DType t, const void* x, int64_t n, int64_t* first) {
  switch (t) {
    case DType::kF32:
      return CountNonFiniteBits(static_cast<const uint32_t*>(x), n, uint32_t{0x7f800000u}, first);
    case DType::kF16:
      return CountNonFiniteBits(static_cast<const uint16_t*>(x), n, uint16_t{0x7c00u}, first);
    case DType::kBF16:
      return CountNonFiniteBits(static_cast<const uint16_t*>(x), n, uint16_t{0x7f80u}, first);
    default:
      *first = -1;
      return 0;
  }
}

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kI64:
      return "I64";
    case DType::kI32:
      return "I32";
    case DType::kU8:
      return "U8";
    case DType::kI8:
      return "I8";
    case DType::kBool:
      return "BOOL";
    case DType::kF64:
      return "F64";
    case DType::kI16:
      return "I16";
    case DType::kQ8:
      return "Q8G";
    case DType::kQ4:
      return "Q4G";
    case DType::kF8E4M3:
      return "F8_E4M3";
    case DType::kMxfp4:
      return "MXFP4";
    case DType::kFp8Block:
      return "FP8B128";
    case DType::kPbf16:
      return "PBF16";
  }
  return "?";
}

bool ParseDType(std::string_view s, DType* out) {
  static constexpr std::pair<std::string_view, DType> kNames[] = {
      {"F32", DType::kF32}, {"F16", DType::kF16}, {"BF16", DType::kBF16},     {"I64", DType::kI64},
      {"I32", DType::kI32}, {"U8", DType::kU8},   {"I8", DType::kI8},         {"BOOL", DType::kBool},
      {"F64", DType::kF64}, {"I16", DType::kI16}, {"F8_E4M3", DType::kF8E4M3}};
  for (auto [name, t] : kNames) {
    if (s == name) {
      *out = t;
      return true;
    }
  }
  return false;
}

size_t WeightBytes(DType t, int64_t rows, int64_t cols) {
  if (IsQuantized(t)) return QuantFormat::Of(t).bytes(rows, cols);
  if (IsBlockScaled(t)) return BlockScaledFormat::Of(t).bytes(rows, cols);
  if (t == DType::kPbf16) return PackedBf16Format::bytes(rows, cols);
  return static_cast<size_t>(rows * cols) * DTypeSize(t);
}

uint16_t F32ToF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  int32_t exp = static_cast<int32_t>((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (((x >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0));
  if (exp >= 0x1f) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t half = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) ++half;
  return static_cast<uint16_t>(half);
}

void ConvertToF32(DType t, const void* src, float* dst, size_t n) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = Bf16ToF32(s[i]);
      return;
    }
    case DType::kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = F16ToF32(s[i]);
      return;
    }
    case DType::kF64: {
      const double* s = static_cast<const double*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    case DType::kI64: {
      const int64_t* s = static_cast<const int64_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    case DType::kI32: {
      const int32_t* s = static_cast<const int32_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    case DType::kF8E4M3: {
      const uint8_t* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = F8E4M3ToF32(s[i]);
      return;
    }
    default:
      for (size_t i = 0; i < n; ++i) dst[i] = NAN;
      return;
  }
}

}  // namespace ef
