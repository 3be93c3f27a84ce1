// Residual add: y[i] += x[i]. Launch: grid-stride, 256 threads per block.
// Test: tests/gpu/cuda_ops_test.cc (Add).
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
__global__ void AddKernel(float* y, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] += x[i];
}
}  // namespace

cudaError_t launch_add(float* y, const float* x, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  AddKernel<<<GridFor(n, 256), 256, 0, stream>>>(y, x, n);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
