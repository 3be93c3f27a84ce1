// Row gather: dst[i, :] = src[idx[i], :] (tokens grouped by expert before the expert GEMMs).
// dst16, when not null, gets dst rounded to bf16 (nearest even): the twin the expert GEMMs read
// (Backend::Bf16Twins). Launch: one block of 256 threads per destination row, float4 when dim allows.
// Test: tests/gpu/cuda_ops_test.cc (GatherRows).
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
__global__ void GatherRowsKernel(const float* src, const int32_t* idx, int dim, float* dst, uint16_t* dst16) {
  const float* s = src + static_cast<int64_t>(idx[blockIdx.x]) * dim;
  float* d = dst + static_cast<int64_t>(blockIdx.x) * dim;
  uint16_t* d16 = dst16 ? dst16 + static_cast<int64_t>(blockIdx.x) * dim : nullptr;
  if ((dim & 3) == 0) {
    const float4* s4 = reinterpret_cast<const float4*>(s);
    float4* d4 = reinterpret_cast<float4*>(d);
    for (int j = threadIdx.x; j < dim / 4; j += blockDim.x) {
      const float4 v = s4[j];
      d4[j] = v;
      if (d16) StoreBf16x4(d16 + 4 * j, v);
    }
  } else {
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
      d[j] = s[j];
      if (d16) d16[j] = Bf16Bits(s[j]);
    }
  }
}
}  // namespace

cudaError_t launch_gather_rows(const float* src, const int32_t* idx, int64_t n, int dim, float* dst, uint16_t* dst16,
                               cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  GatherRowsKernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(src, idx, dim, dst, dst16);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
