// Device helpers shared by the kernels of this folder (included by .cu files only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "runtime/core/dtype.h"

namespace ef::runtime::cuda {

// Element i of a F32/F16/BF16 array as fp32.
__device__ __forceinline__ float LoadAsF32(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// Two floats as a bf16 pair (nearest even), lo at the lower address: one 32-bit word of a store.
__device__ __forceinline__ unsigned PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&v);
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The end of a split-K GEMV row (gemv_quant.cu, gemv_block_scaled.cu): `acc` holds lane partial
// sums of kM output rows for weight row `row`, computed by warp `warp` of a block of kWarps warps
// in which kSplit consecutive warps share a row (`part` = warp % kSplit). Each warp reduces by
// shuffles; with a split, the row's partials are added in warp order through shared memory
// (a fixed order, independent of kM). Every warp of the block must call it (it may hold a barrier).
template <int kWarps, int kM, int kSplit>
__device__ __forceinline__ void StoreGemvRow(float (&acc)[kM], int warp, int lane, int part, int row, bool valid,
                                             float* __restrict__ y, int n, bool accumulate) {
#pragma unroll
  for (int m = 0; m < kM; ++m) acc[m] = WarpSum(acc[m]);
  if constexpr (kSplit == 1) {
    if (valid && lane == 0) {
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        float* dst = y + static_cast<int64_t>(m) * n + row;
        *dst = accumulate ? *dst + acc[m] : acc[m];
      }
    }
  } else {
    __shared__ float partial[kWarps][kM];
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < kM; ++m) partial[warp][m] = acc[m];
    }
    __syncthreads();
    // Lane m of the row's first warp adds the partials in warp order.
    if (valid && part == 0 && lane < kM) {
      float s = partial[warp][lane];
#pragma unroll
      for (int p = 1; p < kSplit; ++p) s += partial[warp + p][lane];
      float* dst = y + static_cast<int64_t>(lane) * n + row;
      *dst = accumulate ? *dst + s : s;
    }
  }
}

inline unsigned GridFor(int64_t n, int block) {
  int64_t g = (n + block - 1) / block;
  return static_cast<unsigned>(g < 1 ? 1 : (g > 65535 * 16 ? 65535 * 16 : g));
}

}  // namespace ef::runtime::cuda
