// SwiGLU combine: out[i] = gate[i] / (1 + exp(-gate[i])) * up[i] (expf, as the CPU reference).
// launch_silu_mul: fp32. launch_silu_mul_16: 16-bit gate and up (the expert GEMMs' rounded
// products), fp32 math, 16-bit out written over gate; 8 elements per thread in 16-byte loads
// where the pointers and n allow. Launch: grid-stride, 256 threads per block.
// Test: tests/gpu/cuda_ops_test.cc (SiluMul, ExpertMlpsMatchTheCpuExperts).
#include <cuda_fp16.h>

#include <type_traits>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
__global__ void SiluMulKernel(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

template <typename T>
__device__ __forceinline__ float ToF(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat162float(v);
  else
    return __half2float(v);
}
template <typename T>
__device__ __forceinline__ T FromF(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(v);
  else
    return __float2half_rn(v);
}
__device__ __forceinline__ float Silu(float g) { return g / (1.0f + expf(-g)); }

// gate[i] = silu(gate[i]) * up[i], 8 at a time (n8 groups of 8).
template <typename T>
__global__ void SiluMul16x8Kernel(T* gate, const T* up, int64_t n8) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n8;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint4 gv = reinterpret_cast<const uint4*>(gate)[i];
    const uint4 uv = reinterpret_cast<const uint4*>(up)[i];
    T* g = reinterpret_cast<T*>(&gv);
    const T* u = reinterpret_cast<const T*>(&uv);
#pragma unroll
    for (int j = 0; j < 8; ++j) g[j] = FromF<T>(Silu(ToF(g[j])) * ToF(u[j]));
    reinterpret_cast<uint4*>(gate)[i] = gv;
  }
}

template <typename T>
__global__ void SiluMul16Kernel(T* gate, const T* up, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    gate[i] = FromF<T>(Silu(ToF(gate[i])) * ToF(up[i]));
}

template <typename T>
cudaError_t LaunchSiluMul16(T* gate, const T* up, int64_t n, cudaStream_t stream) {
  const bool vec = n % 8 == 0 && (reinterpret_cast<uintptr_t>(gate) | reinterpret_cast<uintptr_t>(up)) % 16 == 0;
  if (vec)
    SiluMul16x8Kernel<T><<<GridFor(n / 8, 256), 256, 0, stream>>>(gate, up, n / 8);
  else
    SiluMul16Kernel<T><<<GridFor(n, 256), 256, 0, stream>>>(gate, up, n);
  return cudaGetLastError();
}
}  // namespace

cudaError_t launch_silu_mul_16(void* gate, const void* up, DType t, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (t == DType::kBF16)
    return LaunchSiluMul16(static_cast<__nv_bfloat16*>(gate), static_cast<const __nv_bfloat16*>(up), n, stream);
  if (t == DType::kF16) return LaunchSiluMul16(static_cast<__half*>(gate), static_cast<const __half*>(up), n, stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_silu_mul(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  SiluMulKernel<<<GridFor(n, 256), 256, 0, stream>>>(gate, up, out, n);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
