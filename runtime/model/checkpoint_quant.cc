#include "runtime/model/checkpoint_quant.h"

#include <array>
#include <cmath>
#include <cstring>
#include <sstream>

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

constexpr std::array<float, 16> kE2m1 = {0.f,  0.5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                                         -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

}  // namespace

float E2m1ToF32(uint8_t code) { return kE2m1[code & 0xfu]; }

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
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t s = scales[r * groups + g];
      auto where = [&] {
        return what + ", row " + std::to_string(r) + ", group " + std::to_string(g) + " (scale byte " +
               std::to_string(s) + ")";
      };
      if (s == 0xff) return InvalidArgument(where() + ": the e8m0 scale is NaN");
      // 2^(s - 127) is an fp32 (subnormal for s = 0), and an e2m1 value has at most two
      // significant bits, so the product is exact unless it overflows (s >= 253).
      const float scale = std::ldexp(1.f, static_cast<int>(s) - 127);
      const uint8_t* b = blocks + (r * groups + g) * kMxfp4GroupBytes;
      const size_t base = static_cast<size_t>(r * cols + g * kMxfp4Group);
      for (int64_t k = 0; k < kMxfp4GroupBytes; ++k) {
        for (int half = 0; half < 2; ++half) {
          const float e2m1 = kE2m1[half ? b[k] >> 4 : b[k] & 0xfu];
          const float v = e2m1 * scale;
          if (!std::isfinite(v) || Store(out, dst, base + static_cast<size_t>(2 * k + half), v) != v)
            return InvalidArgument(where() + ": value " + std::to_string(2 * k + half) + " of the group, " + Num(e2m1) +
                                   " x 2^" + std::to_string(s - 127) + ", is not representable in " + DTypeName(out));
        }
      }
    }
  }
  return Status::Ok();
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
  const float* s = scales.data();
  for (int64_t i = 0; i < scale_inv.numel(); ++i)
    if (!std::isfinite(s[i]))
      return InvalidArgument("tensor \"" + scale_inv.name + "\": the scale of block [" + std::to_string(i / grid_cols) +
                             ", " + std::to_string(i % grid_cols) + "] is " + Num(s[i]));
  for (int64_t r = 0; r < rows; ++r) {
    const float* srow = s + (r / block_rows) * grid_cols;
    for (int64_t c = 0; c < cols; ++c) {
      const size_t i = static_cast<size_t>(r * cols + c);
      const float v = kFp8[q[i]] * srow[c / block_cols];
      if (!std::isfinite(v)) {
        if ((q[i] & 0x7fu) == 0x7fu)
          return InvalidArgument("tensor \"" + weight.name + "\": the FP8 code at [" + std::to_string(r) + ", " +
                                 std::to_string(c) + "] is NaN");
        return InvalidArgument("tensor \"" + weight.name + "\": the value at [" + std::to_string(r) + ", " +
                               std::to_string(c) + "] (" + Num(kFp8[q[i]]) + " x scale " + Num(srow[c / block_cols]) +
                               ") is out of range of fp32");
      }
      if (!std::isfinite(Store(out, dst, i, v)))
        return InvalidArgument("tensor \"" + weight.name + "\": the value at [" + std::to_string(r) + ", " +
                               std::to_string(c) + "] (" + Num(v) + ") is out of range of " + DTypeName(out));
    }
  }
  return Status::Ok();
}

}  // namespace ef::runtime
