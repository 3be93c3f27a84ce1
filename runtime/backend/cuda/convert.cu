// Activation conversion for mixed-precision GEMMs: dst[i] = bf16/f16(src[i]), round to nearest
// even (the cuda_bf16/cuda_fp16 intrinsics). cuBLAS needs A and B of one type, so fp32
// activations meet BF16/F16 weights in the weights' type, accumulating in fp32.
// Launch: grid-stride, 256 threads per block. Test: tests/gpu/cuda_ops_test.cc (Gemm BF16).
//
// And back: rows of 16-bit products (grouped expert GEMMs, whose cuBLAS call writes the operands'
// type) widened to fp32 rows of the caller's output, a segment of rows per blockIdx.y, 8 values
// (16 bytes in, 32 out) per thread step. Test: CudaOpsTest.ExpertMlpsMatchTheCpuExperts.
#include <algorithm>
#include <type_traits>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
template <typename T>
__global__ void ConvertKernel(const float* src, T* dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
      dst[i] = __float2bfloat16_rn(src[i]);
    else
      dst[i] = __float2half_rn(src[i]);
  }
}

template <typename T>
__global__ void RowsTo32Kernel(const T* __restrict__ src, float* __restrict__ dst, const RowSegment* segments,
                               int dim) {
  const RowSegment sg = segments[blockIdx.y];
  const int64_t n8 = sg.rows * dim / 8;
  const uint4* s = reinterpret_cast<const uint4*>(src + sg.src_row * dim);
  float4* d = reinterpret_cast<float4*>(dst + sg.dst_row * dim);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n8;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 v = s[i];
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    float f[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        f[2 * j] = __uint_as_float(w[j] << 16);
        f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
      } else {
        const __half2 h = *reinterpret_cast<const __half2*>(&w[j]);
        f[2 * j] = __low2float(h);
        f[2 * j + 1] = __high2float(h);
      }
    }
    d[2 * i] = make_float4(f[0], f[1], f[2], f[3]);
    d[2 * i + 1] = make_float4(f[4], f[5], f[6], f[7]);
  }
}
}  // namespace

cudaError_t launch_rows_16_to_f32(const void* src, DType t, float* dst, const RowSegment* segments, int num_segments,
                                  int64_t max_rows, int dim, cudaStream_t stream) {
  if (num_segments <= 0 || max_rows <= 0) return cudaSuccess;
  if (dim <= 0 || dim % 8 != 0 || num_segments > 65535 || (t != DType::kBF16 && t != DType::kF16))
    return cudaErrorInvalidValue;
  // About 8 steps of 8 values a thread for the largest segment.
  const int64_t steps = max_rows * dim / 8;
  const dim3 grid(static_cast<unsigned>(std::clamp<int64_t>((steps + 256 * 8 - 1) / (256 * 8), 1, 256)), num_segments);
  if (t == DType::kBF16)
    RowsTo32Kernel<<<grid, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(src), dst, segments, dim);
  else
    RowsTo32Kernel<<<grid, 256, 0, stream>>>(static_cast<const __half*>(src), dst, segments, dim);
  return cudaGetLastError();
}

cudaError_t launch_convert_f32(const float* src, void* dst, DType dst_dtype, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (dst_dtype == DType::kBF16)
    ConvertKernel<<<GridFor(n, 256), 256, 0, stream>>>(src, static_cast<__nv_bfloat16*>(dst), n);
  else if (dst_dtype == DType::kF16)
    ConvertKernel<<<GridFor(n, 256), 256, 0, stream>>>(src, static_cast<__half*>(dst), n);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
