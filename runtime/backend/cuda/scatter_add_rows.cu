// Weighted scatter-add (MoE combine): dst[idx[i], :] += scale[i] * src[i, :]. Indices are distinct
// within one call (one expert's tokens), so rows never collide and no atomics are needed; calls
// for different experts are ordered on the stream, which fixes the summation order (the same
// order as the CPU reference: experts ascending).
// Launch: one block of 256 threads per source row.
//
// CombineRows: the same sums for all experts in one launch, one block per destination row (token):
// each thread keeps its column's running value in a register and adds the token's k terms in the
// order pos gives (ascending expert), each as `d += c * s` (one fused multiply-add, as
// ScatterAddRows' statement compiles): the bits of ScatterAddRows called once per expert.
// Test: tests/gpu/cuda_ops_test.cc (ScatterAddRows, CombineRowsIsTheScatterAddsInExpertOrder).
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

__global__ void CombineRowsKernel(const float* src, const int32_t* pos, const float* scale, int k, int dim,
                                  float* dst) {
  float* d = dst + static_cast<int64_t>(blockIdx.x) * dim;
  const int32_t* p = pos + static_cast<int64_t>(blockIdx.x) * k;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float acc = d[i];
    for (int j = 0; j < k; ++j) {
      const int64_t r = p[j];
      acc += scale[r] * src[r * dim + i];
    }
    d[i] = acc;
  }
}
}  // namespace

cudaError_t launch_combine_rows(const float* src, const int32_t* pos, const float* scale, int64_t tokens, int k,
                                int dim, float* dst, cudaStream_t stream) {
  if (tokens <= 0 || k <= 0) return cudaSuccess;
  if (tokens > 0x7fffffff) return cudaErrorInvalidValue;
  CombineRowsKernel<<<static_cast<unsigned>(tokens), 256, 0, stream>>>(src, pos, scale, k, dim, dst);
  return cudaGetLastError();
}

cudaError_t launch_scatter_add_rows(const float* src, const int32_t* idx, const float* scale, int64_t n, int dim,
                                    float* dst, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ScatterAddRowsKernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(src, idx, scale, dim, dst);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
