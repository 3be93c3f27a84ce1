// Per-head GEMM (Backend::GemmPerHead): y[r, h, j] = sum_i x[r, h, i] * w[h * n + j, i] with
// strided rows and heads, fp32 accumulation in increasing i, weights F32/F16/BF16.
// Launch: one thread per output (row, head, j), grid-stride. Correctness first (MLA's absorbed
// key/value projections are small per head). Test: tests/gpu/cuda_model_ops_test.cc.
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
__global__ void GemmPerHeadKernel(const float* x, int64_t rows, int num_heads, int64_t x_stride, int x_head_stride,
                                  const void* w, DType wdt, int n, int64_t k, float* y, int64_t y_stride,
                                  int y_head_stride) {
  const int64_t total = rows * num_heads * n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(idx % n);
    const int h = static_cast<int>((idx / n) % num_heads);
    const int64_t r = idx / (static_cast<int64_t>(n) * num_heads);
    const float* xr = x + r * x_stride + static_cast<int64_t>(h) * x_head_stride;
    const int64_t wrow = (static_cast<int64_t>(h) * n + j) * k;
    float acc = 0.f;
    for (int64_t i = 0; i < k; ++i) acc += xr[i] * LoadAsF32(w, wdt, wrow + i);
    y[r * y_stride + static_cast<int64_t>(h) * y_head_stride + j] = acc;
  }
}
}  // namespace

cudaError_t launch_gemm_per_head(const float* x, int64_t rows, int num_heads, int64_t x_stride, int x_head_stride,
                                 const void* w, DType wdt, int n, int64_t k, float* y, int64_t y_stride,
                                 int y_head_stride, cudaStream_t stream) {
  const int64_t total = rows * num_heads * n;
  if (total <= 0) return cudaSuccess;
  GemmPerHeadKernel<<<GridFor(total, 256), 256, 0, stream>>>(x, rows, num_heads, x_stride, x_head_stride, w, wdt, n, k,
                                                             y, y_stride, y_head_stride);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
