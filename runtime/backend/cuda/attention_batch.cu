// Causal GQA attention of a batch of sequences in one launch (Backend::Attention is the batch of
// one): online softmax over K/V tiles in shared memory, the query rows of one KV head sharing each
// tile, key splits merged by a second kernel, each sequence read from a device descriptor array, so
// a decode step of B sequences costs two launches instead of 2B.
//
// Launch: grid (ceil(max_n_new * group / kRows), num_kv_heads, num_seqs * num_splits), kWarps * 32
// threads; blockIdx.z = seq * num_splits + split. Blocks past their sequence's rows exit at once
// (ragged chunks). Decode (n_new = 1) gives one block per (sequence, KV head) per split; splits are
// used only while the real blocks do not fill the SMs. Workspace: [split][row][head][head_dim + 2]
// = (acc..., m, l) with row the batch row q_row + i; the merge kernel has one block per
// (i, head, sequence). Static shared memory <= 41 KiB; head_dim <= 256.
// Test: tests/gpu/cuda_attention_batch_test.cc (vs the CPU backend on ragged prefill/decode
// mixes, GQA groups 1/4/8, head_dim 64/128, with and without splits).
#include <algorithm>
#include <cmath>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
constexpr int kWarps = 4;
constexpr int kMaxGridZ = 65535;

template <int kMaxD, int kTile, int kRows>
__global__ void __launch_bounds__(kWarps * 32)
    AttentionBatchKernel(const float* __restrict__ q, const AttentionSeqDesc* __restrict__ seqs, int num_heads,
                         int num_kv_heads, int head_dim, float scale, float* __restrict__ out, float* __restrict__ ws,
                         int64_t ws_rows, int num_splits) {
  constexpr int kPerLane = kMaxD / 32;
  constexpr int kRowsPerWarp = kRows / kWarps;
  __shared__ float ks[kTile][kMaxD + 1];
  __shared__ float vs[kTile][kMaxD];
  __shared__ float qs[kRows][kMaxD];

  const int seq = blockIdx.z / num_splits, split = blockIdx.z % num_splits;
  const AttentionSeqDesc sd = seqs[seq];
  const int n_new = sd.n_new, n_total = sd.n_total;
  const int group = num_heads / num_kv_heads;
  const int kvh = blockIdx.y;
  const int total_rows = n_new * group;
  const int row0 = blockIdx.x * kRows;
  if (row0 >= total_rows) return;  // block-uniform, before any barrier
  const float* __restrict__ k = sd.k;
  const float* __restrict__ v = sd.v;
  const int offset = n_total - n_new;
  const int q_stride = num_heads * head_dim, kv_stride = num_kv_heads * head_dim;
  const float* qseq = q + sd.q_row * q_stride;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  for (int t = threadIdx.x; t < kRows * head_dim; t += blockDim.x) {
    const int r = t / head_dim, d = t % head_dim, row = row0 + r;
    float val = 0.f;
    if (row < total_rows) {
      const int i = row / group, h = kvh * group + row % group;
      val = qseq[static_cast<int64_t>(i) * q_stride + h * head_dim + d];
    }
    qs[r][d] = val;
  }

  const int last_row = min(row0 + kRows, total_rows) - 1;
  const int key_end_block = offset + last_row / group + 1;
  const int chunk = (n_total + num_splits - 1) / num_splits;
  const int key_begin = split * chunk;
  const int key_end = min(key_end_block, (split + 1) * chunk);

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
      if (t0 >= lim) continue;  // warp-uniform
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
    const int64_t brow = sd.q_row + i;  // row of the batch
    if (num_splits == 1) {
      const float inv = 1.0f / l[rr];
      float* o = out + brow * q_stride + h * head_dim;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int d = lane + 32 * c;
        if (d < head_dim) o[d] = acc[rr][c] * inv;
      }
    } else {
      float* w = ws + ((static_cast<int64_t>(split) * ws_rows + brow) * num_heads + h) * (head_dim + 2);
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

// Merges the splits of one (i, head) row of sequence blockIdx.y: one thread per dimension.
__global__ void AttentionBatchCombineKernel(const float* __restrict__ ws, const AttentionSeqDesc* __restrict__ seqs,
                                            int64_t ws_rows, int num_heads, int head_dim, int num_splits,
                                            float* __restrict__ out) {
  const AttentionSeqDesc sd = seqs[blockIdx.y];
  const int i = blockIdx.x / num_heads, h = blockIdx.x % num_heads;
  if (i >= sd.n_new) return;
  const int64_t row = (sd.q_row + i) * num_heads + h;
  const int64_t split_stride = ws_rows * num_heads * (head_dim + 2);
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
    out[row * head_dim + d] = o / denom;
  }
}

template <int kMaxD, int kTile, int kRows>
void Launch(const float* q, const AttentionSeqDesc* seqs, int num_seqs, const AttentionBatchPlan& plan, int num_heads,
            int num_kv_heads, int head_dim, float* out, float* ws, cudaStream_t stream) {
  const int group = num_heads / num_kv_heads;
  dim3 grid((plan.max_n_new * group + kRows - 1) / kRows, num_kv_heads, num_seqs * plan.num_splits);
  const float scale = 1.0f / sqrtf(static_cast<float>(head_dim));
  AttentionBatchKernel<kMaxD, kTile, kRows><<<grid, kWarps * 32, 0, stream>>>(
      q, seqs, num_heads, num_kv_heads, head_dim, scale, out, ws, plan.num_rows, plan.num_splits);
}

constexpr int RowsFor(int head_dim) { return head_dim <= 128 ? 16 : 8; }
}  // namespace

AttentionBatchPlan plan_attention_batch(const AttentionSeqDesc* seqs_host, int num_seqs, int num_heads,
                                        int num_kv_heads, int head_dim, int num_sms) {
  AttentionBatchPlan plan;
  if (num_seqs <= 0 || num_kv_heads <= 0) return plan;
  const int group = num_heads / num_kv_heads, rows = RowsFor(head_dim);
  int64_t blocks = 0;
  int max_total = 0;
  for (int s = 0; s < num_seqs; ++s) {
    const AttentionSeqDesc& d = seqs_host[s];
    if (d.n_new <= 0) continue;
    plan.max_n_new = std::max(plan.max_n_new, d.n_new);
    plan.num_rows = std::max(plan.num_rows, d.q_row + d.n_new);
    max_total = std::max(max_total, d.n_total);
    blocks += static_cast<int64_t>(d.n_new * group + rows - 1) / rows * num_kv_heads;
  }
  if (blocks > 0 && blocks < num_sms) {
    // Enough splits to fill the SMs about twice, each split at least 64 keys, at most 64 splits.
    int splits = static_cast<int>((2 * num_sms + blocks - 1) / blocks);
    splits = std::min(splits, std::max(1, max_total / 64));
    splits = std::min({splits, 64, kMaxGridZ / num_seqs});
    plan.num_splits = std::max(1, splits);
  }
  if (plan.num_splits > 1)
    plan.workspace_floats = static_cast<size_t>(plan.num_splits) * plan.num_rows * num_heads * (head_dim + 2);
  return plan;
}

cudaError_t launch_attention_batch(const float* q, const AttentionSeqDesc* seqs_dev, int num_seqs,
                                   const AttentionBatchPlan& plan, int num_heads, int num_kv_heads, int head_dim,
                                   float* out, float* workspace, cudaStream_t stream) {
  if (num_seqs <= 0 || plan.max_n_new <= 0) return cudaSuccess;
  if (head_dim > 256 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || plan.num_splits < 1 ||
      static_cast<int64_t>(num_seqs) * plan.num_splits > kMaxGridZ ||
      num_heads * static_cast<int64_t>(plan.max_n_new) > 0x7fffffff)
    return cudaErrorInvalidValue;
  if (plan.num_splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  if (head_dim <= 32)
    Launch<32, 32, 16>(q, seqs_dev, num_seqs, plan, num_heads, num_kv_heads, head_dim, out, workspace, stream);
  else if (head_dim <= 64)
    Launch<64, 32, 16>(q, seqs_dev, num_seqs, plan, num_heads, num_kv_heads, head_dim, out, workspace, stream);
  else if (head_dim <= 128)
    Launch<128, 32, 16>(q, seqs_dev, num_seqs, plan, num_heads, num_kv_heads, head_dim, out, workspace, stream);
  else
    Launch<256, 16, 8>(q, seqs_dev, num_seqs, plan, num_heads, num_kv_heads, head_dim, out, workspace, stream);
  if (plan.num_splits > 1) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    dim3 grid(plan.max_n_new * num_heads, num_seqs);
    AttentionBatchCombineKernel<<<grid, head_dim <= 128 ? 128 : 256, 0, stream>>>(
        workspace, seqs_dev, plan.num_rows, num_heads, head_dim, plan.num_splits, out);
  }
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
