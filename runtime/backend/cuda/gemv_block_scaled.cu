// Skinny GEMM on block-scaled weights (MXFP4, 128 x 128 block FP8; runtime/core/block_scaled_format.h)
// with fp32 activations: y[m, n] = x[m, k] . dequant(w)[n, k]^T (+ y) for m <= kGemvQuantMaxRows,
// fp32 accumulation. Decode streams each weight byte once, so the dequantization is fused into that
// stream, as gemv_quant.cu does for the runtime's own formats:
//   MXFP4: a lane loads a 16-byte chunk (one block of 32 values) and its e8m0 byte, looks the 32
//     nibbles up in a 16-entry e2m1 table (shared memory), dots them with the m activation rows and
//     multiplies each row's block sum by 2^(s - 127) (exp2 built from the byte's bits). A power of
//     two commutes with fp32 rounding, so this equals summing the dequantized values (barring
//     results in the subnormal range).
//   FP8: a lane loads a 16-byte chunk of e4m3 codes (never straddling a block of 128 columns) and
//     its block's fp32 scale, converts each code exactly and multiplies by the scale (the CPU's
//     values), then dots them with the activations. Rows whose width is not a multiple of 16
//     (partial blocks of odd widths) are read byte by byte, the last chunk masked.
//
// Organisation as gemv.cu / gemv_quant.cu: a row belongs to `warps_per_row` warps of one block
// (split K); warp p of the row reads chunks p * 32 + lane, stepping 32 * warps_per_row; StoreGemvRow
// reduces (shuffles, then the warps in order). The split comes from n, the row's chunk count and
// the SM count, never from m (same summation order for every m).
//
// Launch: ceil(n / (8 / warps_per_row)) blocks of 8 warps.
// Test: tests/gpu/cuda_block_scaled_test.cc (against the CPU backend on the same blocks, m = 1..64).
#include "runtime/backend/cuda/block_scaled_unpack.cuh"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"
#include "runtime/core/block_scaled_format.h"

namespace ef::runtime::cuda {
namespace {
constexpr int kWarps = 8;

// kM rows of x dotted with 4 * kQuads weight values starting at column c of each row (x rows 16-byte
// aligned there), added to acc[m] after multiplying by `scale` (1 when the values carry it).
template <int kM, int kQuads>
__device__ __forceinline__ void DotChunk(const float* __restrict__ x, int k, int c, const float* wf, float scale,
                                         float (&acc)[kM]) {
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    const float4* xr = reinterpret_cast<const float4*>(x + static_cast<int64_t>(m) * k + c);
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kQuads; ++j) {
      const float4 a = xr[j];
      s += a.x * wf[4 * j] + a.y * wf[4 * j + 1] + a.z * wf[4 * j + 2] + a.w * wf[4 * j + 3];
    }
    acc[m] += s * scale;
  }
}

template <int kM, int kSplit>
__global__ void __launch_bounds__(kWarps * 32)
    GemvMxfp4Kernel(const float* __restrict__ x, const uint8_t* __restrict__ values, const uint8_t* __restrict__ scales,
                    float* __restrict__ y, int n, int k, bool accumulate) {
  __shared__ float table[16];
  LoadE2m1Table(table);
  __syncthreads();
  constexpr int kRowsPerBlock = kWarps / kSplit;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int part = warp % kSplit;
  const int row = blockIdx.x * kRowsPerBlock + warp / kSplit;
  const bool valid = row < n;  // no early return: StoreGemvRow's barrier needs every warp
  const int chunks = k / kMxfp4BlockCols;
  float acc[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) acc[m] = 0.f;
  if (valid) {
    const uint4* wr = reinterpret_cast<const uint4*>(values + static_cast<int64_t>(row) * (k / 2));
    const uint8_t* sr = scales + static_cast<int64_t>(row) * chunks;
#pragma unroll 2
    for (int i = part * 32 + lane; i < chunks; i += 32 * kSplit) {
      const uint4 pk = __ldg(wr + i);
      const float scale = E8m0ToFloat(__ldg(sr + i));
      float wf[kMxfp4BlockCols];
      DecodeE2m1Chunk(pk, table, wf);
      DotChunk<kM, kMxfp4BlockCols / 4>(x, k, i * kMxfp4BlockCols, wf, scale, acc);
    }
  }
  StoreGemvRow<kWarps, kM, kSplit>(acc, warp, lane, part, row, valid, y, n, accumulate);
}

// kVec: k a multiple of 16 (16-byte loads of codes and activations); else bytes and masked floats.
template <int kM, int kSplit, bool kVec>
__global__ void __launch_bounds__(kWarps * 32)
    GemvFp8Kernel(const float* __restrict__ x, const uint8_t* __restrict__ values, const float* __restrict__ scales,
                  float* __restrict__ y, int n, int k, bool accumulate) {
  constexpr int kRowsPerBlock = kWarps / kSplit;
  constexpr int kChunksPerBlock = kFp8BlockCols / 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int part = warp % kSplit;
  const int row = blockIdx.x * kRowsPerBlock + warp / kSplit;
  const bool valid = row < n;
  const int chunks = (k + 15) / 16, grid_cols = (k + kFp8BlockCols - 1) / kFp8BlockCols;
  float acc[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) acc[m] = 0.f;
  if (valid) {
    const uint8_t* wr = values + static_cast<int64_t>(row) * k;
    const float* sr = scales + static_cast<int64_t>(row / kFp8BlockRows) * grid_cols;
#pragma unroll 2
    for (int i = part * 32 + lane; i < chunks; i += 32 * kSplit) {
      const float scale = __ldg(sr + i / kChunksPerBlock);
      float wf[16];
      if constexpr (kVec) {
        DecodeE4m3Chunk(__ldg(reinterpret_cast<const uint4*>(wr) + i), scale, wf);
        DotChunk<kM, 4>(x, k, i * 16, wf, 1.f, acc);
      } else {
        const int c0 = i * 16, nv = min(16, k - c0);
#pragma unroll
        for (int j = 0; j < 16; ++j) wf[j] = j < nv ? __fmul_rn(E4m3ToFloat(__ldg(wr + c0 + j)), scale) : 0.f;
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          const float* xr = x + static_cast<int64_t>(m) * k + c0;
          float s = 0.f;
#pragma unroll
          for (int j = 0; j < 16; ++j) s += j < nv ? xr[j] * wf[j] : 0.f;
          acc[m] += s;
        }
      }
    }
  }
  StoreGemvRow<kWarps, kM, kSplit>(acc, warp, lane, part, row, valid, y, n, accumulate);
}

struct Args {
  const float* x;
  const uint8_t* values;
  const uint8_t* scales;
  float* y;
  int n, k;
  bool accumulate;
};

template <int kM, int kSplit>
void Launch(DType wdt, const Args& a, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>((a.n + kWarps / kSplit - 1) / (kWarps / kSplit));
  const auto* scales = reinterpret_cast<const float*>(a.scales);
  if (wdt == DType::kMxfp4)
    GemvMxfp4Kernel<kM, kSplit><<<grid, kWarps * 32, 0, s>>>(a.x, a.values, a.scales, a.y, a.n, a.k, a.accumulate);
  else if (a.k % 16 == 0)
    GemvFp8Kernel<kM, kSplit, true><<<grid, kWarps * 32, 0, s>>>(a.x, a.values, scales, a.y, a.n, a.k, a.accumulate);
  else
    GemvFp8Kernel<kM, kSplit, false><<<grid, kWarps * 32, 0, s>>>(a.x, a.values, scales, a.y, a.n, a.k, a.accumulate);
}

template <int kM>
void LaunchM(DType wdt, const Args& a, int split, cudaStream_t s) {
  switch (split) {
    case 1:
      return Launch<kM, 1>(wdt, a, s);
    case 2:
      return Launch<kM, 2>(wdt, a, s);
    case 4:
      return Launch<kM, 4>(wdt, a, s);
    default:
      return Launch<kM, 8>(wdt, a, s);
  }
}

// 16-byte loads of a row's values (gemv_warps_per_row counts a row's loads as k / 8).
int64_t RowLoads(int64_t k, DType wdt) { return wdt == DType::kMxfp4 ? k / kMxfp4BlockCols : (k + 15) / 16; }

}  // namespace

bool gemv_block_scaled_supported(int64_t m, int64_t k, DType wdt, const void* x, const void* w) {
  if (m < 1 || m > kGemvQuantMaxRows || !IsBlockScaled(wdt) || !BlockScaledFormat::Of(wdt).divides(k) ||
      reinterpret_cast<uintptr_t>(w) % 16 != 0)
    return false;
  // The FP8 byte path reads x by floats; the vector paths by 16 bytes.
  return (wdt == DType::kFp8Block && k % 16 != 0) || reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

int gemv_block_scaled_warps_per_row(int64_t n, int64_t k, DType wdt, int num_sms) {
  return gemv_warps_per_row(n, RowLoads(k, wdt) * 8, num_sms);
}

cudaError_t launch_gemv_block_scaled(const float* x, int64_t m, const void* w, DType wdt, int64_t n, int64_t k,
                                     float* y, bool accumulate, int warps_per_row, cudaStream_t stream) {
  if (!gemv_block_scaled_supported(m, k, wdt, x, w) || n < 1 || n > 0x7fffffff || k > 0x7fffffff)
    return cudaErrorInvalidValue;
  if (warps_per_row != 1 && warps_per_row != 2 && warps_per_row != 4 && warps_per_row != 8)
    return cudaErrorInvalidValue;
  const BlockScaledFormat f = BlockScaledFormat::Of(wdt);
  const auto* base = static_cast<const uint8_t*>(w);
  const Args a{x, base, base + f.scales_offset(n, k), y, static_cast<int>(n), static_cast<int>(k), accumulate};
  static_assert(kGemvQuantMaxRows == 4, "instantiated for m = 1..4");
  switch (m) {
    case 1:
      LaunchM<1>(wdt, a, warps_per_row, stream);
      break;
    case 2:
      LaunchM<2>(wdt, a, warps_per_row, stream);
      break;
    case 3:
      LaunchM<3>(wdt, a, warps_per_row, stream);
      break;
    default:
      LaunchM<4>(wdt, a, warps_per_row, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
