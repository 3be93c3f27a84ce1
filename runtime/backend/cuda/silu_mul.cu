// SwiGLU combine: out[i] = gate[i] / (1 + exp(-gate[i])) * up[i] (expf, as the CPU reference).
// Launch: grid-stride, 256 threads per block. Test: tests/gpu/cuda_ops_test.cc (SiluMul).
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
}  // namespace

cudaError_t launch_silu_mul(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  SiluMulKernel<<<GridFor(n, 256), 256, 0, stream>>>(gate, up, out, n);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
