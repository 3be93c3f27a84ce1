// The KV appends of a step whose sequences are on the device (Backend::AppendKvStep): each new
// row's destination comes from its sequence's descriptor (length and block table) when the kernel
// runs, not from the host when it is launched, so a decode step recorded as a graph appends each
// replay's rows where they belong. Block (i, s) writes row i of sequence s: its keys, then its
// values, as 16-byte words where the widths allow (4 floats, or 4 floats -> 4 bf16 as 8 bytes).
//
// Rotate and append (Backend::RopeQKAppendStep): the step's RoPE of q and k and these appends in
// one launch. Block (i, s, z) takes row i of sequence s and heads [z * per_block, ...) of the
// row's q heads, k heads and v heads in that order: a q head is rotated in place, a k head rotated
// in place and written to its cache row, a v head copied to its cache row; one (head, pair) per
// thread, the angles from RopeAngles as launch_rope_qk computes them. The same bits as
// launch_rope_qk then launch_kv_append_step, one launch and one pass over k fewer.
// Test: tests/gpu/cuda_graph_test.cc (the step ops against AttentionBatch / CopyBatch; rotate and
// append against the two ops).
#include <algorithm>

#include "runtime/backend/cuda/attention_seq_table.cuh"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {

__device__ __forceinline__ void CopyRow(const float* __restrict__ src, void* dst, int64_t width, bool bf16) {
  if (!bf16) {
    float* d = static_cast<float*>(dst);
    if (width % 4 == 0) {
      for (int64_t j = threadIdx.x; j < width / 4; j += blockDim.x)
        reinterpret_cast<float4*>(d)[j] = reinterpret_cast<const float4*>(src)[j];
    } else {
      for (int64_t j = threadIdx.x; j < width; j += blockDim.x) d[j] = src[j];
    }
    return;
  }
  if (width % 4 == 0) {
    uint2* d = static_cast<uint2*>(dst);
    for (int64_t j = threadIdx.x; j < width / 4; j += blockDim.x) {
      const float4 f = reinterpret_cast<const float4*>(src)[j];
      d[j] = make_uint2(PackBf16(f.x, f.y), PackBf16(f.z, f.w));
    }
  } else {
    __nv_bfloat16* d = static_cast<__nv_bfloat16*>(dst);
    for (int64_t j = threadIdx.x; j < width; j += blockDim.x) d[j] = __float2bfloat16_rn(src[j]);
  }
}

__global__ void KvAppendStepKernel(const AttentionSeqDesc* __restrict__ seqs, void* k_pool, void* v_pool,
                                   const float* __restrict__ k, const float* __restrict__ v, int64_t k_width,
                                   int64_t v_width, bool bf16) {
  PdlEnter();
  const AttentionSeqDesc sd = seqs[blockIdx.y];
  const int i = blockIdx.x;
  if (i >= sd.n_new) return;
  const int64_t row = KvRow(sd, sd.n_total - sd.n_new + i), src = sd.q_row + i;
  const size_t elem = bf16 ? sizeof(uint16_t) : sizeof(float);
  CopyRow(k + src * k_width, static_cast<char*>(k_pool) + row * k_width * elem, k_width, bf16);
  if (v != nullptr) CopyRow(v + src * v_width, static_cast<char*>(v_pool) + row * v_width * elem, v_width, bf16);
}

constexpr int kRopeMaxHalf = kRopeAppendMaxHeadDim / 2;
constexpr int kRopeThreads = 256;

// A cache row's element j of a head whose values start at `at`: fp32, or rounded to bf16.
__device__ __forceinline__ void StoreKv(void* pool, int64_t at, float x, bool bf16) {
  if (bf16)
    static_cast<__nv_bfloat16*>(pool)[at] = __float2bfloat16_rn(x);
  else
    static_cast<float*>(pool)[at] = x;
}

__global__ void __launch_bounds__(kRopeThreads)
    RopeAppendStepKernel(const AttentionSeqDesc* __restrict__ seqs, float* q, float* k, const float* __restrict__ v,
                         const int32_t* __restrict__ positions, int q_heads, int kv_heads, int head_dim, float theta,
                         int heads_per_block, void* k_pool, void* v_pool, bool bf16) {
  PdlEnter();
  __shared__ float cs[kRopeMaxHalf], sn[kRopeMaxHalf];
  const AttentionSeqDesc sd = seqs[blockIdx.y];
  const int i = blockIdx.x;
  if (i >= sd.n_new) return;  // block-uniform
  const int64_t src = sd.q_row + i, row = KvRow(sd, sd.n_total - sd.n_new + i);
  RopeAngles(static_cast<float>(positions[src]), head_dim, theta, cs, sn);
  __syncthreads();
  const int half = head_dim / 2;
  const int64_t kvd = static_cast<int64_t>(kv_heads) * head_dim;
  const int first = blockIdx.z * heads_per_block;
  const int last = min(first + heads_per_block, q_heads + 2 * kv_heads);
  for (int j = threadIdx.x; j < (last - first) * half; j += blockDim.x) {
    const int h = first + j / half, e = j % half;
    if (h >= q_heads + kv_heads) {  // a value head: copied
      const int64_t off = static_cast<int64_t>(h - q_heads - kv_heads) * head_dim + e;
      StoreKv(v_pool, row * kvd + off, v[src * kvd + off], bf16);
      StoreKv(v_pool, row * kvd + off + half, v[src * kvd + off + half], bf16);
      continue;
    }
    const bool is_k = h >= q_heads;
    float* x = is_k ? k + src * kvd + static_cast<int64_t>(h - q_heads) * head_dim
                    : q + (src * q_heads + h) * static_cast<int64_t>(head_dim);
    const float2 r = RopeRotate(x[e], x[e + half], cs[e], sn[e]);
    x[e] = r.x;
    x[e + half] = r.y;
    if (is_k) {
      const int64_t at = row * kvd + static_cast<int64_t>(h - q_heads) * head_dim + e;
      StoreKv(k_pool, at, r.x, bf16);
      StoreKv(k_pool, at + half, r.y, bf16);
    }
  }
}

}  // namespace

cudaError_t launch_rope_append_step(const AttentionSeqDesc* seqs_dev, int num_seqs, int max_n_new, float* q, float* k,
                                    const float* v, const int32_t* positions, int num_heads, int num_kv_heads,
                                    int head_dim, float theta, void* k_pool, void* v_pool, bool kv_bf16,
                                    cudaStream_t stream) {
  if (num_seqs <= 0 || max_n_new <= 0) return cudaSuccess;
  const int half = head_dim / 2;
  if (seqs_dev == nullptr || q == nullptr || k == nullptr || v == nullptr || positions == nullptr ||
      k_pool == nullptr || v_pool == nullptr || num_seqs > 65535 || head_dim % 2 != 0 || half < 1 ||
      half > kRopeMaxHalf || num_heads < 0 || num_kv_heads < 1)
    return cudaErrorInvalidValue;
  const int heads_per_block = std::max(1, kRopeThreads / half);
  const int blocks_z = (num_heads + 2 * num_kv_heads + heads_per_block - 1) / heads_per_block;
  if (blocks_z > 65535) return cudaErrorInvalidValue;
  return LaunchPdl(
      RopeAppendStepKernel,
      dim3(static_cast<unsigned>(max_n_new), static_cast<unsigned>(num_seqs), static_cast<unsigned>(blocks_z)),
      dim3(kRopeThreads), 0, stream, seqs_dev, q, k, v, positions, num_heads, num_kv_heads, head_dim, theta,
      heads_per_block, k_pool, v_pool, kv_bf16);
}

cudaError_t launch_kv_append_step(const AttentionSeqDesc* seqs_dev, int num_seqs, int max_n_new, void* k_pool,
                                  void* v_pool, const float* k, const float* v, int64_t k_width, int64_t v_width,
                                  bool kv_bf16, cudaStream_t stream) {
  if (num_seqs <= 0 || max_n_new <= 0) return cudaSuccess;
  if (seqs_dev == nullptr || k_pool == nullptr || k == nullptr || (v != nullptr && v_pool == nullptr) ||
      num_seqs > 65535 || k_width <= 0 || v_width < 0)
    return cudaErrorInvalidValue;
  // 16-byte words need 16-byte rows of the source (and 8- or 16-byte rows of the pool); the pool
  // and the activations come from the allocator, so only the widths decide.
  return LaunchPdl(KvAppendStepKernel, dim3(static_cast<unsigned>(max_n_new), static_cast<unsigned>(num_seqs)),
                   dim3(256), 0, stream, seqs_dev, k_pool, v_pool, k, v, k_width, v_width, kv_bf16);
}

}  // namespace ef::runtime::cuda
