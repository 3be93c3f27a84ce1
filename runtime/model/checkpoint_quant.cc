#include "runtime/model/checkpoint_quant.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <regex>
#include <sstream>
#include <type_traits>

#include "runtime/core/block_scaled_format.h"
#include "runtime/core/thread_pool.h"

namespace ef::runtime {
namespace {

std::string Shape(const std::vector<int64_t>& shape) {
  TensorView v;
  v.shape = shape;
  return v.ShapeString();
}

std::string Num(double v) {
  std::ostringstream o;
  o << v;
  return o.str();
}

Status CheckOut(DType out, const std::string& what) {
  if (!IsFloatWeight(out)) return InvalidArgument(what + ": cannot dequantize into " + DTypeName(out));
  return Status::Ok();
}

// Stores v as `out` at element i of dst and returns the value stored, read back as fp32.
inline float Store(DType out, void* dst, size_t i, float v) {
  switch (out) {
    case DType::kBF16: {
      const uint16_t h = F32ToBf16(v);
      static_cast<uint16_t*>(dst)[i] = h;
      return Bf16ToF32(h);
    }
    case DType::kF16: {
      const uint16_t h = F32ToF16(v);
      static_cast<uint16_t*>(dst)[i] = h;
      return F16ToF32(h);
    }
    default:
      static_cast<float*>(dst)[i] = v;
      return v;
  }
}

// Store for a dtype known at compile time (the inner loops).
template <DType kOut>
inline float StoreAs(void* dst, size_t i, float v) {
  if constexpr (kOut == DType::kF32) {
    static_cast<float*>(dst)[i] = v;
    return v;
  } else if constexpr (kOut == DType::kBF16) {
    const uint16_t h = F32ToBf16(v);
    static_cast<uint16_t*>(dst)[i] = h;
    return Bf16ToF32(h);
  } else {
    const uint16_t h = F32ToF16(v);
    static_cast<uint16_t*>(dst)[i] = h;
    return F16ToF32(h);
  }
}

// False for infinities and NaN (a product that overflowed, a NaN input).
inline bool Finite(float v) { return std::fabs(v) <= std::numeric_limits<float>::max(); }

// Runs row_ok(r) (true: row r is good) over [0, rows) on the default thread pool, a chunk of rows
// per thread; returns the first bad row, or -1. Each chunk stops at its first bad row, so the
// smallest over chunks is the first bad row of the matrix, whatever the split.
template <typename RowOk>
int64_t FirstBadRow(int64_t rows, int64_t cols, const RowOk& row_ok) {
  std::mutex mu;
  int64_t first_bad = -1;
  ThreadPool::Default().ParallelFor(
      rows,
      [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          if (row_ok(r)) continue;
          std::lock_guard<std::mutex> lock(mu);
          if (first_bad < 0 || r < first_bad) first_bad = r;
          return;
        }
      },
      /*min_chunk=*/std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1)));
  return first_bad;
}

// Calls f(std::integral_constant<DType, out>) for out F32, BF16 or F16.
template <typename F>
void ForOut(DType out, const F& f) {
  switch (out) {
    case DType::kBF16:
      f(std::integral_constant<DType, DType::kBF16>());
      return;
    case DType::kF16:
      f(std::integral_constant<DType, DType::kF16>());
      return;
    default:
      f(std::integral_constant<DType, DType::kF32>());
      return;
  }
}

// One MXFP4 row of `cols` values into dst_row; false when a value is not exact (or not finite)
// in kOut or a scale is NaN.
template <DType kOut>
bool Mxfp4Row(const uint8_t* blocks, const uint8_t* scales, int64_t cols, void* dst_row) {
  static const std::array<float, 256> kE8m0 = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[static_cast<size_t>(i)] = E8m0ToF32(static_cast<uint8_t>(i));
    return t;
  }();
  bool ok = true;
  for (int64_t g = 0; g < cols / kMxfp4Group; ++g) {
    const float scale = kE8m0[scales[g]];  // NaN for 255: every value of the group fails Finite
    const uint8_t* b = blocks + g * kMxfp4GroupBytes;
    const size_t base = static_cast<size_t>(g * kMxfp4Group);
    for (int64_t k = 0; k < kMxfp4GroupBytes; ++k) {
      const float lo = kE2m1Values[b[k] & 0xfu] * scale, hi = kE2m1Values[b[k] >> 4] * scale;
      ok &= StoreAs<kOut>(dst_row, base + static_cast<size_t>(2 * k), lo) == lo && Finite(lo);
      ok &= StoreAs<kOut>(dst_row, base + static_cast<size_t>(2 * k + 1), hi) == hi && Finite(hi);
    }
  }
  return ok;
}

}  // namespace

float E2m1ToF32(uint8_t code) { return kE2m1Values[code & 0xfu]; }

Status CheckMxfp4(const TensorView& blocks, const TensorView& scales, const std::vector<int64_t>& lead, int64_t rows,
                  int64_t cols) {
  std::vector<int64_t> weight = lead;
  weight.insert(weight.end(), {rows, cols});
  if (cols % kMxfp4Group != 0)
    return InvalidArgument("tensor \"" + blocks.name + "\": MXFP4 needs the input dimension of " + Shape(weight) +
                           " to be a multiple of " + std::to_string(kMxfp4Group) + ", the config implies " +
                           std::to_string(cols));
  std::vector<int64_t> want_scales = lead;
  want_scales.insert(want_scales.end(), {rows, cols / kMxfp4Group});
  std::vector<int64_t> want_blocks = want_scales;
  want_blocks.push_back(kMxfp4GroupBytes);
  for (const auto& [t, want] : {std::pair{&blocks, want_blocks}, std::pair{&scales, want_scales}}) {
    if (t->dtype != DType::kU8)
      return InvalidArgument("tensor \"" + t->name + "\" has dtype " + DTypeName(t->dtype) + "; MXFP4 " +
                             (t == &blocks ? "blocks" : "scales") + " must be U8");
    if (t->shape != want)
      return InvalidArgument("tensor \"" + t->name + "\" has shape " + t->ShapeString() + "; MXFP4 " +
                             (t == &blocks ? "blocks" : "scales") + " of a weight " + Shape(weight) + " must be " +
                             Shape(want));
  }
  return Status::Ok();
}

Status DequantizeMxfp4(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t cols, DType out, void* dst,
                       const std::string& what) {
  EF_RETURN_IF_ERROR(CheckOut(out, what));
  const int64_t groups = cols / kMxfp4Group;
  const size_t row_bytes = static_cast<size_t>(cols) * DTypeSize(out);
  int64_t bad = -1;
  ForOut(out, [&](auto kOut) {
    bad = FirstBadRow(rows, cols, [&](int64_t r) {
      return Mxfp4Row<decltype(kOut)::value>(blocks + r * groups * kMxfp4GroupBytes, scales + r * groups, cols,
                                             static_cast<std::byte*>(dst) + static_cast<size_t>(r) * row_bytes);
    });
  });
  if (bad < 0) return Status::Ok();
  // Name the first bad value of that row.
  const int64_t r = bad;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t s = scales[r * groups + g];
    const std::string where = what + ", row " + std::to_string(r) + ", group " + std::to_string(g) + " (scale byte " +
                              std::to_string(s) + ")";
    if (s == 0xff) return InvalidArgument(where + ": the e8m0 scale is NaN");
    const float scale = E8m0ToF32(s);
    const uint8_t* b = blocks + (r * groups + g) * kMxfp4GroupBytes;
    for (int64_t i = 0; i < kMxfp4Group; ++i) {
      const float e2m1 = kE2m1Values[i % 2 ? b[i / 2] >> 4 : b[i / 2] & 0xfu];
      const float v = e2m1 * scale;
      uint32_t slot;  // scratch: only the value read back matters
      if (!Finite(v) || Store(out, &slot, 0, v) != v)
        return InvalidArgument(where + ": value " + std::to_string(i) + " of the group, " + Num(e2m1) + " x 2^" +
                               std::to_string(s - 127) + ", is not representable in " + DTypeName(out));
    }
  }
  return Internal(what + ", row " + std::to_string(r) + ": dequantization failed without a bad value");
}

uint8_t EncodeE2m1(float x) {
  static const float kPos[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  const float a = std::min(std::fabs(x), 6.f);
  int best = 0;
  for (int c = 1; c < 8; ++c) {
    const float d = std::fabs(kPos[c] - a), bd = std::fabs(kPos[best] - a);
    if (d < bd || (d == bd && c % 2 == 0)) best = c;
  }
  return static_cast<uint8_t>(best | (std::signbit(x) && best != 0 ? 8 : 0));
}

void EncodeMxfp4Rows(const float* x, int64_t rows, int64_t cols, uint8_t* blocks, uint8_t* scales) {
  const int64_t groups = cols / kMxfp4Group;
  ThreadPool::Default().ParallelFor(
      rows,
      [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const float* xr = x + r * cols;
          uint8_t* br = blocks + r * groups * kMxfp4GroupBytes;
          uint8_t* sr = scales + r * groups;
          for (int64_t g = 0; g < groups; ++g) {
            float amax = 0.f;
            for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(xr[g * 32 + k]));
            int e = amax > 0.f ? static_cast<int>(std::floor(std::log2(amax))) - 2 : 0;
            e = std::clamp(e, -127, 127);
            sr[g] = static_cast<uint8_t>(e + 127);
            for (int k = 0; k < 16; ++k) {
              const uint8_t lo = EncodeE2m1(std::ldexp(xr[g * 32 + 2 * k], -e));
              const uint8_t hi = EncodeE2m1(std::ldexp(xr[g * 32 + 2 * k + 1], -e));
              br[g * 16 + k] = static_cast<uint8_t>(lo | (hi << 4));
            }
          }
        }
      },
      /*min_chunk=*/std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1)));
}

uint8_t EncodeE4m3(float x) {
  static const std::vector<float> kPos = [] {
    std::vector<float> v;
    for (int c = 0; c < 0x7f; ++c) v.push_back(F8E4M3ToF32(static_cast<uint8_t>(c)));
    return v;
  }();
  const float a = std::min(std::fabs(x), 448.f);
  auto it = std::lower_bound(kPos.begin(), kPos.end(), a);
  int c = static_cast<int>(it - kPos.begin());
  if (c > 0 && (c == static_cast<int>(kPos.size()) || a - kPos[c - 1] < kPos[c] - a ||
                (a - kPos[c - 1] == kPos[c] - a && (c - 1) % 2 == 0)))
    --c;
  return static_cast<uint8_t>(c | (std::signbit(x) && c != 0 ? 0x80 : 0));
}

void EncodeFp8Blocks(const float* w, int64_t rows, int64_t cols, int block_rows, int block_cols, uint8_t* q,
                     float* scale_inv) {
  const int64_t br = block_rows, bc = block_cols;
  const int64_t gr = (rows + br - 1) / br, gc = (cols + bc - 1) / bc;
  ThreadPool::Default().ParallelFor(gr, [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi)
      for (int64_t bj = 0; bj < gc; ++bj) {
        float amax = 0.f;
        for (int64_t r = bi * br; r < std::min(rows, (bi + 1) * br); ++r)
          for (int64_t c = bj * bc; c < std::min(cols, (bj + 1) * bc); ++c)
            amax = std::max(amax, std::fabs(w[r * cols + c]));
        const float s = amax > 0.f ? amax / 448.f : 1.f;
        scale_inv[bi * gc + bj] = s;
        for (int64_t r = bi * br; r < std::min(rows, (bi + 1) * br); ++r)
          for (int64_t c = bj * bc; c < std::min(cols, (bj + 1) * bc); ++c)
            q[r * cols + c] = EncodeE4m3(w[r * cols + c] / s);
      }
  });
}

bool DeepseekV3StoresAsFp8(const std::string& name) {
  static const std::regex kLinear(R"(model\.layers\.\d+\..*(_proj|_proj_with_mqa)\.weight)");
  return std::regex_match(name, kLinear);
}

std::string Fp8ScaleName(const std::string& weight_name) { return weight_name + "_scale_inv"; }

Status CheckFp8(const TensorView& weight, const TensorView& scale_inv, int block_rows, int block_cols) {
  if (weight.dtype != DType::kF8E4M3 || weight.shape.size() != 2)
    return InvalidArgument("tensor \"" + weight.name + "\" (" + DTypeName(weight.dtype) + " " + weight.ShapeString() +
                           ") is not a block FP8 weight: F8_E4M3 of rank 2");
  const int64_t rows = weight.dim(0), cols = weight.dim(1);
  const std::vector<int64_t> grid = {(rows + block_rows - 1) / block_rows, (cols + block_cols - 1) / block_cols};
  if (scale_inv.dtype != DType::kF32)
    return InvalidArgument("tensor \"" + scale_inv.name + "\" has dtype " + DTypeName(scale_inv.dtype) +
                           "; the scales of block FP8 weights must be F32");
  if (scale_inv.shape != grid)
    return InvalidArgument("tensor \"" + scale_inv.name + "\" has shape " + scale_inv.ShapeString() +
                           "; weight_block_size [" + std::to_string(block_rows) + ", " + std::to_string(block_cols) +
                           "] over \"" + weight.name + "\" " + weight.ShapeString() + " needs a grid of " +
                           Shape(grid));
  return Status::Ok();
}

Status DequantizeFp8(const TensorView& weight, const TensorView& scale_inv, int block_rows, int block_cols, DType out,
                     void* dst) {
  EF_RETURN_IF_ERROR(CheckOut(out, "tensor \"" + weight.name + "\""));
  static const std::array<float, 256> kFp8 = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[static_cast<size_t>(i)] = F8E4M3ToF32(static_cast<uint8_t>(i));
    return t;
  }();
  const int64_t rows = weight.dim(0), cols = weight.dim(1);
  const int64_t grid_cols = scale_inv.dim(1);
  const auto* q = reinterpret_cast<const uint8_t*>(weight.data);
  // A copy: a tensor's bytes in a safetensors file need not be 4-byte aligned (the grid is small).
  std::vector<float> scales(static_cast<size_t>(scale_inv.numel()));
  std::memcpy(scales.data(), scale_inv.data, scales.size() * sizeof(float));
  for (size_t i = 0; i < scales.size(); ++i)
    if (!Finite(scales[i]))
      return InvalidArgument("tensor \"" + scale_inv.name + "\": the scale of block [" +
                             std::to_string(static_cast<int64_t>(i) / grid_cols) + ", " +
                             std::to_string(static_cast<int64_t>(i) % grid_cols) + "] is " + Num(scales[i]));
  auto scale = [&](int64_t r, int64_t c) {
    return scales[static_cast<size_t>((r / block_rows) * grid_cols + c / block_cols)];
  };
  auto value = [&](int64_t r, int64_t c) { return kFp8[q[r * cols + c]] * scale(r, c); };
  int64_t bad = -1;
  ForOut(out, [&](auto kOut) {
    bad = FirstBadRow(rows, cols, [&](int64_t r) {
      const float* srow = scales.data() + (r / block_rows) * grid_cols;
      const uint8_t* qrow = q + r * cols;
      const size_t base = static_cast<size_t>(r * cols);
      bool ok = true;
      for (int64_t c0 = 0; c0 < cols; c0 += block_cols) {  // one scale per block of columns
        const float sc = srow[c0 / block_cols];
        for (int64_t c = c0; c < std::min(cols, c0 + block_cols); ++c)
          ok &= Finite(StoreAs<decltype(kOut)::value>(dst, base + static_cast<size_t>(c), kFp8[qrow[c]] * sc));
      }
      return ok;
    });
  });
  if (bad < 0) return Status::Ok();
  // Name the first bad value of that row.
  const int64_t r = bad;
  auto at = [&](int64_t c, const char* what) {
    std::ostringstream o;
    o << "tensor \"" << weight.name << "\": the " << what << " at [" << r << ", " << c << "]";
    return o.str();
  };
  for (int64_t c = 0; c < cols; ++c) {
    const uint8_t code = q[r * cols + c];
    if ((code & 0x7fu) == 0x7fu) return InvalidArgument(at(c, "FP8 code") + " is NaN");
    const float v = value(r, c);
    if (!Finite(v))
      return InvalidArgument(at(c, "value") + " (" + Num(kFp8[code]) + " x scale " + Num(scale(r, c)) +
                             ") is out of range of fp32");
    uint32_t slot;
    if (!Finite(Store(out, &slot, 0, v)))
      return InvalidArgument(at(c, "value") + " (" + Num(v) + ") is out of range of " + DTypeName(out));
  }
  return Internal("tensor \"" + weight.name + "\", row " + std::to_string(r) +
                  ": dequantization failed without a bad value");
}

}  // namespace ef::runtime
