// Dequantization of a tile of rows of a kQ8/kQ4 weight to bf16, for the GEMMs whose m is past the
// quantized GEMV's range: the backend dequantizes a tile of rows into a scratch buffer and runs
// its bf16 cuBLAS GEMM on it. Each thread takes one 16-byte chunk of values (16 or 32 of them, one
// group), dequantizes it as the GEMV does (quant_unpack.cuh, the CPU's values exactly), rounds to
// bf16 (nearest even) and writes 32 or 64 bytes with 16-byte stores.
// Launch: grid-stride over the tile's chunks, 256 threads per block.
// Test: tests/gpu/cuda_quant_test.cc (Gemm on quantized weights for m past kGemvQuantMaxRows).
#include <cuda_bf16.h>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"
#include "runtime/backend/cuda/quant_unpack.cuh"
#include "runtime/core/quant_format.h"

namespace ef::runtime::cuda {
namespace {

template <int kBits, int kGroup, bool kAsym>
__global__ void DequantizeKernel(const uint8_t* __restrict__ values, const uint8_t* __restrict__ params, int64_t k,
                                 int64_t row_begin, int64_t num_chunks, uint4* __restrict__ dst) {
  constexpr int kVals = kQuantChunkValues<kBits>;
  constexpr int kParamBytes = kAsym ? 4 : 2;
  const int64_t chunks_per_row = k / kVals;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < num_chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = row_begin + c / chunks_per_row, i = c % chunks_per_row;
    const uint4 pk = __ldg(reinterpret_cast<const uint4*>(values + row * (k / 8 * kBits)) + i);
    float scale, min;
    LoadQuantParams<kAsym>(params + row * (k / kGroup) * kParamBytes, i * kVals / kGroup, scale, min);
    float wf[kVals];
    DequantChunk<kBits>(pk, scale, min, wf);
    uint4* out = dst + c * (kVals / 8);  // 8 bf16 per 16-byte store
#pragma unroll
    for (int j = 0; j < kVals / 8; ++j)
      out[j] = make_uint4(PackBf16(wf[8 * j], wf[8 * j + 1]), PackBf16(wf[8 * j + 2], wf[8 * j + 3]),
                          PackBf16(wf[8 * j + 4], wf[8 * j + 5]), PackBf16(wf[8 * j + 6], wf[8 * j + 7]));
  }
}

}  // namespace

cudaError_t launch_dequantize_bf16(const void* w, DType wdt, int64_t rows, int64_t cols, int64_t row_begin,
                                   int64_t num_rows, void* dst, cudaStream_t stream) {
  if (!IsQuantized(wdt) || cols < 1 || !QuantFormat::Of(wdt).divides(cols) || row_begin < 0 || num_rows < 0 ||
      row_begin + num_rows > rows || reinterpret_cast<uintptr_t>(w) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(dst) % 16 != 0)
    return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  const QuantFormat f = QuantFormat::Of(wdt);
  const auto* base = static_cast<const uint8_t*>(w);
  const uint8_t* params = base + f.params_offset(rows, cols);
  const int64_t num_chunks = num_rows * (cols / f.values_per_chunk());
  const unsigned grid = GridFor(num_chunks, 256);
  auto* out = static_cast<uint4*>(dst);
  if (wdt == DType::kQ8)
    DequantizeKernel<8, kQ8Format.group, false>
        <<<grid, 256, 0, stream>>>(base, params, cols, row_begin, num_chunks, out);
  else
    DequantizeKernel<4, kQ4Format.group, true>
        <<<grid, 256, 0, stream>>>(base, params, cols, row_begin, num_chunks, out);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
