// Clamp in place: x[i] = min(max(x[i], -c), c) (OLMoE clip_qkv). Launch: grid-stride, 256
// threads per block. Test: tests/gpu/cuda_ops_test.cc (Clamp).
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
__global__ void ClampKernel(float* x, int64_t n, float c) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = fminf(fmaxf(x[i], -c), c);
}
}  // namespace

cudaError_t launch_clamp(float* x, int64_t n, float c, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ClampKernel<<<GridFor(n, 256), 256, 0, stream>>>(x, n, c);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
