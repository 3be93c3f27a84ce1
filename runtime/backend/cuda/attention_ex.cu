// General causal attention of one sequence (Backend::AttentionEx, called once per sequence):
// strided q/k/v rows, query/key head size qk_dim and value head size v_dim (MLA's latent form),
// an optional sliding window and per-head sinks. One block per (query row, head): q in shared
// memory; each warp takes keys in turn and reduces its dot product over lanes; the visible scores
// (window of the row) sit in dynamic shared memory; block max and sum (the sink joins both);
// then threads over the value dims accumulate p_t * v[t, d] in key order. Correctness first: it
// reads K/V once per head and keeps all scores of a row in shared memory (up to ~56k keys).
// Test: tests/gpu/cuda_model_ops_test.cc (AttentionEx vs CPU: MLA shapes, window, sinks).
#include <algorithm>
#include <cmath>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
constexpr int kThreads = 256;

__device__ float BlockReduce(float v, float* red, bool is_max) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = is_max ? WarpMax(v) : WarpSum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < kThreads / 32 ? red[lane] : (is_max ? -INFINITY : 0.f);
    w = is_max ? WarpMax(w) : WarpSum(w);
    if (lane == 0) red[0] = w;
  }
  __syncthreads();
  const float r = red[0];
  __syncthreads();
  return r;
}

// The pool row of position t: t, or through the block table of a paged cache.
__device__ __forceinline__ int64_t ExRow(const int32_t* blocks, int shift, int t) {
  return blocks ? (static_cast<int64_t>(blocks[t >> shift]) << shift) | (t & ((1 << shift) - 1)) : t;
}

__global__ void AttentionExKernel(const float* q, const float* k, const float* v, int64_t q_row0, int n_new,
                                  int n_total, const int32_t* blocks, int block_shift, AttentionExShape s, float* out) {
  extern __shared__ float smem[];
  float* qs = smem;                 // [qk_dim]
  float* scores = smem + s.qk_dim;  // [visible]
  __shared__ float red[kThreads / 32];
  const int i = blockIdx.x, h = blockIdx.y;
  const int kvh = h / (s.num_heads / s.num_kv_heads);
  const int last = n_total - n_new + i;
  const int first = s.window > 0 ? max(0, last - s.window + 1) : 0;
  const int visible = last - first + 1;
  const float* qi = q + (q_row0 + i) * s.q_stride + static_cast<int64_t>(h) * s.qk_dim;
  for (int d = threadIdx.x; d < s.qk_dim; d += blockDim.x) qs[d] = qi[d];
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int t = warp; t < visible; t += kThreads / 32) {
    const float* kt = k + ExRow(blocks, block_shift, first + t) * s.k_stride + static_cast<int64_t>(kvh) * s.qk_dim;
    float acc = 0.f;
    for (int d = lane; d < s.qk_dim; d += 32) acc += qs[d] * kt[d];
    acc = WarpSum(acc);
    if (lane == 0) scores[t] = acc * s.scale;
  }
  __syncthreads();
  const float sink = s.sinks ? s.sinks[h] : -INFINITY;
  float mx = sink;
  for (int t = threadIdx.x; t < visible; t += blockDim.x) mx = fmaxf(mx, scores[t]);
  mx = BlockReduce(mx, red, true);
  float sum = 0.f;
  for (int t = threadIdx.x; t < visible; t += blockDim.x) {
    const float e = expf(scores[t] - mx);
    scores[t] = e;
    sum += e;
  }
  sum = BlockReduce(sum, red, false);
  if (s.sinks) sum += expf(sink - mx);
  const float inv = 1.0f / sum;
  float* o = out + (q_row0 + i) * s.out_stride + static_cast<int64_t>(h) * s.v_dim;
  for (int d = threadIdx.x; d < s.v_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int t = 0; t < visible; ++t)
      acc += scores[t] * inv *
             v[ExRow(blocks, block_shift, first + t) * s.v_stride + static_cast<int64_t>(kvh) * s.v_dim + d];
    o[d] = acc;
  }
}
}  // namespace

cudaError_t launch_attention_ex(const float* q, const float* k, const float* v, int64_t q_row, int n_new, int n_total,
                                const int32_t* blocks, int block_shift, const AttentionExShape& shape, float* out,
                                cudaStream_t stream) {
  if (n_new <= 0) return cudaSuccess;
  const int max_visible = shape.window > 0 ? std::min(shape.window, n_total) : n_total;
  const size_t smem = static_cast<size_t>(shape.qk_dim + max_visible) * sizeof(float);
  // The kernel's static red[] counts against the 48 KiB a launch gets without opting in. The opt-in
  // is per device (and cheap): made on every launch that needs it, never cached per process.
  constexpr size_t kStaticSmem = kThreads / 32 * sizeof(float);
  if (smem + kStaticSmem > 48 * 1024) {
    int dev = 0, max_optin = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (smem + kStaticSmem > static_cast<size_t>(max_optin)) return cudaErrorInvalidValue;
    cudaError_t e = cudaFuncSetAttribute(AttentionExKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         max_optin - static_cast<int>(kStaticSmem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(n_new), static_cast<unsigned>(shape.num_heads));
  AttentionExKernel<<<grid, kThreads, smem, stream>>>(q, k, v, q_row, n_new, n_total, blocks, block_shift, shape, out);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
