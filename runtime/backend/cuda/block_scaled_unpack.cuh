// Device helpers for the block-scaled weight formats (runtime/core/block_scaled_format.h), shared
// by gemv_block_scaled.cu and dequantize_block_scaled.cu (included by .cu files only). Every
// decoded value equals the CPU's DequantizeBlockScaledRow: code value x scale, one fp32 product.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace ef::runtime::cuda {

// MXFP4 blocks of 32 values (one 16-byte chunk, one e8m0 byte); FP8 blocks of 128 x 128 (eight
// 16-byte chunks of a row share a scale). Plain ints: BlockScaledFormat's functions are host code.
inline constexpr int kMxfp4BlockCols = 32;
inline constexpr int kFp8BlockRows = 128, kFp8BlockCols = 128;

// Fills table[0, 16) (shared memory: one entry per bank, so lanes looking up different codes never
// conflict) with the e2m1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6}, bit 3 the sign (8 is -0, as on the
// CPU). Threads 0..15 write; the caller syncs the block before reading.
__device__ __forceinline__ void LoadE2m1Table(float* table) {
  if (threadIdx.x < 16) {
    const unsigned code = threadIdx.x, exp = (code >> 1) & 3u, mant = code & 1u;
    const float mag =
        exp == 0 ? 0.5f * static_cast<float>(mant) : (1.f + 0.5f * mant) * static_cast<float>(1u << (exp - 1));
    table[code] = code & 8u ? -mag : mag;
  }
}

// An e8m0 scale byte as fp32: 2^(s - 127), built from its bits (s = 0 is the subnormal 2^-127).
// 255 (NaN) never reaches a kernel: the loader refuses it.
__device__ __forceinline__ float E8m0ToFloat(unsigned s) { return __uint_as_float(s ? s << 23 : 0x00400000u); }

// The e2m1 values (unscaled) of a 16-byte chunk: value 2k in the low nibble of byte k.
__device__ __forceinline__ void DecodeE2m1Chunk(const uint4& pk, const float* table, float (&out)[32]) {
  const unsigned words[4] = {pk.x, pk.y, pk.z, pk.w};
#pragma unroll
  for (int w = 0; w < 4; ++w)
#pragma unroll
    for (int e = 0; e < 8; ++e) out[8 * w + e] = table[(words[w] >> (4 * e)) & 0xfu];
}

// An e4m3 code as fp32, exactly: its sign and 7 low bits placed in an fp16 at bit 15 and bits 13..7
// give the same exponent and mantissa fields under fp16's bias of 15 instead of 7, that is the
// value times 2^-8 (subnormals included); the fp16 converts exactly and the product by 2^8 is exact.
// (0x7f / 0xff, NaN, would give 480: the loader refuses them.)
__device__ __forceinline__ float E4m3ToFloat(unsigned code) {
  const unsigned short h = static_cast<unsigned short>(((code & 0x80u) << 8) | ((code & 0x7fu) << 7));
  return __half2float(__ushort_as_half(h)) * 256.f;
}

// The scaled values of a 16-byte chunk of e4m3 codes (byte j is value j), as the CPU computes them.
__device__ __forceinline__ void DecodeE4m3Chunk(const uint4& pk, float scale, float (&out)[16]) {
  const unsigned words[4] = {pk.x, pk.y, pk.z, pk.w};
#pragma unroll
  for (int w = 0; w < 4; ++w)
#pragma unroll
    for (int b = 0; b < 4; ++b) out[4 * w + b] = __fmul_rn(E4m3ToFloat((words[w] >> (8 * b)) & 0xffu), scale);
}

}  // namespace ef::runtime::cuda
