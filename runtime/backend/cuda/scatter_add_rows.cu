// Weighted scatter-add (MoE combine): dst[idx[i], :] += scale[i] * src[i, :]. Indices are distinct
// within one call (one expert's tokens), so rows never collide and no atomics are needed; calls
// for different experts are ordered on the stream, which fixes the summation order (the same
// order as the CPU reference: experts ascending).
// Launch: one block of 256 threads per source row.
// Test: tests/gpu/cuda_ops_test.cc (ScatterAddRows).
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
__global__ void ScatterAddRowsKernel(const float* src, const int32_t* idx, const float* scale, int dim, float* dst) {
  const float* s = src + static_cast<int64_t>(blockIdx.x) * dim;
  float* d = dst + static_cast<int64_t>(idx[blockIdx.x]) * dim;
  const float c = scale[blockIdx.x];
  for (int j = threadIdx.x; j < dim; j += blockDim.x) d[j] += c * s[j];
}
}  // namespace

cudaError_t launch_scatter_add_rows(const float* src, const int32_t* idx, const float* scale, int64_t n, int dim,
                                    float* dst, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ScatterAddRowsKernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(src, idx, scale, dim, dst);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
