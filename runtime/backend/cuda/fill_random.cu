// Synthetic weights on the device: dst[i] = scale * u with u uniform in [-1, 1) from a
// splitmix64 hash of (seed, i), so a benchmark can make gigabytes of weights without a host copy
// and the values depend only on (seed, i), not on the launch shape.
// Launch: grid-stride, 256 threads per block, capped grid. Test: exercised by ef_decode_bench
// and tests/gpu/cuda_backend_test.cc (range and determinism).
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
__device__ __forceinline__ float HashUniform(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f;  // 24 random bits
}

__global__ void FillRandomKernel(void* dst, DType dt, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = scale * HashUniform(seed, static_cast<uint64_t>(i));
    if (dt == DType::kBF16)
      static_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(v);
    else if (dt == DType::kF16)
      static_cast<__half*>(dst)[i] = __float2half_rn(v);
    else
      static_cast<float*>(dst)[i] = v;
  }
}
}  // namespace

cudaError_t launch_fill_random(void* dst, DType dtype, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (dtype != DType::kF32 && dtype != DType::kF16 && dtype != DType::kBF16) return cudaErrorInvalidValue;
  const unsigned grid = GridFor(n, 256) > 132 * 64 ? 132 * 64 : GridFor(n, 256);
  FillRandomKernel<<<grid, 256, 0, stream>>>(dst, dtype, n, seed, scale);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
