// RMSNorm over rows: out = (x * 1/sqrt(mean(x^2) + eps)) * w, the sum of squares in fp64 as the
// CPU reference does (so the two agree to an ulp or so); used per head for QK-norm too.
// Launch: one block per row (128 threads for short rows, 256 otherwise); block reduction
// through shared memory. out may alias x (each thread rewrites only the elements it read).
// Test: tests/gpu/cuda_ops_test.cc (RmsNorm vs CPU, hidden-sized and head-sized rows).
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
template <int kBlock>
__global__ void RmsNormKernel(const float* x, int dim, const void* w, DType wdt, float eps, float* out) {
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * dim;
  float* yr = out + static_cast<int64_t>(blockIdx.x) * dim;
  double ss = 0;
  for (int i = threadIdx.x; i < dim; i += kBlock) ss += static_cast<double>(xr[i]) * xr[i];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  __shared__ double part[kBlock / 32];
  __shared__ float inv_s;
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0;
    for (int i = 0; i < kBlock / 32; ++i) t += part[i];
    inv_s = 1.0f / sqrtf(static_cast<float>(t / dim) + eps);
  }
  __syncthreads();
  const float inv = inv_s;
  for (int i = threadIdx.x; i < dim; i += kBlock) yr[i] = (xr[i] * inv) * LoadAsF32(w, wdt, i);
}
}  // namespace

cudaError_t launch_rms_norm(const float* x, int64_t rows, int dim, const void* w, DType wdt, float eps, float* out,
                            cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  // Rows beyond the 2^31-1 grid limit do not occur: rows are tokens or tokens x heads.
  if (dim <= 256)
    RmsNormKernel<128><<<static_cast<unsigned>(rows), 128, 0, stream>>>(x, dim, w, wdt, eps, out);
  else
    RmsNormKernel<256><<<static_cast<unsigned>(rows), 256, 0, stream>>>(x, dim, w, wdt, eps, out);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
