// Many small device-to-device copies in one launch (Backend::CopyBatch): the KV appends of a
// batched step are two copies per sequence (its new keys and values into its cache), 4 KB each in
// a Mixtral decode step. One copy-engine operation each cost ~1.9 us (128 of them: 250 us per
// layer at 64 sequences, measured on the H200); here block b of a launch copies item b.
// The items travel in the launch parameters (kCopyBatchMaxItems per launch; more take several
// launches). A copy whose addresses and size are multiples of 16 bytes moves 16-byte words,
// otherwise bytes.
// Test: tests/gpu/cuda_ops_test.cc (CopyBatch against the items copied one by one).
#include <algorithm>
#include <cstring>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {

struct Items {
  CopyBatchItem item[kCopyBatchMaxItems];
};

__global__ void CopyBatchKernel(const __grid_constant__ Items items) {
  PdlEnter();
  const CopyBatchItem it = items.item[blockIdx.x];
  const auto d = reinterpret_cast<uintptr_t>(it.dst), s = reinterpret_cast<uintptr_t>(it.src);
  if (((d | s | it.bytes) & 15) == 0) {
    uint4* dst = static_cast<uint4*>(it.dst);
    const uint4* src = static_cast<const uint4*>(it.src);
    for (size_t i = threadIdx.x; i < it.bytes / 16; i += blockDim.x) dst[i] = src[i];
  } else {
    auto* dst = static_cast<unsigned char*>(it.dst);
    const auto* src = static_cast<const unsigned char*>(it.src);
    for (size_t i = threadIdx.x; i < it.bytes; i += blockDim.x) dst[i] = src[i];
  }
}

// Item blockIdx.y, its blocks strided over it (gridDim.x of them): 4 floats -> 4 bf16 per step
// when aligned, else one at a time.
__global__ void CopyBatchToBf16Kernel(const __grid_constant__ Items items) {
  PdlEnter();
  const CopyBatchItem it = items.item[blockIdx.y];
  const size_t n = it.bytes / sizeof(float);
  const size_t step = static_cast<size_t>(gridDim.x) * blockDim.x, first = blockIdx.x * blockDim.x + threadIdx.x;
  const auto d = reinterpret_cast<uintptr_t>(it.dst), s = reinterpret_cast<uintptr_t>(it.src);
  if (((d & 7) | (s & 15) | (n & 3)) == 0) {
    const float4* src = static_cast<const float4*>(it.src);
    uint2* dst = static_cast<uint2*>(it.dst);
    for (size_t i = first; i < n / 4; i += step) {
      const float4 f = src[i];
      dst[i] = make_uint2(PackBf16(f.x, f.y), PackBf16(f.z, f.w));
    }
  } else {
    const float* src = static_cast<const float*>(it.src);
    __nv_bfloat16* dst = static_cast<__nv_bfloat16*>(it.dst);
    for (size_t i = first; i < n; i += step) dst[i] = __float2bfloat16_rn(src[i]);
  }
}

}  // namespace

cudaError_t launch_copy_batch_to_bf16(const CopyBatchItem* items_host, int num_items, cudaStream_t stream) {
  for (int first = 0; first < num_items; first += kCopyBatchMaxItems) {
    const int n = std::min(kCopyBatchMaxItems, num_items - first);
    Items items;
    std::memcpy(items.item, items_host + first, sizeof(CopyBatchItem) * n);
    size_t most = 0;
    for (int i = 0; i < n; ++i) most = std::max(most, items.item[i].bytes / sizeof(float));
    // A block converts 1024 floats per pass; a prefill chunk's item gets up to 64 blocks.
    const unsigned blocks = static_cast<unsigned>(std::clamp<size_t>((most + 1023) / 1024, 1, 64));
    if (cudaError_t e =
            LaunchPdl(CopyBatchToBf16Kernel, dim3(blocks, static_cast<unsigned>(n)), dim3(256), 0, stream, items);
        e != cudaSuccess)
      return e;
  }
  return cudaSuccess;
}

cudaError_t launch_copy_batch(const CopyBatchItem* items_host, int num_items, cudaStream_t stream) {
  for (int first = 0; first < num_items; first += kCopyBatchMaxItems) {
    const int n = std::min(kCopyBatchMaxItems, num_items - first);
    Items items;
    std::memcpy(items.item, items_host + first, sizeof(CopyBatchItem) * n);
    if (cudaError_t e = LaunchPdl(CopyBatchKernel, dim3(static_cast<unsigned>(n)), dim3(256), 0, stream, items);
        e != cudaSuccess)
      return e;
  }
  return cudaSuccess;
}

}  // namespace ef::runtime::cuda
