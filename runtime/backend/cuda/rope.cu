// Rotary position embedding, rotate-half convention (HF Llama/Mixtral): for i < head_dim/2,
// (a, b) = (v[i], v[i + half]) -> (a cos - b sin, b cos + a sin) with angle pos * theta^(-2i/d).
// Angles are computed in fp32 with powf/cosf/sinf exactly as the CPU reference does.
// Launch: grid (rows, ceil(heads / kHeadsPerBlock)), where heads are the query heads followed by
// the key heads when both are given (launch_rope_qk: q and k of a layer in one launch). A block
// computes its row's half = head_dim/2 (cos, sin) pairs once into shared memory (half <= kMaxHalf)
// and rotates up to kHeadsPerBlock heads, one (head, i) pair per thread. One block per row with
// threads striding over all heads was 11.7 us for a decode row of 32 heads: each thread's pairs
// were read and written one after another (the stores may alias the next loads), 16 memory
// round trips in a chain; computing the angles per pair was 18 us.
// Test: tests/gpu/cuda_ops_test.cc (Rope and RopeQK vs CPU at positions up to 4096).
#include <algorithm>
#include <cmath>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
constexpr int kMaxHalf = 256;
constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    RopeKernel(float* q, int q_heads, float* k, int k_heads, const int32_t* positions, int head_dim, float theta,
               int heads_per_block) {
  PdlEnter();
  __shared__ float cs[kMaxHalf], sn[kMaxHalf];
  const int half = head_dim / 2;
  RopeAngles(static_cast<float>(positions[blockIdx.x]), head_dim, theta, cs, sn);
  __syncthreads();
  const int first = blockIdx.y * heads_per_block;
  const int last = min(first + heads_per_block, q_heads + k_heads);
  for (int j = threadIdx.x; j < (last - first) * half; j += blockDim.x) {
    const int h = first + j / half, i = j % half;
    float* v = h < q_heads ? q + (static_cast<int64_t>(blockIdx.x) * q_heads + h) * head_dim
                           : k + (static_cast<int64_t>(blockIdx.x) * k_heads + (h - q_heads)) * head_dim;
    const float c = cs[i], s = sn[i];
    const float2 r = RopeRotate(v[i], v[i + half], c, s);
    v[i] = r.x;
    v[i + half] = r.y;
  }
}

cudaError_t LaunchRope(float* q, int q_heads, float* k, int k_heads, const int32_t* positions, int64_t rows,
                       int head_dim, float theta, cudaStream_t stream) {
  if (rows <= 0 || q_heads + k_heads <= 0) return cudaSuccess;
  const int half = head_dim / 2;
  if (half > kMaxHalf || half < 1 || rows > 0x7fffffff) return cudaErrorInvalidValue;
  const int heads_per_block = std::max(1, kThreads / half);
  const unsigned blocks_y = static_cast<unsigned>((q_heads + k_heads + heads_per_block - 1) / heads_per_block);
  if (blocks_y > 65535) return cudaErrorInvalidValue;
  return LaunchPdl(RopeKernel, dim3(static_cast<unsigned>(rows), blocks_y), dim3(kThreads), 0, stream, q, q_heads, k,
                   k_heads, positions, head_dim, theta, heads_per_block);
}
}  // namespace

cudaError_t launch_rope(float* x, const int32_t* positions, int64_t rows, int num_heads, int head_dim, float theta,
                        cudaStream_t stream) {
  return LaunchRope(x, num_heads, nullptr, 0, positions, rows, head_dim, theta, stream);
}

cudaError_t launch_rope_qk(float* q, float* k, const int32_t* positions, int64_t rows, int num_heads, int num_kv_heads,
                           int head_dim, float theta, cudaStream_t stream) {
  return LaunchRope(q, num_heads, k, num_kv_heads, positions, rows, head_dim, theta, stream);
}

}  // namespace ef::runtime::cuda
