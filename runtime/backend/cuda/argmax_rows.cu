// Greedy sampling on the device (Backend::ArgMaxRows): out[r] = the first index of the maximum of
// row r, NaN never winning, 0 for a row without a number (runtime::ArgMax's contract), so a greedy
// step copies R token ids to the host instead of R x vocab logits.
// Launch: one block of 512 threads per row; float4 loads where the row allows.
// Test: tests/gpu/cuda_ops_test.cc (ArgMaxRows against runtime::ArgMax).
#include <climits>
#include <cmath>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {

constexpr int kThreads = 512;

// Keeps (v, i) if it beats (best, at): larger, or equal at a lower index. NaN compares false.
__device__ __forceinline__ void Take(float v, int i, float* best, int* at) {
  if (v > *best || (v == *best && i < *at)) {
    *best = v;
    *at = i;
  }
}

__global__ void __launch_bounds__(kThreads)
    ArgMaxRowsKernel(const float* __restrict__ x, int cols, int32_t* __restrict__ out) {
  PdlEnter();
  const float* row = x + static_cast<int64_t>(blockIdx.x) * cols;
  float best = -INFINITY;
  int at = INT_MAX;
  if ((cols & 3) == 0 && (reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const float4* r4 = reinterpret_cast<const float4*>(row);
    for (int j = threadIdx.x; j < cols / 4; j += kThreads) {
      const float4 v = r4[j];
      Take(v.x, 4 * j, &best, &at);
      Take(v.y, 4 * j + 1, &best, &at);
      Take(v.z, 4 * j + 2, &best, &at);
      Take(v.w, 4 * j + 3, &best, &at);
    }
  } else {
    for (int j = threadIdx.x; j < cols; j += kThreads) Take(row[j], j, &best, &at);
  }
  for (int o = 16; o > 0; o >>= 1)
    Take(__shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, at, o), &best, &at);
  __shared__ float sb[kThreads / 32];
  __shared__ int sa[kThreads / 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    sb[warp] = best;
    sa[warp] = at;
  }
  __syncthreads();
  if (warp != 0) return;
  best = lane < kThreads / 32 ? sb[lane] : -INFINITY;
  at = lane < kThreads / 32 ? sa[lane] : INT_MAX;
  for (int o = 16; o > 0; o >>= 1)
    Take(__shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, at, o), &best, &at);
  if (lane == 0) out[blockIdx.x] = at == INT_MAX ? 0 : at;
}

}  // namespace

cudaError_t launch_argmax_rows(const float* x, int64_t rows, int64_t cols, int32_t* out, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (cols <= 0 || cols >= INT_MAX || rows > 0x7fffffff) return cudaErrorInvalidValue;
  return LaunchPdl(ArgMaxRowsKernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, stream, x,
                   static_cast<int>(cols), out);
}

}  // namespace ef::runtime::cuda
