// Rotary position embedding, rotate-half convention (HF Llama/Mixtral): for i < head_dim/2,
// (a, b) = (v[i], v[i + half]) -> (a cos - b sin, b cos + a sin) with angle pos * theta^(-2i/d).
// Angles are computed in fp32 with powf/cosf/sinf exactly as the CPU reference does.
// Launch: one block per token row. The row's half = head_dim/2 (cos, sin) pairs depend on the
// position only, so the block computes them once into shared memory (half <= kMaxHalf) and every
// head reuses them; threads then stride over (head, i) pairs. (Computing them per pair put 32x
// the transcendental work of one row on a single block: 18 us for a decode row of 32 heads.)
// Test: tests/gpu/cuda_ops_test.cc (Rope vs CPU at positions up to 4096).
#include <cmath>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
constexpr int kMaxHalf = 256;

__global__ void RopeKernel(float* x, const int32_t* positions, int num_heads, int head_dim, float theta) {
  __shared__ float cs[kMaxHalf], sn[kMaxHalf];
  const int half = head_dim / 2;
  const float pos = static_cast<float>(positions[blockIdx.x]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float inv_freq = 1.0f / powf(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
    const float ang = pos * inv_freq;
    cs[i] = cosf(ang);
    sn[i] = sinf(ang);
  }
  __syncthreads();
  float* row = x + static_cast<int64_t>(blockIdx.x) * num_heads * head_dim;
  for (int j = threadIdx.x; j < num_heads * half; j += blockDim.x) {
    const int h = j / half, i = j % half;
    const float c = cs[i], s = sn[i];
    float* v = row + h * head_dim;
    const float a = v[i], b = v[i + half];
    v[i] = a * c - b * s;
    v[i + half] = b * c + a * s;
  }
}
}  // namespace

cudaError_t launch_rope(float* x, const int32_t* positions, int64_t rows, int num_heads, int head_dim, float theta,
                        cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (head_dim / 2 > kMaxHalf) return cudaErrorInvalidValue;
  RopeKernel<<<static_cast<unsigned>(rows), 128, 0, stream>>>(x, positions, num_heads, head_dim, theta);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
