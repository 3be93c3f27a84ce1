// The sequence descriptors of one attention launch, shared by the attention kernels of this folder
// (included by .cu files only).
#pragma once

#include <cmath>

#include "runtime/backend/cuda/cuda_kernels.h"

namespace ef::runtime::cuda {

// The sequences of one launch: inline (in the kernel parameters, __grid_constant__ so they are
// read in place) when there are few, else a device array.
// A step's sequences (Backend::AttentionStep) are always the device array, and every sequence's k
// and v are the layer's pools (k_pool, v_pool set).
struct SeqTable {
  const AttentionSeqDesc* dev;
  const void* k_pool;
  const void* v_pool;
  int num_inline;  // > 0: inl[0, num_inline) holds the descriptors
  AttentionSeqDesc inl[kAttentionInlineSeqs];
  __device__ __forceinline__ AttentionSeqDesc operator[](int i) const {
    AttentionSeqDesc d = num_inline > 0 ? inl[i] : dev[i];
    if (k_pool != nullptr) {
      d.k = k_pool;
      d.v = v_pool;
    }
    return d;
  }
};

// The pool row of position t (contiguous: t; paged: through the block table).
__device__ __forceinline__ int64_t KvRow(const AttentionSeqDesc& sd, int t) {
  if (sd.blocks == nullptr) return t;
  return (static_cast<int64_t>(__ldg(sd.blocks + (t >> sd.block_shift))) << sd.block_shift) |
         (t & ((1 << sd.block_shift) - 1));
}

// The end of a decode block of split `split` (of num_splits) of one (sequence, KV head): acc
// [group][head_dim] (unnormalised P.V), ms and ls [group] (running max and sum of the block's keys)
// in shared memory, final and visible to every thread. One split: out = acc / l. Several: the
// block writes its partials to the workspace [split][row][head][head_dim + 2] and, given counters,
// the last split block of this (sequence, KV head) to finish merges all splits into out (each
// thread's partials made visible device-wide before the block is counted: threadFenceReduction);
// without counters a separate kernel merges. `scratch` is free shared memory of at least 2 * group
// * num_splits floats. Every thread of the block calls it.
__device__ __forceinline__ void DecodeSplitEpilogue(const float* acc, const float* ms, const float* ls, float* scratch,
                                                    const AttentionSeqDesc& sd, int kvh, int group, int num_heads,
                                                    int head_dim, int split, int num_splits, float* __restrict__ ws,
                                                    int64_t ws_rows, unsigned* __restrict__ counters, int num_kv_heads,
                                                    float* __restrict__ out) {
  const int64_t q_stride = static_cast<int64_t>(num_heads) * head_dim;
  if (num_splits == 1) {
    for (int o = threadIdx.x; o < group * head_dim; o += blockDim.x) {
      const int g = o / head_dim, d = o % head_dim, h = kvh * group + g;
      out[sd.q_row * q_stride + h * head_dim + d] = acc[o] / ls[g];
    }
    return;
  }
  const int64_t split_stride = ws_rows * num_heads * (head_dim + 2);
  for (int o = threadIdx.x; o < group * head_dim; o += blockDim.x) {
    const int g = o / head_dim, d = o % head_dim, h = kvh * group + g;
    float* w = ws + split * split_stride + (sd.q_row * num_heads + h) * (head_dim + 2);
    w[d] = acc[o];
    if (d == 0) {
      w[head_dim] = ms[g];
      w[head_dim + 1] = ls[g];
    }
  }
  if (counters == nullptr) return;  // the combine kernel merges

  __shared__ bool merge;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* c = counters + static_cast<int64_t>(blockIdx.z) * num_kv_heads + kvh;
    merge = atomicAdd(c, 1u) == static_cast<unsigned>(num_splits - 1);
    if (merge) *c = 0u;  // every block of this launch has counted: ready for the next launch
  }
  __syncthreads();
  if (!merge) return;
  __threadfence();
  // The merge reads other blocks' partials from L2 (__ldcg) and keeps its loads independent: a
  // chain of dependent L2 reads per split would cost more than the attention itself. First the
  // splits' (m, l) per head into scratch, then each head's split weights exp(m_s - max) / sum_s l_s
  // exp(m_s - max), then the weighted sum of partials.
  float* mw = scratch;                  // [group][num_splits]: m, then the split's weight
  float* lw = mw + group * num_splits;  // [group][num_splits]: l
  for (int i = threadIdx.x; i < group * num_splits; i += blockDim.x) {
    const int g = i / num_splits, s = i % num_splits, h = kvh * group + g;
    const float* w = ws + s * split_stride + (sd.q_row * num_heads + h) * (head_dim + 2);
    mw[i] = __ldcg(w + head_dim);
    lw[i] = __ldcg(w + head_dim + 1);
  }
  __syncthreads();
  for (int g = threadIdx.x; g < group; g += blockDim.x) {
    float* m = mw + g * num_splits;
    const float* l = lw + g * num_splits;
    float mx = -INFINITY;
    for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, m[s]);
    float den = 0.f;
    for (int s = 0; s < num_splits; ++s)
      if (m[s] != -INFINITY) den += l[s] * expf(m[s] - mx);  // empty splits add nothing
    const float inv = 1.0f / den;
    for (int s = 0; s < num_splits; ++s) m[s] = (m[s] == -INFINITY) ? 0.f : expf(m[s] - mx) * inv;
  }
  __syncthreads();
  for (int o = threadIdx.x; o < group * head_dim; o += blockDim.x) {
    const int g = o / head_dim, d = o % head_dim, h = kvh * group + g;
    const float* w0 = ws + (sd.q_row * num_heads + h) * (head_dim + 2) + d;
    const float* e = mw + g * num_splits;
    float num = 0.f;
#pragma unroll 8
    for (int s = 0; s < num_splits; ++s) num += __ldcg(w0 + s * split_stride) * e[s];
    out[sd.q_row * q_stride + h * head_dim + d] = num;
  }
}

// Fills `table` for num_seqs sequences: inline from seqs_host when they fit, else the device copy
// seqs_dev. False when the array the case needs is null.
inline bool MakeSeqTable(const AttentionSeqDesc* seqs_host, const AttentionSeqDesc* seqs_dev, int num_seqs,
                         SeqTable* table) {
  *table = SeqTable{};
  if (num_seqs <= kAttentionInlineSeqs) {
    if (seqs_host == nullptr) return false;
    table->num_inline = num_seqs;
    for (int s = 0; s < num_seqs; ++s) table->inl[s] = seqs_host[s];
    return true;
  }
  if (seqs_dev == nullptr) return false;
  table->dev = seqs_dev;
  return true;
}

// Decode on tensor cores (attention_decode_tc.cu), for plans with decode_tc: a bf16 cache, head_dim
// 64 or 128, GQA groups up to 16. The kernel cuts splits at 16-key steps; the plan makes no more
// splits than a sequence has attention_decode_tc_keys_per_block() keys (a step per warp on
// average: some warps, or a short sequence's splits, may get none, which the merges skip). The
// launch has the contract of the decode kernel of attention_batch.cu (workspace, counters, rows).
bool attention_decode_tc_supported(int num_heads, int num_kv_heads, int head_dim, int num_splits);
int attention_decode_tc_keys_per_block();
cudaError_t launch_attention_decode_tc(const float* q, const SeqTable& table, int num_seqs,
                                       const AttentionBatchPlan& plan, int num_heads, int num_kv_heads, int head_dim,
                                       float* out, float* workspace, unsigned* counters, cudaStream_t stream);

}  // namespace ef::runtime::cuda
