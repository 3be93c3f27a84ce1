// Sigmoid-gated add (Qwen2-MoE shared expert): dst[r, j] += 1/(1 + exp(-gate_logit[r])) * src[r, j].
// Launch: grid-stride over rows*dim, 256 threads per block.
// Test: tests/gpu/cuda_ops_test.cc (AddSigmoidGated).
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
__global__ void AddSigmoidGatedKernel(const float* src, const float* gate_logit, int64_t rows, int dim, float* dst) {
  const int64_t n = rows * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = 1.0f / (1.0f + expf(-gate_logit[i / dim]));
    dst[i] += g * src[i];
  }
}
}  // namespace

cudaError_t launch_add_sigmoid_gated(const float* src, const float* gate_logit, int64_t rows, int dim, float* dst,
                                     cudaStream_t stream) {
  if (rows <= 0 || dim <= 0) return cudaSuccess;
  AddSigmoidGatedKernel<<<GridFor(rows * dim, 256), 256, 0, stream>>>(src, gate_logit, rows, dim, dst);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
