// Causal attention with grouped-query heads over one sequence's KV cache, tiled with an online
// (streaming) softmax; the same kernel serves prefill (n_new = prompt) and decode (n_new small).
//
// Algorithm: the query rows of one KV head are (query i, head g of the group), i-major, so one
// block shares each K/V tile among the `group` heads that read it. A block takes kRows of those
// rows; warp w owns rows w, w + kWarps, ... (so decode's few rows spread over the warps), keeping the running max m,
// the running sum l and the output accumulator (head_dim/32 floats per lane) in registers. Per tile of kTile keys
// (staged in shared memory, K padded by one float per row against bank conflicts) lane j scores key j, the warp reduces
// max and sum with shuffles, rescales by exp(m_old - m_new) and accumulates p_j * V[j]. Keys past offset + i are masked
// (causal). Decode has few rows, so the key range is split over gridDim.z (flash-decoding): each split writes its
// unnormalised (acc, m, l) to the workspace and a second kernel merges the splits.
//
// Launch: grid (ceil(n_new * group / kRows), num_kv_heads, num_splits), kWarps * 32 threads;
// static shared memory <= 41 KiB. head_dim <= 256.
// Test: tests/gpu/cuda_ops_test.cc (Attention vs CPU: prefill, decode with splits, GQA groups
// 1/4/8, head_dim 16/64/128).
#include <cmath>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
constexpr int kWarps = 4;

template <int kMaxD, int kTile, int kRows>
__global__ void __launch_bounds__(kWarps * 32)
    AttentionKernel(const float* __restrict__ q, int n_new, const float* __restrict__ k, const float* __restrict__ v,
                    int n_total, int num_heads, int num_kv_heads, int head_dim, float scale, float* __restrict__ out,
                    float* __restrict__ ws, int num_splits) {
  constexpr int kPerLane = kMaxD / 32;
  constexpr int kRowsPerWarp = kRows / kWarps;
  __shared__ float ks[kTile][kMaxD + 1];
  __shared__ float vs[kTile][kMaxD];
  __shared__ float qs[kRows][kMaxD];

  const int group = num_heads / num_kv_heads;
  const int kvh = blockIdx.y;
  const int total_rows = n_new * group;
  const int row0 = blockIdx.x * kRows;
  const int offset = n_total - n_new;
  const int q_stride = num_heads * head_dim, kv_stride = num_kv_heads * head_dim;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  // Load this block's query rows.
  for (int t = threadIdx.x; t < kRows * head_dim; t += blockDim.x) {
    const int r = t / head_dim, d = t % head_dim, row = row0 + r;
    float val = 0.f;
    if (row < total_rows) {
      const int i = row / group, h = kvh * group + row % group;
      val = q[static_cast<int64_t>(i) * q_stride + h * head_dim + d];
    }
    qs[r][d] = val;
  }

  // Keys this block may see: up to the causal limit of its last row, then this split's share.
  const int last_row = min(row0 + kRows, total_rows) - 1;
  const int key_end_block = offset + last_row / group + 1;
  const int chunk = (n_total + num_splits - 1) / num_splits;
  const int key_begin = blockIdx.z * chunk;
  const int key_end = min(key_end_block, (blockIdx.z + 1) * chunk);

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
  int limit[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
    const int row = row0 + rr * kWarps + warp;
    limit[rr] = row < total_rows ? offset + row / group + 1 : 0;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) acc[rr][c] = 0.f;
  }

  for (int t0 = key_begin; t0 < key_end; t0 += kTile) {
    __syncthreads();  // previous tile consumed (and, on the first pass, qs written)
    for (int t = threadIdx.x; t < kTile * head_dim; t += blockDim.x) {
      const int j = t / head_dim, d = t % head_dim, key = t0 + j;
      float kv = 0.f, vv = 0.f;
      if (key < key_end) {
        const int64_t off = static_cast<int64_t>(key) * kv_stride + kvh * head_dim + d;
        kv = k[off];
        vv = v[off];
      }
      ks[j][d] = kv;
      vs[j][d] = vv;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = rr * kWarps + warp;
      const int lim = min(limit[rr], key_end);
      if (t0 >= lim) continue;  // warp-uniform: nothing visible in this tile for this row
      float s = -INFINITY;
      if (lane < kTile && t0 + lane < lim) {
        float dot = 0.f;
        for (int d = 0; d < head_dim; ++d) dot += qs[r][d] * ks[lane][d];
        s = dot * scale;
      }
      const float m_new = fmaxf(m[rr], WarpMax(s));
      const float p = (s == -INFINITY) ? 0.f : expf(s - m_new);
      const float corr = (m[rr] == -INFINITY) ? 0.f : expf(m[rr] - m_new);
      l[rr] = l[rr] * corr + WarpSum(p);
      m[rr] = m_new;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) acc[rr][c] *= corr;
      const int nkeys = min(kTile, lim - t0);
      for (int j = 0; j < nkeys; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
          const int d = lane + 32 * c;
          if (d < head_dim) acc[rr][c] += pj * vs[j][d];
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int row = row0 + rr * kWarps + warp;
    if (row >= total_rows) continue;
    const int i = row / group, h = kvh * group + row % group;
    if (num_splits == 1) {
      const float inv = 1.0f / l[rr];
      float* o = out + static_cast<int64_t>(i) * q_stride + h * head_dim;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int d = lane + 32 * c;
        if (d < head_dim) o[d] = acc[rr][c] * inv;
      }
    } else {
      // Workspace: [split][i * num_heads + h][head_dim + 2] = (acc..., m, l).
      float* w = ws + (static_cast<int64_t>(blockIdx.z) * n_new * num_heads + static_cast<int64_t>(i) * num_heads + h) *
                          (head_dim + 2);
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int d = lane + 32 * c;
        if (d < head_dim) w[d] = acc[rr][c];
      }
      if (lane == 0) {
        w[head_dim] = m[rr];
        w[head_dim + 1] = l[rr];
      }
    }
  }
}

// Merges the splits of one (query, head) row: one block per row, one thread per dimension.
__global__ void AttentionCombineKernel(const float* __restrict__ ws, int n_new, int num_heads, int head_dim,
                                       int num_splits, float* __restrict__ out) {
  const int64_t row = blockIdx.x;  // i * num_heads + h
  const int64_t split_stride = static_cast<int64_t>(n_new) * num_heads * (head_dim + 2);
  const float* w0 = ws + row * (head_dim + 2);
  float mx = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, w0[s * split_stride + head_dim]);
  float denom = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float ms = w0[s * split_stride + head_dim];
    if (ms != -INFINITY) denom += w0[s * split_stride + head_dim + 1] * expf(ms - mx);
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float ms = w0[s * split_stride + head_dim];
      if (ms != -INFINITY) o += w0[s * split_stride + d] * expf(ms - mx);
    }
    out[row * head_dim + d] = o / denom;  // row-major [n_new, num_heads * head_dim]
  }
}

template <int kMaxD, int kTile, int kRows>
void Launch(const float* q, int n_new, const float* k, const float* v, int n_total, int num_heads, int num_kv_heads,
            int head_dim, float* out, float* ws, int num_splits, cudaStream_t stream) {
  const int group = num_heads / num_kv_heads;
  dim3 grid((n_new * group + kRows - 1) / kRows, num_kv_heads, num_splits);
  const float scale = 1.0f / sqrtf(static_cast<float>(head_dim));
  AttentionKernel<kMaxD, kTile, kRows><<<grid, kWarps * 32, 0, stream>>>(
      q, n_new, k, v, n_total, num_heads, num_kv_heads, head_dim, scale, out, ws, num_splits);
}

constexpr int RowsFor(int head_dim) { return head_dim <= 128 ? 16 : 8; }
}  // namespace

int attention_num_splits(int n_new, int n_total, int num_heads, int num_kv_heads, int head_dim, int num_sms) {
  const int group = num_heads / num_kv_heads;
  const int blocks = (n_new * group + RowsFor(head_dim) - 1) / RowsFor(head_dim) * num_kv_heads;
  if (blocks >= num_sms) return 1;
  // Enough splits to fill the SMs about twice, each split at least 64 keys, at most 64 splits.
  int splits = (2 * num_sms + blocks - 1) / blocks;
  splits = min(splits, max(1, n_total / 64));
  return max(1, min(splits, 64));
}

size_t attention_workspace_floats(int n_new, int num_heads, int head_dim, int num_splits) {
  return num_splits <= 1 ? 0 : static_cast<size_t>(num_splits) * n_new * num_heads * (head_dim + 2);
}

cudaError_t launch_attention(const float* q, int n_new, const float* k, const float* v, int n_total, int num_heads,
                             int num_kv_heads, int head_dim, float* out, float* workspace, int num_splits,
                             cudaStream_t stream) {
  if (n_new <= 0) return cudaSuccess;
  if (head_dim > 256 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || n_new > n_total)
    return cudaErrorInvalidValue;
  if (num_splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  if (head_dim <= 32)
    Launch<32, 32, 16>(q, n_new, k, v, n_total, num_heads, num_kv_heads, head_dim, out, workspace, num_splits, stream);
  else if (head_dim <= 64)
    Launch<64, 32, 16>(q, n_new, k, v, n_total, num_heads, num_kv_heads, head_dim, out, workspace, num_splits, stream);
  else if (head_dim <= 128)
    Launch<128, 32, 16>(q, n_new, k, v, n_total, num_heads, num_kv_heads, head_dim, out, workspace, num_splits, stream);
  else
    Launch<256, 16, 8>(q, n_new, k, v, n_total, num_heads, num_kv_heads, head_dim, out, workspace, num_splits, stream);
  if (num_splits > 1) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    AttentionCombineKernel<<<n_new * num_heads, head_dim <= 128 ? 128 : 256, 0, stream>>>(workspace, n_new, num_heads,
                                                                                          head_dim, num_splits, out);
  }
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
