// RMSNorm over rows: out = (x * 1/sqrt(mean(x^2) + eps)) * w, the sum of squares in fp64 as the
// CPU reference does (so the two agree to an ulp or so); used per head for QK-norm too.
// Launch: one block per row (128 threads for short rows, 256 otherwise); block reduction
// through shared memory. out may alias x (each thread rewrites only the elements it read).
// Rows of up to 8 float4 per thread (dim % 4 == 0, 16-byte aligned, dim <= 8192) stay in
// registers: every load of a thread is issued before its first store. (Reading x a second time
// after the reduction, with stores that may alias the next loads, chained 16 memory round trips
// per thread at dim 4096: 12 us for one decode row.)
// launch_add_rms_norm first adds a residual branch into x (x += add, stored, the bits the Add op
// writes) and normalises the sums: the residual add and the next layer's norm in one pass.
// out16, when not null, gets out rounded to bf16 (nearest even, the bits launch_convert_f32 writes):
// the twin the GEMMs after the norm read (Backend::Bf16Twins).
// Test: tests/gpu/cuda_ops_test.cc (RmsNorm vs CPU, hidden-sized and head-sized rows; the twin;
// AddRmsNormIsAddThenRmsNorm).
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
// 1 / sqrt(mean(x^2) + eps) of a row of `dim` values whose sum of squares the kBlock threads of the
// block hold in parts (`ss`): warp sums, then thread 0 adds the warps' in order.
template <int kBlock>
__device__ float BlockInvRms(double ss, int dim, float eps) {
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
  return inv_s;
}

// add != null: x += add first (stored back into x, the bits Add writes), then the norm of the sum.
template <int kBlock>
__global__ void RmsNormKernel(const float* x, const float* add, float* x_out, int dim, const void* w, DType wdt,
                              float eps, float* out, uint16_t* out16) {
  PdlEnter();
  const int64_t at = static_cast<int64_t>(blockIdx.x) * dim;
  const float* xr = add ? x_out + at : x + at;  // with an add, the sums this thread stored below
  float* yr = out + at;
  double ss = 0;
  for (int i = threadIdx.x; i < dim; i += kBlock) {
    float v = x[at + i];
    if (add) x_out[at + i] = v = v + add[at + i];
    ss += static_cast<double>(v) * v;
  }
  const float inv = BlockInvRms<kBlock>(ss, dim, eps);
  uint16_t* y16 = out16 ? out16 + at : nullptr;
  for (int i = threadIdx.x; i < dim; i += kBlock) {
    const float y = (xr[i] * inv) * LoadAsF32(w, wdt, i);
    yr[i] = y;
    if (y16) y16[i] = Bf16Bits(y);
  }
}

template <int kBlock>
__global__ void __launch_bounds__(kBlock)
    RmsNormRegsKernel(const float* x, const float* add, float* x_out, int dim, const void* w, DType wdt, float eps,
                      float* out, uint16_t* out16) {
  PdlEnter();
  constexpr int kMaxVec = 8;
  const int d4 = dim / 4;
  const int64_t at = static_cast<int64_t>(blockIdx.x) * dim;
  const float4* xr = reinterpret_cast<const float4*>(x + at);
  float4* yr = reinterpret_cast<float4*>(out + at);
  float4 v[kMaxVec];
#pragma unroll
  for (int j = 0; j < kMaxVec; ++j)
    if (threadIdx.x + j * kBlock < d4) v[j] = xr[threadIdx.x + j * kBlock];
  if (add) {  // x += add, stored back before the norm of the sums
    float4 a[kMaxVec];
    const float4* ar = reinterpret_cast<const float4*>(add + at);
#pragma unroll
    for (int j = 0; j < kMaxVec; ++j)
      if (threadIdx.x + j * kBlock < d4) a[j] = ar[threadIdx.x + j * kBlock];
#pragma unroll
    for (int j = 0; j < kMaxVec; ++j)
      if (threadIdx.x + j * kBlock < d4) {
        v[j] = make_float4(v[j].x + a[j].x, v[j].y + a[j].y, v[j].z + a[j].z, v[j].w + a[j].w);
        reinterpret_cast<float4*>(x_out + at)[threadIdx.x + j * kBlock] = v[j];
      }
  }
  double ss = 0;
#pragma unroll
  for (int j = 0; j < kMaxVec; ++j)
    if (threadIdx.x + j * kBlock < d4) {
      ss += static_cast<double>(v[j].x) * v[j].x;
      ss += static_cast<double>(v[j].y) * v[j].y;
      ss += static_cast<double>(v[j].z) * v[j].z;
      ss += static_cast<double>(v[j].w) * v[j].w;
    }
  // The weights load while the block reduces.
  float4 g[kMaxVec];
#pragma unroll
  for (int j = 0; j < kMaxVec; ++j) {
    const int e = 4 * (threadIdx.x + j * kBlock);
    if (e < dim)
      g[j] = make_float4(LoadAsF32(w, wdt, e), LoadAsF32(w, wdt, e + 1), LoadAsF32(w, wdt, e + 2),
                         LoadAsF32(w, wdt, e + 3));
  }
  const float inv = BlockInvRms<kBlock>(ss, dim, eps);
  uint16_t* y16 = out16 ? out16 + static_cast<int64_t>(blockIdx.x) * dim : nullptr;
#pragma unroll
  for (int j = 0; j < kMaxVec; ++j)
    if (threadIdx.x + j * kBlock < d4) {
      const float4 y = make_float4((v[j].x * inv) * g[j].x, (v[j].y * inv) * g[j].y, (v[j].z * inv) * g[j].z,
                                   (v[j].w * inv) * g[j].w);
      yr[threadIdx.x + j * kBlock] = y;
      if (y16) StoreBf16x4(y16 + 4 * (threadIdx.x + j * kBlock), y);
    }
}
}  // namespace

namespace {
cudaError_t LaunchRmsNorm(const float* x, const float* add, float* x_out, int64_t rows, int dim, const void* w,
                          DType wdt, float eps, float* out, uint16_t* out16, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  // Rows beyond the 2^31-1 grid limit do not occur: rows are tokens or tokens x heads.
  // (The twin's alignment does not choose the kernel: out's bits do not depend on whether there is one.)
  const auto a = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(add);
  const bool regs = dim % 4 == 0 && a % 16 == 0;
  const dim3 grid(static_cast<unsigned>(rows));
  if (regs && dim <= 1024)
    return LaunchPdl(RmsNormRegsKernel<128>, grid, dim3(128), 0, stream, x, add, x_out, dim, w, wdt, eps, out, out16);
  if (regs && dim <= 256 * 4 * 8)
    return LaunchPdl(RmsNormRegsKernel<256>, grid, dim3(256), 0, stream, x, add, x_out, dim, w, wdt, eps, out, out16);
  if (dim <= 256)
    return LaunchPdl(RmsNormKernel<128>, grid, dim3(128), 0, stream, x, add, x_out, dim, w, wdt, eps, out, out16);
  return LaunchPdl(RmsNormKernel<256>, grid, dim3(256), 0, stream, x, add, x_out, dim, w, wdt, eps, out, out16);
}
}  // namespace

cudaError_t launch_rms_norm(const float* x, int64_t rows, int dim, const void* w, DType wdt, float eps, float* out,
                            uint16_t* out16, cudaStream_t stream) {
  return LaunchRmsNorm(x, nullptr, nullptr, rows, dim, w, wdt, eps, out, out16, stream);
}

cudaError_t launch_add_rms_norm(float* x, const float* add, int64_t rows, int dim, const void* w, DType wdt, float eps,
                                float* out, uint16_t* out16, cudaStream_t stream) {
  if (add == nullptr) return cudaErrorInvalidValue;
  return LaunchRmsNorm(x, add, x, rows, dim, w, wdt, eps, out, out16, stream);
}

}  // namespace ef::runtime::cuda
