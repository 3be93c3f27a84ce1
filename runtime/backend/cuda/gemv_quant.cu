// Skinny GEMM on quantized weights (W8A16 / W4A16 style, activations fp32): y[m, n] = x[m, k] .
// dequant(w)[n, k]^T (+ y) for m <= kGemvQuantMaxRows, fp32 accumulation. w is a kQ8 or kQ4 block
// (runtime/core/quant_format.h): values, then per-group fp16 parameters. Decode streams each weight
// byte once, so the dequantization is fused into that stream: a lane loads a 16-byte chunk of
// values (16 int8 or 32 uint4, never straddling a group) and its group's parameters (2 or 4 bytes,
// shared by the neighbouring lanes of the group, so served by L1), dequantizes the chunk in
// registers (quant_unpack.cuh: exponent-trick int-to-float, product and sum rounded as the CPU
// does) and dots it with all m activation rows (which stay in L1).
//
// Organisation as gemv.cu: a row belongs to `warps_per_row` warps of one block (split K); warp p
// of the row reads chunks p * 32 + lane, stepping 32 * warps_per_row; a shuffle reduction ends each
// warp, the row's partials are added in warp order through shared memory. The split is chosen from
// n, the row's chunk count and the SM count, never from m (same summation order for every m).
//
// Requires k a multiple of the group and 16-byte aligned x and w (gemv_quant_supported).
// Launch: ceil(n / (8 / warps_per_row)) blocks of 8 warps.
// Test: tests/gpu/cuda_quant_test.cc (against the CPU backend on the same blocks, m = 1..64).
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"
#include "runtime/backend/cuda/quant_unpack.cuh"
#include "runtime/core/quant_format.h"

namespace ef::runtime::cuda {
namespace {
constexpr int kWarps = 8;

template <int kM, int kBits, int kGroup, bool kAsym, int kSplit>
__global__ void __launch_bounds__(kWarps * 32)
    GemvQuantKernel(const float* __restrict__ x, const uint8_t* __restrict__ values, const uint8_t* __restrict__ params,
                    float* __restrict__ y, int n, int k, bool accumulate) {
  constexpr int kVals = kQuantChunkValues<kBits>;
  constexpr int kChunksPerGroup = kGroup / kVals;
  constexpr int kParamBytes = kAsym ? 4 : 2;
  constexpr int kRowsPerBlock = kWarps / kSplit;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int part = warp % kSplit;
  const int row = blockIdx.x * kRowsPerBlock + warp / kSplit;
  const bool valid = row < n;  // no early return: the split's barrier below needs every warp
  const int chunks = k / kVals;
  float acc[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) acc[m] = 0.f;
  if (valid) {
    const uint4* wr = reinterpret_cast<const uint4*>(values + static_cast<int64_t>(row) * (k / 8 * kBits));
    const void* pr = params + static_cast<int64_t>(row) * (k / kGroup) * kParamBytes;
#pragma unroll 2
    for (int i = part * 32 + lane; i < chunks; i += 32 * kSplit) {
      const uint4 pk = __ldg(wr + i);
      float scale, min;
      LoadQuantParams<kAsym>(pr, i / kChunksPerGroup, scale, min);
      float wf[kVals];
      DequantChunk<kBits>(pk, scale, min, wf);
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        const float4* xr = reinterpret_cast<const float4*>(x + static_cast<int64_t>(m) * k) + i * (kVals / 4);
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < kVals / 4; ++j) {
          const float4 a = xr[j];
          s += a.x * wf[4 * j] + a.y * wf[4 * j + 1] + a.z * wf[4 * j + 2] + a.w * wf[4 * j + 3];
        }
        acc[m] += s;
      }
    }
  }
  StoreGemvRow<kWarps, kM, kSplit>(acc, warp, lane, part, row, valid, y, n, accumulate);
}

struct Args {
  const float* x;
  const uint8_t* values;
  const uint8_t* params;
  float* y;
  int n, k;
  bool accumulate;
};

template <int kM, int kBits, int kGroup, bool kAsym>
void LaunchM(const Args& a, int split, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>((a.n + kWarps / split - 1) / (kWarps / split));
#define EF_GEMV_QUANT_SPLIT(S)                 \
  GemvQuantKernel<kM, kBits, kGroup, kAsym, S> \
      <<<grid, kWarps * 32, 0, s>>>(a.x, a.values, a.params, a.y, a.n, a.k, a.accumulate);
  switch (split) {
    case 1:
      EF_GEMV_QUANT_SPLIT(1)
      break;
    case 2:
      EF_GEMV_QUANT_SPLIT(2)
      break;
    case 4:
      EF_GEMV_QUANT_SPLIT(4)
      break;
    default:
      EF_GEMV_QUANT_SPLIT(8)
      break;
  }
#undef EF_GEMV_QUANT_SPLIT
}

template <int kBits, int kGroup, bool kAsym>
cudaError_t Dispatch(const Args& a, int m, int split, cudaStream_t s) {
  static_assert(kGemvQuantMaxRows == 4, "instantiated for m = 1..4");
  switch (m) {
    case 1:
      LaunchM<1, kBits, kGroup, kAsym>(a, split, s);
      break;
    case 2:
      LaunchM<2, kBits, kGroup, kAsym>(a, split, s);
      break;
    case 3:
      LaunchM<3, kBits, kGroup, kAsym>(a, split, s);
      break;
    case 4:
      LaunchM<4, kBits, kGroup, kAsym>(a, split, s);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
}  // namespace

bool gemv_quant_supported(int64_t m, int64_t k, DType wdt, const void* x, const void* w) {
  return m >= 1 && m <= kGemvQuantMaxRows && IsQuantized(wdt) && k > 0 && QuantFormat::Of(wdt).divides(k) &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

int gemv_quant_warps_per_row(int64_t n, int64_t k, DType wdt, int num_sms) {
  // gemv.cu's policy on the row's 16-byte loads (it counts them as k / 8).
  return gemv_warps_per_row(n, k / QuantFormat::Of(wdt).values_per_chunk() * 8, num_sms);
}

cudaError_t launch_gemv_quant(const float* x, int64_t m, const void* w, DType wdt, int64_t n, int64_t k, float* y,
                              bool accumulate, int warps_per_row, cudaStream_t stream) {
  if (!gemv_quant_supported(m, k, wdt, x, w) || n < 1 || n > 0x7fffffff || k > 0x7fffffff) return cudaErrorInvalidValue;
  if (warps_per_row != 1 && warps_per_row != 2 && warps_per_row != 4 && warps_per_row != 8)
    return cudaErrorInvalidValue;
  const QuantFormat f = QuantFormat::Of(wdt);
  const auto* base = static_cast<const uint8_t*>(w);
  const Args a{x, base, base + f.params_offset(n, k), y, static_cast<int>(n), static_cast<int>(k), accumulate};
  const int mi = static_cast<int>(m);
  if (wdt == DType::kQ8) {
    static_assert(kQ8Format.bits == 8 && !kQ8Format.asymmetric);
    return Dispatch<8, kQ8Format.group, false>(a, mi, warps_per_row, stream);
  }
  static_assert(kQ4Format.bits == 4 && kQ4Format.asymmetric);
  return Dispatch<4, kQ4Format.group, true>(a, mi, warps_per_row, stream);
}

}  // namespace ef::runtime::cuda
