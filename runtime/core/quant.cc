#include "runtime/core/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/core/thread_pool.h"

namespace ef {
namespace {

// Below this many values one thread quantizes (thread start-up would dominate).
constexpr int64_t kValuesPerThread = int64_t{1} << 20;
constexpr int kMaxThreads = 16;

std::string ShapeName(DType t, int64_t rows, int64_t cols) {
  return std::string(DTypeName(t)) + " weight [" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
}

// The fp16 nearest v that is >= v (v >= 0), so a scale never shrinks the range it must cover.
uint16_t F16RoundUp(float v) {
  uint16_t h = F32ToF16(v);
  if (F16ToF32(h) < v) ++h;  // positive halves order like their bit patterns
  return h;
}

// The fp16 nearest v that is <= v, so a group's minimum stays representable.
uint16_t F16RoundDown(float v) {
  uint16_t h = F32ToF16(v);
  if (F16ToF32(h) > v) {
    if (h & 0x8000u)
      ++h;  // negative: one step away from zero
    else
      h = h == 0 ? 0x8001u : h - 1;
  }
  return h;
}

// Element i of a row of Src (float, or the 16-bit pattern of a bf16/fp16 value) as fp32.
template <DType Src>
float LoadF32(const std::byte* p, int64_t i) {
  if constexpr (Src == DType::kF32) {
    float f;
    std::memcpy(&f, p + i * 4, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, p + i * 2, 2);
    return Src == DType::kBF16 ? Bf16ToF32(h) : F16ToF32(h);
  }
}

// std::nearbyint (round half to even in the default rounding mode) of v, |v| <= 2^22, without the
// library call that saves and restores the floating-point environment: the sum with 1.5 * 2^23 has
// no fraction bits, so it is v rounded to an integer, and the difference is exact. (The build never
// lets the compiler reassociate floats, which would fold this into v; the quantization tests would
// see it.)
inline float RoundHalfEven(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}

void StoreParam(std::byte* p, int64_t i, uint16_t h) { std::memcpy(p + i * 2, &h, 2); }
float LoadParam(const std::byte* p, int64_t i) {
  uint16_t h;
  std::memcpy(&h, p + i * 2, 2);
  return F16ToF32(h);
}

// Quantizes rows [begin, end); the first error names the row and group. The format and the source
// type are compile-time constants so the group's loops unroll; the scan keeps kLanes independent
// minima and maxima (one chain each, not one through the whole group).
template <DType Src, const QuantFormat& F>
Status QuantizeRowsOf(const std::byte* src, int64_t rows, int64_t cols, std::byte* dst, int64_t begin, int64_t end) {
  constexpr int kGroup = F.group;
  constexpr int kLanes = 8;
  static_assert(kGroup % kLanes == 0);
  const int64_t groups = cols / kGroup;
  const size_t esz = DTypeSize(Src);
  std::byte* params = dst + F.params_offset(rows, cols);
  float x[kGroup];
  for (int64_t r = begin; r < end; ++r) {
    const std::byte* row = src + static_cast<size_t>(r * cols) * esz;
    std::byte* vals = dst + r * F.row_value_bytes(cols);
    for (int64_t g = 0; g < groups; ++g) {
      float lo_lane[kLanes], hi_lane[kLanes];
      std::fill(lo_lane, lo_lane + kLanes, INFINITY);
      std::fill(hi_lane, hi_lane + kLanes, -INFINITY);
      uint32_t not_finite = 0;  // min/max alone would skip a NaN
      for (int j = 0; j < kGroup; j += kLanes)
        for (int k = 0; k < kLanes; ++k) {
          const float v = x[j + k] = LoadF32<Src>(row, g * kGroup + j + k);
          uint32_t bits;
          std::memcpy(&bits, &v, 4);
          not_finite |= (bits & 0x7f800000u) == 0x7f800000u;  // exponent all ones: inf or NaN
          lo_lane[k] = v < lo_lane[k] ? v : lo_lane[k];
          hi_lane[k] = v > hi_lane[k] ? v : hi_lane[k];
        }
      if (not_finite)
        return InvalidArgument("row " + std::to_string(r) + " group " + std::to_string(g) +
                               " holds a value that is not finite");
      float lo = *std::min_element(lo_lane, lo_lane + kLanes);
      float hi = *std::max_element(hi_lane, hi_lane + kLanes);
      // Between +0 and -0 the lanes choose by lane; one scan in order keeps the group's first zero
      // (its sign reaches the stored minimum): so do these.
      if (lo == 0.0f) lo = *std::find(x, x + kGroup, 0.0f);
      if (hi == 0.0f) hi = *std::find(x, x + kGroup, 0.0f);
      const auto too_large = [&] {
        return InvalidArgument("row " + std::to_string(r) + " group " + std::to_string(g) + " spans [" +
                               std::to_string(lo) + ", " + std::to_string(hi) + "], too wide for fp16 parameters");
      };
      const int64_t p = (r * groups + g) * F.params_per_group();
      constexpr float qmax = static_cast<float>(F.qmax());
      if constexpr (F.asymmetric) {
        const uint16_t min_h = F16RoundDown(lo);
        const float mn = F16ToF32(min_h);
        const uint16_t scale_h = F16RoundUp((hi - mn) / qmax);
        const float s = F16ToF32(scale_h);
        if (!std::isfinite(mn) || !std::isfinite(s)) return too_large();
        StoreParam(params, p, scale_h);
        StoreParam(params, p + 1, min_h);
        const float inv = s > 0 ? 1.0f / s : 0.0f;
        // Clamped, then rounded: the same integer as rounding first (the bounds are integers).
        const auto q = [&](float v) {
          return static_cast<unsigned>(RoundHalfEven(std::clamp((v - mn) * inv, 0.0f, qmax)));
        };
        for (int j = 0; j < kGroup; j += 2)
          vals[(g * kGroup + j) / 2] = static_cast<std::byte>(q(x[j]) | (q(x[j + 1]) << 4));
      } else {
        const float amax = std::max(-lo, hi);
        const uint16_t scale_h = F16RoundUp(amax / qmax);
        const float s = F16ToF32(scale_h);
        if (!std::isfinite(s)) return too_large();
        StoreParam(params, p, scale_h);
        const float inv = s > 0 ? 1.0f / s : 0.0f;
        for (int j = 0; j < kGroup; ++j) {
          const auto q = static_cast<int8_t>(RoundHalfEven(std::clamp(x[j] * inv, -qmax, qmax)));
          vals[g * kGroup + j] = static_cast<std::byte>(q);
        }
      }
    }
  }
  return Status::Ok();
}

template <const QuantFormat& F>
Status QuantizeRowsIn(DType src_dtype, const std::byte* src, int64_t rows, int64_t cols, std::byte* dst, int64_t begin,
                      int64_t end) {
  switch (src_dtype) {
    case DType::kF32:
      return QuantizeRowsOf<DType::kF32, F>(src, rows, cols, dst, begin, end);
    case DType::kBF16:
      return QuantizeRowsOf<DType::kBF16, F>(src, rows, cols, dst, begin, end);
    default:
      return QuantizeRowsOf<DType::kF16, F>(src, rows, cols, dst, begin, end);
  }
}

Status QuantizeRows(const QuantFormat& f, DType src_dtype, const std::byte* src, int64_t rows, int64_t cols,
                    std::byte* dst, int64_t begin, int64_t end) {
  return f.dtype == DType::kQ4 ? QuantizeRowsIn<kQ4Format>(src_dtype, src, rows, cols, dst, begin, end)
                               : QuantizeRowsIn<kQ8Format>(src_dtype, src, rows, cols, dst, begin, end);
}

}  // namespace

StatusOr<size_t> Quantize(DType target, DType src_dtype, const void* src, int64_t rows, int64_t cols, void* dst,
                          size_t dst_bytes, int max_threads) {
  if (!IsQuantized(target))
    return InvalidArgument(std::string("quantize: target dtype ") + DTypeName(target) + " is not Q8G or Q4G");
  if (!IsFloatWeight(src_dtype))
    return InvalidArgument(std::string("quantize: source dtype ") + DTypeName(src_dtype) + " is not F32, F16 or BF16");
  const QuantFormat f = QuantFormat::Of(target);
  if (rows < 1 || cols < 1 || !f.divides(cols))
    return InvalidArgument("quantize: " + ShapeName(target, rows, cols) + ": cols must be a positive multiple of " +
                           "the group of " + std::to_string(f.group) + " (keep this weight unquantized)");
  const size_t bytes = f.bytes(rows, cols);
  if (dst_bytes < bytes)
    return InvalidArgument("quantize: " + ShapeName(target, rows, cols) + " needs " + std::to_string(bytes) +
                           " bytes, the destination has " + std::to_string(dst_bytes));
  auto* out = static_cast<std::byte*>(dst);
  // Padding is zeroed so that equal weights give equal blocks (byte-compared by tests and caches).
  const int64_t values_end = rows * f.row_value_bytes(cols), params_begin = f.params_offset(rows, cols);
  std::fill(out + values_end, out + params_begin, std::byte{0});
  std::fill(out + params_begin + rows * f.row_param_bytes(cols), out + bytes, std::byte{0});

  const auto* in = static_cast<const std::byte*>(src);
  const int64_t hw = max_threads > 0 ? max_threads : AvailableCpus();
  const int64_t num_threads =
      std::clamp<int64_t>(rows * cols / kValuesPerThread, 1, std::min<int64_t>({hw, kMaxThreads, rows}));
  std::vector<Status> results(static_cast<size_t>(num_threads));
  const int64_t chunk = (rows + num_threads - 1) / num_threads;
  const auto run = [&](int64_t t) {
    const int64_t begin = std::min(rows, t * chunk), end = std::min(rows, begin + chunk);
    results[t] = QuantizeRows(f, src_dtype, in, rows, cols, out, begin, end);
  };
  RunOnThreads(num_threads, run);
  for (Status& s : results)
    if (!s.ok()) return s.Prepend("quantize: " + ShapeName(target, rows, cols));
  return bytes;
}

void DequantizeRow(DType t, const void* src, int64_t rows, int64_t cols, int64_t row, float* dst) {
  const QuantFormat f = QuantFormat::Of(t);
  const auto* base = static_cast<const std::byte*>(src);
  const std::byte* vals = base + row * f.row_value_bytes(cols);
  const int64_t groups = cols / f.group;
  const std::byte* params = base + f.params_offset(rows, cols) + row * f.row_param_bytes(cols);
  if (f.asymmetric) {
    for (int64_t g = 0; g < groups; ++g) {
      const float s = LoadParam(params, 2 * g), mn = LoadParam(params, 2 * g + 1);
      const auto* v = reinterpret_cast<const uint8_t*>(vals) + g * f.group / 2;
      float* o = dst + g * f.group;
      for (int j = 0; j < f.group / 2; ++j) {
        // Rounded after the product and after the sum, as the CUDA kernels do (__fmul_rn,
        // __fadd_rn), so both backends see the same weights.
        const float lo = static_cast<float>(v[j] & 0xf) * s, hi = static_cast<float>(v[j] >> 4) * s;
        o[2 * j] = lo + mn;
        o[2 * j + 1] = hi + mn;
      }
    }
  } else {
    for (int64_t g = 0; g < groups; ++g) {
      const float s = LoadParam(params, g);
      const auto* v = reinterpret_cast<const int8_t*>(vals) + g * f.group;
      float* o = dst + g * f.group;
      for (int j = 0; j < f.group; ++j) o[j] = static_cast<float>(v[j]) * s;
    }
  }
}

Status Dequantize(DType t, const void* src, int64_t rows, int64_t cols, float* dst) {
  if (!IsQuantized(t)) return InvalidArgument(std::string("dequantize: dtype ") + DTypeName(t) + " is not Q8G or Q4G");
  const QuantFormat f = QuantFormat::Of(t);
  if (rows < 0 || cols < 1 || !f.divides(cols))
    return InvalidArgument("dequantize: " + ShapeName(t, rows, cols) + ": cols must be a positive multiple of " +
                           "the group of " + std::to_string(f.group));
  for (int64_t r = 0; r < rows; ++r) DequantizeRow(t, src, rows, cols, r, dst + r * cols);
  return Status::Ok();
}

}  // namespace ef
