// Device helpers for the quantized weight formats (runtime/core/quant_format.h), shared by
// gemv_quant.cu and dequantize.cu (included by .cu files only). The formats travel as plain ints
// (bits, group): QuantFormat's constexpr functions are host functions to nvcc.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace ef::runtime::cuda {

// Values in one 16-byte chunk of a quantized row.
template <int kBits>
inline constexpr int kQuantChunkValues = 128 / kBits;

// The parameters of group g of a row whose parameter entries start at `params` (16-bit aligned;
// 32-bit for the asymmetric {scale, min} pairs): fp16 scale, and the minimum when asymmetric.
template <bool kAsym>
__device__ __forceinline__ void LoadQuantParams(const void* params, int64_t g, float& scale, float& min) {
  if constexpr (kAsym) {
    const unsigned p = __ldg(static_cast<const unsigned*>(params) + g);  // scale at the lower address
    scale = __half2float(__ushort_as_half(static_cast<unsigned short>(p & 0xffffu)));
    min = __half2float(__ushort_as_half(static_cast<unsigned short>(p >> 16)));
  } else {
    scale = __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(params) + g)));
    min = 0.f;
  }
}

// Dequantizes one 16-byte chunk: int8 q * scale (kBits 8) or uint4 q * scale + min (kBits 4), each
// product and sum rounded on its own (no FMA) so that the values equal the CPU's DequantizeRow.
// Integers become floats by the exponent trick: 2^23 + u has u in its mantissa, one byte permute
// or mask instead of an int-to-float conversion.
template <int kBits>
__device__ __forceinline__ void DequantChunk(const uint4& pk, float scale, float min, float (&out)[128 / kBits]) {
  const unsigned words[4] = {pk.x, pk.y, pk.z, pk.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (kBits == 8) {
      const unsigned u = words[w] ^ 0x80808080u;  // q + 128 as unsigned bytes
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        // bytes {u.b, 0, 0, 0x4b}: the float 2^23 + q + 128
        const float q = __uint_as_float(__byte_perm(u, 0x4b000000u, 0x7540 + b)) - 8388736.f;
        out[4 * w + b] = __fmul_rn(q, scale);
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float q = __uint_as_float(((words[w] >> (4 * e)) & 0xfu) | 0x4b000000u) - 8388608.f;
        out[8 * w + e] = __fadd_rn(__fmul_rn(q, scale), min);
      }
    }
  }
}

}  // namespace ef::runtime::cuda
