// Element types of checkpoint tensors and their conversion to fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace ef {

// kQ8 and kQ4 are this runtime's own group-quantized weight formats (layout in
// runtime/core/quant_format.h, produced by Quantize in runtime/core/quant.h); kPbf16 is its
// lossless packing of bf16 weights (runtime/core/packed_bf16_format.h, PackBf16 in
// runtime/core/packed_bf16.h). kMxfp4 and kFp8Block
// are the block-scaled formats published checkpoints ship (GPT-OSS's MXFP4 experts, DeepSeek-V3's
// 128 x 128 block FP8), held as one block of values and scales (runtime/core/block_scaled_format.h).
// No checkpoint tensor has any of these five types: ParseDType refuses their names. kF8E4M3 is OCP
// FP8 E4M3 ("F8_E4M3", torch.float8_e4m3fn: no infinities, 0x7f/0xff NaN), the element type of a
// block FP8 checkpoint tensor, whose scales are a separate tensor; a weight is never kF8E4M3 (the
// loader packs it with its scales as kFp8Block, or dequantizes it).
enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kI64,
  kI32,
  kU8,
  kI8,
  kBool,
  kF64,
  kI16,
  kQ8,
  kQ4,
  kF8E4M3,
  kMxfp4,
  kFp8Block,
  kPbf16
};

// Bytes per element; 0 for the packed weight formats (kQ8, kQ4, kMxfp4, kFp8Block, kPbf16), whose elements
// take a fraction of a byte or a byte plus a share of their block's scales: size those with
// WeightBytes.
constexpr size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
    case DType::kI16:
      return 2;
    case DType::kI64:
    case DType::kF64:
      return 8;
    case DType::kU8:
    case DType::kI8:
    case DType::kBool:
    case DType::kF8E4M3:
      return 1;
    case DType::kQ8:
    case DType::kQ4:
    case DType::kMxfp4:
    case DType::kFp8Block:
    case DType::kPbf16:
      return 0;
  }
  return 0;
}

// The runtime's group-quantized formats (QuantFormat applies).
constexpr bool IsQuantized(DType t) { return t == DType::kQ8 || t == DType::kQ4; }
// The published block-scaled formats (BlockScaledFormat applies).
constexpr bool IsBlockScaled(DType t) { return t == DType::kMxfp4 || t == DType::kFp8Block; }
// A weight of one of these types is one block of WeightBytes (values, then scales) that only Gemm
// takes; it is dequantized on use.
constexpr bool IsPackedWeight(DType t) { return IsQuantized(t) || IsBlockScaled(t) || t == DType::kPbf16; }

// Bytes of a [rows, cols] weight stored as t: rows * cols * DTypeSize(t), or for the packed formats
// the values and scales of their layout (a multiple of 16 bytes).
size_t WeightBytes(DType t, int64_t rows, int64_t cols);

// The safetensors spelling ("F32", "BF16", ...); "Q8G" / "Q4G" / "MXFP4" / "FP8B128" / "PBF16" for the
// packed weight formats.
const char* DTypeName(DType t);
// Parses a safetensors dtype string; false when unknown (and for the packed formats' names, which
// no checkpoint tensor may claim).
bool ParseDType(std::string_view s, DType* out);
// True for the types weights may have (F32, F16, BF16).
constexpr bool IsFloatWeight(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }
// How many of the n values at x (F32, F16 or BF16) are NaN or infinite, and in *first the index of
// the first of them (-1: none). Arrays past 64 MiB are scanned on up to 16 threads.
int64_t CountNonFinite(DType t, const void* x, int64_t n, int64_t* first);

inline float Bf16ToF32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even; NaN stays NaN.
inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float F16ToF32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t F32ToF16(float f);

// OCP FP8 E4M3 (bias 7, 3 mantissa bits, subnormals, no infinities; S.1111.111 is NaN): every
// value is exact in fp32.
inline float F8E4M3ToF32(uint8_t v) {
  const uint32_t sign = static_cast<uint32_t>(v & 0x80u) << 24;
  const uint32_t exp = (v >> 3) & 0xfu;
  const uint32_t mant = v & 0x7u;
  uint32_t bits;
  if (exp == 0xf && mant == 0x7) {
    bits = sign | 0x7fc00000u;
  } else if (exp == 0) {  // subnormal: mant * 2^-9, exact as a float conversion
    float f = static_cast<float>(mant) * 0x1p-9f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else {
    bits = sign | ((exp - 7 + 127) << 23) | (mant << 20);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Converts n elements of type t at src to fp32.
void ConvertToF32(DType t, const void* src, float* dst, size_t n);

}  // namespace ef
