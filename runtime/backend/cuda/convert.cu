// Activation conversion for mixed-precision GEMMs: dst[i] = bf16/f16(src[i]), round to nearest
// even (the cuda_bf16/cuda_fp16 intrinsics). cuBLAS needs A and B of one type, so fp32
// activations meet BF16/F16 weights in the weights' type, accumulating in fp32.
// Launch: grid-stride, 256 threads per block. Test: tests/gpu/cuda_ops_test.cc (Gemm BF16).
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
}  // namespace

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
