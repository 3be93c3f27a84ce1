// Table-driven rotary embedding (Backend::RopeTable): for each row r, head h and i < rot_dim/2,
// the pair (a, b) = (v[i], v[i + rot_dim/2]) (rotate-half) or (v[2i], v[2i+1]) (interleaved) of
// v = x + r * row_stride + h * head_stride + offset becomes (a c - b s, b c + a s) with
// c = cos(pos * inv_freq[i]) * scale, s = sin(...) * scale, all fp32 as the CPU reference.
// Launch: one block per row; the row's rot_dim/2 (c, s) pairs are computed once into shared
// memory (rot_dim/2 <= kMaxHalf) and reused by every head; threads stride over (head, i). Test:
// tests/gpu/cuda_model_ops_test.cc.
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
constexpr int kMaxHalf = 256;

__global__ void RopeTableKernel(float* x, const int32_t* positions, int num_heads, int rot_dim, int64_t row_stride,
                                int head_stride, int offset, const float* inv_freq, float scale, bool interleaved) {
  __shared__ float cs[kMaxHalf], sn[kMaxHalf];
  const int half = rot_dim / 2;
  const float pos = static_cast<float>(positions[blockIdx.x]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float ang = pos * inv_freq[i];
    cs[i] = cosf(ang) * scale;
    sn[i] = sinf(ang) * scale;
  }
  __syncthreads();
  float* row = x + static_cast<int64_t>(blockIdx.x) * row_stride + offset;
  for (int j = threadIdx.x; j < num_heads * half; j += blockDim.x) {
    const int h = j / half, i = j % half;
    const float c = cs[i], s = sn[i];
    float* v = row + static_cast<int64_t>(h) * head_stride;
    const int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    const float a = v[ia], b = v[ib];
    v[ia] = a * c - b * s;
    v[ib] = b * c + a * s;
  }
}
}  // namespace

cudaError_t launch_rope_table(float* x, const int32_t* positions, int64_t rows, int num_heads, int rot_dim,
                              int64_t row_stride, int head_stride, int offset, const float* inv_freq, float scale,
                              bool interleaved, cudaStream_t stream) {
  if (rows <= 0 || num_heads <= 0 || rot_dim <= 0) return cudaSuccess;
  if (rot_dim / 2 > kMaxHalf) return cudaErrorInvalidValue;
  RopeTableKernel<<<static_cast<unsigned>(rows), 128, 0, stream>>>(x, positions, num_heads, rot_dim, row_stride,
                                                                   head_stride, offset, inv_freq, scale, interleaved);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
