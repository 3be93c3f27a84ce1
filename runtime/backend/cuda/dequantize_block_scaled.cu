// Dequantization of a tile of rows of a block-scaled weight (MXFP4, 128 x 128 block FP8;
// runtime/core/block_scaled_format.h) to bf16, for the GEMMs whose m is past the fused GEMV's range:
// the backend dequantizes a tile of rows into a scratch buffer and runs its bf16 cuBLAS GEMM on it,
// as for kQ8/kQ4 (dequantize.cu). Values are the CPU's (block_scaled_unpack.cuh), rounded to bf16
// (nearest even).
//   MXFP4: a thread takes one block of 32 values (16 bytes and a scale byte) and writes 64 bytes
//     with 16-byte stores (rows are whole blocks, so every store is aligned).
//   FP8: a thread takes one value (rows of any width: partial blocks, unaligned rows).
// Launch: grid-stride over the tile's blocks or values, 256 threads per block.
// Test: tests/gpu/cuda_block_scaled_test.cc (Gemm past kGemvQuantMaxRows, the values themselves).
#include <cuda_bf16.h>

#include "runtime/backend/cuda/block_scaled_unpack.cuh"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"
#include "runtime/core/block_scaled_format.h"

namespace ef::runtime::cuda {
namespace {

__global__ void DequantizeMxfp4Kernel(const uint8_t* __restrict__ values, const uint8_t* __restrict__ scales, int64_t k,
                                      int64_t row_begin, int64_t num_chunks, uint4* __restrict__ dst) {
  __shared__ float table[16];
  LoadE2m1Table(table);
  __syncthreads();
  const int64_t chunks_per_row = k / kMxfp4BlockCols;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < num_chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t chunk = row_begin * chunks_per_row + c;  // blocks are laid out row-major, as are scales
    float wf[kMxfp4BlockCols];
    DecodeE2m1Chunk(__ldg(reinterpret_cast<const uint4*>(values) + chunk), table, wf);
    const float scale = E8m0ToFloat(__ldg(scales + chunk));
    uint4* out = dst + c * (kMxfp4BlockCols / 8);  // 8 bf16 per 16-byte store
#pragma unroll
    for (int j = 0; j < kMxfp4BlockCols / 8; ++j) {
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = __fmul_rn(wf[8 * j + e], scale);
      out[j] = make_uint4(PackBf16(v[0], v[1]), PackBf16(v[2], v[3]), PackBf16(v[4], v[5]), PackBf16(v[6], v[7]));
    }
  }
}

__global__ void DequantizeFp8Kernel(const uint8_t* __restrict__ values, const float* __restrict__ scales, int64_t k,
                                    int64_t row_begin, int64_t num_values, __nv_bfloat16* __restrict__ dst) {
  const int64_t grid_cols = (k + kFp8BlockCols - 1) / kFp8BlockCols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_values;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = row_begin + i / k, col = i % k;
    const float scale = __ldg(scales + (row / kFp8BlockRows) * grid_cols + col / kFp8BlockCols);
    dst[i] = __float2bfloat16_rn(__fmul_rn(E4m3ToFloat(__ldg(values + row * k + col)), scale));
  }
}

}  // namespace

cudaError_t launch_dequantize_block_scaled_bf16(const void* w, DType wdt, int64_t rows, int64_t cols, int64_t row_begin,
                                                int64_t num_rows, void* dst, cudaStream_t stream) {
  if (!IsBlockScaled(wdt) || !BlockScaledFormat::Of(wdt).divides(cols) || row_begin < 0 || num_rows < 0 ||
      row_begin + num_rows > rows || reinterpret_cast<uintptr_t>(w) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(dst) % 16 != 0)
    return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  const BlockScaledFormat f = BlockScaledFormat::Of(wdt);
  const auto* base = static_cast<const uint8_t*>(w);
  const uint8_t* scales = base + f.scales_offset(rows, cols);
  if (wdt == DType::kMxfp4) {
    const int64_t num_chunks = num_rows * (cols / kMxfp4BlockCols);
    DequantizeMxfp4Kernel<<<GridFor(num_chunks, 256), 256, 0, stream>>>(base, scales, cols, row_begin, num_chunks,
                                                                        static_cast<uint4*>(dst));
  } else {
    const int64_t num_values = num_rows * cols;
    DequantizeFp8Kernel<<<GridFor(num_values, 256), 256, 0, stream>>>(
        base, reinterpret_cast<const float*>(scales), cols, row_begin, num_values, static_cast<__nv_bfloat16*>(dst));
  }
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
