// The KV appends of a step whose sequences are on the device (Backend::AppendKvStep): each new
// row's destination comes from its sequence's descriptor (length and block table) when the kernel
// runs, not from the host when it is launched, so a decode step recorded as a graph appends each
// replay's rows where they belong. Block (i, s) writes row i of sequence s: its keys, then its
// values, as 16-byte words where the widths allow (4 floats, or 4 floats -> 4 bf16 as 8 bytes).
// Test: tests/gpu/cuda_graph_test.cc (the step ops against AttentionBatch / CopyBatch).
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

}  // namespace

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
