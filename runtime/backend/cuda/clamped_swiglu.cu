// GPT-OSS's expert activation (Backend::ClampedSwiGlu): g = min(gate, limit),
// u = clamp(up, -limit, limit), out = (u + 1) * g / (1 + exp(-alpha g)) (expf, as the CPU
// reference). Launch: grid-stride, 256 threads per block. Test: tests/gpu/cuda_model_ops_test.cc.
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
__global__ void ClampedSwiGluKernel(const float* gate, const float* up, float* out, int64_t n, float alpha,
                                    float limit) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = fminf(gate[i], limit);
    const float u = fminf(fmaxf(up[i], -limit), limit);
    out[i] = (u + 1.0f) * (g / (1.0f + expf(-alpha * g)));
  }
}
}  // namespace

cudaError_t launch_clamped_swiglu(const float* gate, const float* up, float* out, int64_t n, float alpha, float limit,
                                  cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ClampedSwiGluKernel<<<GridFor(n, 256), 256, 0, stream>>>(gate, up, out, n, alpha, limit);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
