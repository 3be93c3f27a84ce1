// Embedding gather: out[i, :] = fp32(table[ids[i], :]).
// Launch: one block of 256 threads per token row, striding over the columns.
// Test: tests/gpu/cuda_ops_test.cc (Embed vs the CPU backend, F32 and BF16 tables).
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
__global__ void EmbedKernel(const int32_t* ids, const void* table, DType dt, int64_t cols, float* out) {
  const int64_t row = static_cast<int64_t>(ids[blockIdx.x]) * cols;
  float* o = out + static_cast<int64_t>(blockIdx.x) * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) o[c] = LoadAsF32(table, dt, row + c);
}
}  // namespace

cudaError_t launch_embed(const int32_t* ids, int n, const void* table, DType dt, int64_t cols, float* out,
                         cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  EmbedKernel<<<n, 256, 0, stream>>>(ids, table, dt, cols, out);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
