// Lossless packed bf16 weights (DType kPbf16, runtime/core/packed_bf16_format.h) on the GPU:
//   - a skinny GEMM y[m, n] = x[m, k] . w[n, k]^T (+ y) for m <= kGemvMaxRows, fp32 activations and
//     accumulation, each value's bf16 bits rebuilt in registers from its low byte, its 4-bit code and
//     its group's base exponent;
//   - the decoding of a tile of rows to bf16 (exact: the values are bf16), for the GEMMs past the
//     GEMV's rows, which then run on the bf16 cuBLAS path.
//
// A lane's unit is 32 values of a group of 128: 16 codes bytes (values q..q+15 in their low
// nibbles, 64+q..64+q+15 in their high ones) and the two 16-byte runs of low bytes they pair with.
// Organisation as gemv_quant.cu: a row belongs to `warps_per_row` warps of one block (split K), warp
// p of the row takes units p * 32 + lane, stepping 32 * warps_per_row; StoreGemvRow adds the row's
// partials in warp order. An exception decodes to +0; lane 0 of the row's first warp adds the row's
// exceptions (usually none) to its partial before the reduction, so the order is fixed. (An
// infinite activation at an exception's column therefore gives NaN where the bf16 GEMV gives an
// infinity: either way the row is lost.)
//
// Requires k a multiple of 128 (at most 65536) and 16-byte aligned x and w (gemv_pbf16_supported).
// Launch: ceil(n / (8 / warps_per_row)) blocks of 8 warps.
// Test: tests/gpu/cuda_pbf16_test.cc (against the CPU backend on the same blocks).
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"
#include "runtime/core/packed_bf16_format.h"

namespace ef::runtime::cuda {
namespace {
using F = PackedBf16Format;
constexpr int kWarps = 8;
constexpr int kUnitValues = 32;  // values per lane step
constexpr int kHalf = F::kGroup / 2;

// The sections of a block (offsets computed on the host: PackedBf16Format's are host constexpr).
struct Sections {
  const uint8_t* low;
  const uint8_t* codes;
  const uint8_t* base;
  const uint32_t* row_end;
  const uint32_t* exceptions;
};

Sections SectionsOf(const void* w, int64_t rows, int64_t cols) {
  const auto* b = static_cast<const uint8_t*>(w);
  return {b, b + F::codes_offset(rows, cols), b + F::base_offset(rows, cols),
          reinterpret_cast<const uint32_t*>(b + F::row_end_offset(rows, cols)),
          reinterpret_cast<const uint32_t*>(b + F::exceptions_offset(rows, cols))};
}

// A value's bf16 bits as fp32 bits: sign to 31, exponent (base - code, or 0 for code 15) to 23..30,
// mantissa to 16..22.
__device__ __forceinline__ float DecodePbf16(uint32_t low, uint32_t code, uint32_t base) {
  const uint32_t e = code == F::kEscape ? 0u : base - code;
  return __uint_as_float(((low & 0x80u) << 24) | (e << 23) | ((low & 0x7fu) << 16));
}

// The 32 values of unit u (u % 4 = q / 16 of group u / 4) of a row: wa[j] is value 128g + q + j,
// wb[j] value 128g + 64 + q + j.
__device__ __forceinline__ void DecodeUnit(const uint8_t* __restrict__ low, const uint8_t* __restrict__ codes,
                                           const uint8_t* __restrict__ base, int u, float (&wa)[16], float (&wb)[16]) {
  const int g = u >> 2, q = (u & 3) * 16;
  const uint4 la = __ldg(reinterpret_cast<const uint4*>(low + g * F::kGroup + q));
  const uint4 lb = __ldg(reinterpret_cast<const uint4*>(low + g * F::kGroup + kHalf + q));
  const uint4 cc = __ldg(reinterpret_cast<const uint4*>(codes + g * kHalf + q));
  const uint32_t b = __ldg(base + g);
  const uint32_t a_words[4] = {la.x, la.y, la.z, la.w}, b_words[4] = {lb.x, lb.y, lb.z, lb.w},
                 c_words[4] = {cc.x, cc.y, cc.z, cc.w};
#pragma unroll
  for (int w = 0; w < 4; ++w)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t c = (c_words[w] >> (8 * i)) & 0xffu;
      wa[4 * w + i] = DecodePbf16((a_words[w] >> (8 * i)) & 0xffu, c & 0xfu, b);
      wb[4 * w + i] = DecodePbf16((b_words[w] >> (8 * i)) & 0xffu, c >> 4, b);
    }
}

template <int kM, int kSplit>
__global__ void __launch_bounds__(kWarps * 32)
    GemvPbf16Kernel(const float* __restrict__ x, Sections w, float* __restrict__ y, int n, int k, bool accumulate) {
  constexpr int kRowsPerBlock = kWarps / kSplit;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int part = warp % kSplit;
  const int row = blockIdx.x * kRowsPerBlock + warp / kSplit;
  const bool valid = row < n;  // no early return: the split's barrier below needs every warp
  const int units = k / kUnitValues;
  float acc[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) acc[m] = 0.f;
  if (valid) {
    const int64_t rk = static_cast<int64_t>(row) * k;
    const uint8_t* low = w.low + rk;
    const uint8_t* codes = w.codes + rk / 2;
    const uint8_t* base = w.base + static_cast<int64_t>(row) * (k / F::kGroup);
#pragma unroll 2
    for (int u = part * 32 + lane; u < units; u += 32 * kSplit) {
      float wa[16], wb[16];
      DecodeUnit(low, codes, base, u, wa, wb);
      const int c0 = (u >> 2) * F::kGroup + (u & 3) * 16;
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        const float4* xa = reinterpret_cast<const float4*>(x + static_cast<int64_t>(m) * k + c0);
        const float4* xb = reinterpret_cast<const float4*>(x + static_cast<int64_t>(m) * k + c0 + kHalf);
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float4 a = xa[j], b = xb[j];
          s += a.x * wa[4 * j] + a.y * wa[4 * j + 1] + a.z * wa[4 * j + 2] + a.w * wa[4 * j + 3];
          s += b.x * wb[4 * j] + b.y * wb[4 * j + 1] + b.z * wb[4 * j + 2] + b.w * wb[4 * j + 3];
        }
        acc[m] += s;
      }
    }
    if (part == 0 && lane == 0) {
      for (uint32_t e = row == 0 ? 0u : w.row_end[row - 1]; e < w.row_end[row]; ++e) {
        const uint32_t entry = w.exceptions[e];
        const float v = __uint_as_float(entry & 0xffff0000u);
#pragma unroll
        for (int m = 0; m < kM; ++m) acc[m] += x[static_cast<int64_t>(m) * k + (entry & 0xffffu)] * v;
      }
    }
  }
  StoreGemvRow<kWarps, kM, kSplit>(acc, warp, lane, part, row, valid, y, n, accumulate);
}

template <int kM>
void LaunchM(const float* x, const Sections& w, float* y, int n, int k, bool accumulate, int split, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>((n + kWarps / split - 1) / (kWarps / split));
  switch (split) {
    case 1:
      GemvPbf16Kernel<kM, 1><<<grid, kWarps * 32, 0, s>>>(x, w, y, n, k, accumulate);
      break;
    case 2:
      GemvPbf16Kernel<kM, 2><<<grid, kWarps * 32, 0, s>>>(x, w, y, n, k, accumulate);
      break;
    case 4:
      GemvPbf16Kernel<kM, 4><<<grid, kWarps * 32, 0, s>>>(x, w, y, n, k, accumulate);
      break;
    default:
      GemvPbf16Kernel<kM, 8><<<grid, kWarps * 32, 0, s>>>(x, w, y, n, k, accumulate);
      break;
  }
}

// One thread per unit of the tile: its 32 values as bf16, two 16-byte runs of the output row.
__global__ void UnpackPbf16Kernel(Sections w, int64_t k, int64_t row_begin, int64_t num_units,
                                  uint16_t* __restrict__ dst) {
  const int64_t units_per_row = k / kUnitValues;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < num_units;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / units_per_row;
    const int u = static_cast<int>(t % units_per_row);
    const int64_t row = row_begin + r, rk = row * k;
    float wa[16], wb[16];
    DecodeUnit(w.low + rk, w.codes + rk / 2, w.base + row * (k / F::kGroup), u, wa, wb);
    const int64_t c0 = (u >> 2) * F::kGroup + (u & 3) * 16;
    uint4* oa = reinterpret_cast<uint4*>(dst + r * k + c0);
    uint4* ob = reinterpret_cast<uint4*>(dst + r * k + c0 + kHalf);
    // The fp32 values are bf16 values: their upper halves are the bits.
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      uint32_t pa[4], pb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        pa[i] = (__float_as_uint(wa[8 * j + 2 * i]) >> 16) | (__float_as_uint(wa[8 * j + 2 * i + 1]) & 0xffff0000u);
        pb[i] = (__float_as_uint(wb[8 * j + 2 * i]) >> 16) | (__float_as_uint(wb[8 * j + 2 * i + 1]) & 0xffff0000u);
      }
      oa[j] = make_uint4(pa[0], pa[1], pa[2], pa[3]);
      ob[j] = make_uint4(pb[0], pb[1], pb[2], pb[3]);
    }
  }
}

// The exceptions of the tile's rows written over their +0s: one thread per row.
__global__ void PatchPbf16Kernel(Sections w, int64_t k, int64_t row_begin, int64_t num_rows,
                                 uint16_t* __restrict__ dst) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < num_rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = row_begin + r;
    for (uint32_t e = row == 0 ? 0u : w.row_end[row - 1]; e < w.row_end[row]; ++e) {
      const uint32_t entry = w.exceptions[e];
      dst[r * k + (entry & 0xffffu)] = static_cast<uint16_t>(entry >> 16);
    }
  }
}

}  // namespace

bool gemv_pbf16_supported(int64_t m, int64_t k, DType wdt, const void* x, const void* w) {
  return m >= 1 && m <= kGemvMaxRows && wdt == DType::kPbf16 && F::divides(k) &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

int gemv_pbf16_warps_per_row(int64_t n, int64_t k, int num_sms) {
  // gemv.cu's policy on the row's 16-byte loads (k / 8 for bf16; a PBF16 unit of 32 values is
  // three loads).
  return gemv_warps_per_row(n, k * 3 / 32 * 8, num_sms);
}

cudaError_t launch_gemv_pbf16(const float* x, int64_t m, const void* w, int64_t n, int64_t k, float* y, bool accumulate,
                              int warps_per_row, cudaStream_t stream) {
  if (!gemv_pbf16_supported(m, k, DType::kPbf16, x, w) || n < 1 || n > 0x7fffffff) return cudaErrorInvalidValue;
  if (warps_per_row != 1 && warps_per_row != 2 && warps_per_row != 4 && warps_per_row != 8)
    return cudaErrorInvalidValue;
  const Sections b = SectionsOf(w, n, k);
  const int ni = static_cast<int>(n), ki = static_cast<int>(k);
  static_assert(kGemvMaxRows <= 4, "instantiated for m = 1..4");
  switch (m) {
    case 1:
      LaunchM<1>(x, b, y, ni, ki, accumulate, warps_per_row, stream);
      break;
    case 2:
      LaunchM<2>(x, b, y, ni, ki, accumulate, warps_per_row, stream);
      break;
    case 3:
      LaunchM<3>(x, b, y, ni, ki, accumulate, warps_per_row, stream);
      break;
    default:
      LaunchM<4>(x, b, y, ni, ki, accumulate, warps_per_row, stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_unpack_pbf16(const void* w, int64_t rows, int64_t cols, int64_t row_begin, int64_t num_rows,
                                void* dst, cudaStream_t stream) {
  if (!F::divides(cols) || row_begin < 0 || num_rows < 0 || row_begin + num_rows > rows ||
      reinterpret_cast<uintptr_t>(w) % 16 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0)
    return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  const Sections b = SectionsOf(w, rows, cols);
  auto* out = static_cast<uint16_t*>(dst);
  const int64_t units = num_rows * (cols / kUnitValues);
  UnpackPbf16Kernel<<<GridFor(units, 256), 256, 0, stream>>>(b, cols, row_begin, units, out);
  PatchPbf16Kernel<<<GridFor(num_rows, 256), 256, 0, stream>>>(b, cols, row_begin, num_rows, out);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
