// Skinny GEMM for decode: y[m, n] = x[m, k] . w[n, k]^T (+ y) for m <= 8 rows (the backend uses it
// for m <= kGemvMaxRows, where it beats cuBLAS) of fp32
// activations against BF16/F16 weights, fp32 accumulation. Decode is bound by streaming the
// weights once, so each warp owns one weight row, reads it with 16-byte loads (8 elements, several
// in flight per lane) and dots it with all m activation rows (which stay in L1); a shuffle
// reduction finishes the row. Activations stay fp32 (no bf16 rounding as on the cuBLAS path).
// Requires k % 8 == 0 and 16-byte aligned rows (the caller falls back to cuBLAS otherwise).
// Launch: ceil(n / 8) blocks of 8 warps. Test: tests/gpu/cuda_ops_test.cc (GemmBf16, m = 1..8).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
constexpr int kWarps = 8;

template <bool kBf16>
__device__ __forceinline__ void Unpack(uint32_t word, float& lo, float& hi) {
  if constexpr (kBf16) {
    lo = __uint_as_float(word << 16);
    hi = __uint_as_float(word & 0xffff0000u);
  } else {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&word));
    lo = f.x;
    hi = f.y;
  }
}

template <int kM, bool kBf16>
__global__ void __launch_bounds__(kWarps * 32) GemvKernel(const float* __restrict__ x, const void* __restrict__ w,
                                                          float* __restrict__ y, int n, int k, bool accumulate) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * kWarps + warp;
  if (row >= n) return;
  const uint4* wr = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(w) + static_cast<int64_t>(row) * k);
  const int k8 = k / 8;
  float acc[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) acc[m] = 0.f;
#pragma unroll 4
  for (int i = lane; i < k8; i += 32) {
    const uint4 pk = __ldg(wr + i);
    float wf[8];
    Unpack<kBf16>(pk.x, wf[0], wf[1]);
    Unpack<kBf16>(pk.y, wf[2], wf[3]);
    Unpack<kBf16>(pk.z, wf[4], wf[5]);
    Unpack<kBf16>(pk.w, wf[6], wf[7]);
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      const float4* xr = reinterpret_cast<const float4*>(x + static_cast<int64_t>(m) * k) + 2 * i;
      const float4 a = xr[0], b = xr[1];
      acc[m] +=
          a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] + b.y * wf[5] + b.z * wf[6] + b.w * wf[7];
    }
  }
#pragma unroll
  for (int m = 0; m < kM; ++m) acc[m] = WarpSum(acc[m]);
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      float* dst = y + static_cast<int64_t>(m) * n + row;
      *dst = accumulate ? *dst + acc[m] : acc[m];
    }
  }
}

template <bool kBf16>
cudaError_t Dispatch(const float* x, int m, const void* w, float* y, int n, int k, bool acc, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>((n + kWarps - 1) / kWarps);
  switch (m) {
#define EF_GEMV_CASE(M)                                                    \
  case M:                                                                  \
    GemvKernel<M, kBf16><<<grid, kWarps * 32, 0, s>>>(x, w, y, n, k, acc); \
    break;
    EF_GEMV_CASE(1)
    EF_GEMV_CASE(2)
    EF_GEMV_CASE(3)
    EF_GEMV_CASE(4)
    EF_GEMV_CASE(5)
    EF_GEMV_CASE(6)
    EF_GEMV_CASE(7)
    EF_GEMV_CASE(8)
#undef EF_GEMV_CASE
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
}  // namespace

bool gemv_supported(int64_t m, int64_t k, DType wdt, const void* x, const void* w) {
  return m >= 1 && m <= kGemvMaxRows && (wdt == DType::kBF16 || wdt == DType::kF16) && k % 8 == 0 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

cudaError_t launch_gemv(const float* x, int64_t m, const void* w, DType wdt, int64_t n, int64_t k, float* y,
                        bool accumulate, cudaStream_t stream) {
  if (!gemv_supported(m, k, wdt, x, w)) return cudaErrorInvalidValue;
  if (wdt == DType::kBF16)
    return Dispatch<true>(x, static_cast<int>(m), w, y, static_cast<int>(n), static_cast<int>(k), accumulate, stream);
  return Dispatch<false>(x, static_cast<int>(m), w, y, static_cast<int>(n), static_cast<int>(k), accumulate, stream);
}

}  // namespace ef::runtime::cuda
