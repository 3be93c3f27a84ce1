// Bias add after a GEMM: y[r, c] += bias[c] (Qwen2 q/k/v biases), bias of dtype F32/F16/BF16.
// Launch: grid-stride over m*n, 256 threads per block. Test: tests/gpu/cuda_ops_test.cc (Gemm
// with bias).
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
__global__ void AddBiasKernel(float* y, int64_t m, int64_t n, const void* bias, DType dt) {
  const int64_t total = m * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] += LoadAsF32(bias, dt, i % n);
}
}  // namespace

cudaError_t launch_add_bias(float* y, int64_t m, int64_t n, const void* bias, DType bias_dtype, cudaStream_t stream) {
  if (m <= 0 || n <= 0) return cudaSuccess;
  AddBiasKernel<<<GridFor(m * n, 256), 256, 0, stream>>>(y, m, n, bias, bias_dtype);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
