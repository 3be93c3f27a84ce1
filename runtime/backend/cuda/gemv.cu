// Skinny GEMM for decode: y[m, n] = x[m, k] . w[n, k]^T (+ y) for m <= 8 rows (the backend uses it
// for m <= kGemvMaxRows, where it beats cuBLAS) of fp32 activations against BF16/F16 weights, fp32
// accumulation. Decode is bound by streaming the weights once: a row is read with 16-byte loads
// (8 elements, several in flight per lane) and dotted with all m activation rows (which stay in
// L1). Activations stay fp32 (no bf16 rounding as on the cuBLAS path).
//
// Split K: a row belongs to `warps_per_row` warps of one block (1, 2, 4 or 8); warp p of the row
// reads the 16-byte chunks p * 32 + lane, stepping 32 * warps_per_row, a shuffle reduction ends
// each warp and the row's partials are added in warp order through shared memory. Few rows (the
// k/v projections of GQA, the router) would otherwise launch under one wave with too few loads in
// flight; gemv_warps_per_row picks the split from n, k and the SM count, never from m, so a row's
// summation order is the same whatever m is (the expert cache relies on bitwise-equal results for
// any grouping of the tokens).
//
// Gate/up pair (launch_gemv_gate_up, an expert's first half in decode): the same kernel reads
// row r of both weights (two 16-byte loads in flight per step) into two accumulators and writes
// silu(g) * u, the SwiGLU activation, instead of g and u: one launch and no round trip of g and u
// through memory. Each of g and u is summed exactly as the single-weight GEMV sums it (same
// split, same order) and silu(g) * u is SiluMul's expression, so the result is bitwise what
// Gemm, Gemm, SiluMul give.
//
// Groups (launch_gemv_group): up to kGemvMaxGroups GEMVs of one input in one launch (q, k and v of
// decode: one launch instead of three), blockIdx.y the GEMV; one split for all of them.
//
// Routed MoE (launch_moe_routed, a MoE layer of decode without the host): blockIdx.y is a (token,
// slot) pair of the router's output and the kernel looks its expert's weights up in a device table
// of pointers, so neither the routing nor the expert list comes back to the host. Pairs that share
// an expert each read it (decode batches of one or two tokens, where that costs nothing or little);
// every pair is summed as the one-row GEMV sums it with the split Gemm picks for that weight, so
// the layer is bitwise the host-routed path's GateUpSilu / Gemm / ScatterAddRows / Add.
//
// Requires k % 8 == 0 and 16-byte aligned rows (the caller falls back to cuBLAS otherwise).
// Launch: ceil(n / (8 / warps_per_row)) blocks of 8 warps. Test: tests/gpu/cuda_ops_test.cc
// (GemmBf16, m = 1..8 and every split against the CPU; bitwise equality across m).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
constexpr int kWarps = 8;
// Warps per SM the split aims for: enough 16-byte loads in flight to cover HBM latency. Measured
// on H200 (ef_decode_bench --sweep): 1024 rows run best on 4 warps a row, 4096 rows on one.
constexpr int kTargetWarpsPerSm = 16;
// Each lane keeps at least this many 16-byte loads of its row (a shorter slice is all latency).
constexpr int kMinLoadsPerLane = 2;

template <bool kBf16>
__device__ __forceinline__ void Unpack(uint32_t word, float& lo, float& hi) {
  if constexpr (kBf16) {
    lo = __uint_as_float(word << 16);
    hi = __uint_as_float(word & 0xffff0000u);
  } else {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&word));
    lo = f.x;
    hi = f.y;
  }
}

// One GEMV of a launch: y[m, n] = x[m, k] . w[n, k]^T (w2: the up projection of a gate/up pair).
struct GemvOperands {
  const float* x;
  const void* w;
  const void* w2;
  float* y;
  int n;
};

// The launch's GEMVs, one per blockIdx.y. Direct: given by the host (one GEMV, or q, k and v of
// one input). Routed: pair p = t * top_k + j of a MoE layer's routing, its expert's weights looked
// up on the device from the ids the router wrote (no host round trip); x is token t's row and y
// the pair's row.
struct DirectOperands {
  // Named members, not an array: a kernel parameter array indexed by blockIdx.y is copied to
  // local memory first, which cost the one-weight GEMV a third of its bandwidth on H200.
  GemvOperands g0, g1, g2;
  __device__ __forceinline__ GemvOperands Get(int group) const { return group == 0 ? g0 : group == 1 ? g1 : g2; }
};
static_assert(kGemvMaxGroups == 3, "DirectOperands holds kGemvMaxGroups GEMVs");
struct RoutedOperands {
  const float* x;
  int64_t x_stride;  // floats between tokens' rows
  const int32_t* ids;
  int top_k;
  int num_experts;
  const void* const* w;  // [num_experts] device pointers
  const void* const* w2;
  float* y;
  int n;
  __device__ __forceinline__ GemvOperands Get(int pair) const {
    const int e = ids[pair];
    // An id the table does not hold (the router's -1 for a row of NaN logits) computes nothing:
    // no row is valid, so no weight is read; the combine skips the pair and the engine reports it.
    if (e < 0 || e >= num_experts) return GemvOperands{x, nullptr, nullptr, y, 0};
    return GemvOperands{x + static_cast<int64_t>(pair / top_k) * x_stride, w[e], w2 ? w2[e] : nullptr,
                        y + static_cast<int64_t>(pair) * n, n};
  }
};

// kPair: w2 (the up projection) is read beside w and y receives silu(x.w) * (x.w2).
template <int kM, bool kBf16, int kSplit, bool kPair, class Ops>
__global__ void __launch_bounds__(kWarps * 32) GemvKernel(Ops ops, int k, bool accumulate) {
  PdlEnter();
  constexpr int kRowsPerBlock = kWarps / kSplit;
  const GemvOperands g = ops.Get(blockIdx.y);
  const float* __restrict__ x = g.x;
  float* __restrict__ y = g.y;
  const int n = g.n;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int part = warp % kSplit;
  const int row = blockIdx.x * kRowsPerBlock + warp / kSplit;
  const bool valid = row < n;  // no early return: the split's barrier below needs every warp
  const int k8 = k / 8;
  constexpr int kW = kPair ? 2 : 1;  // weights read side by side
  float acc[kW][kM];
#pragma unroll
  for (int v = 0; v < kW; ++v)
#pragma unroll
    for (int m = 0; m < kM; ++m) acc[v][m] = 0.f;
  if (valid) {
    const uint4* wr[kW];
    wr[0] = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(g.w) + static_cast<int64_t>(row) * k);
    if constexpr (kPair)
      wr[kW - 1] = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(g.w2) + static_cast<int64_t>(row) * k);
#pragma unroll 4  // 8 or 16 measured slower on H200 (decode bench, gate/down/q/o GEMVs)
    for (int i = part * 32 + lane; i < k8; i += 32 * kSplit) {
      uint4 pk[kW];
#pragma unroll
      for (int v = 0; v < kW; ++v) pk[v] = __ldg(wr[v] + i);
#pragma unroll
      for (int v = 0; v < kW; ++v) {
        float wf[8];
        Unpack<kBf16>(pk[v].x, wf[0], wf[1]);
        Unpack<kBf16>(pk[v].y, wf[2], wf[3]);
        Unpack<kBf16>(pk[v].z, wf[4], wf[5]);
        Unpack<kBf16>(pk[v].w, wf[6], wf[7]);
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          const float4* xr = reinterpret_cast<const float4*>(x + static_cast<int64_t>(m) * k) + 2 * i;
          const float4 a = __ldg(xr), b = __ldg(xr + 1);
          acc[v][m] += a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] + b.y * wf[5] + b.z * wf[6] +
                       b.w * wf[7];
        }
      }
    }
  }
#pragma unroll
  for (int v = 0; v < kW; ++v)
#pragma unroll
    for (int m = 0; m < kM; ++m) acc[v][m] = WarpSum(acc[v][m]);
  // The row's value for activation row m: the sum, or SiluMul's silu(g) * u of the pair.
  const auto out = [](float g, float u) {
    if constexpr (kPair)
      return g / (1.0f + expf(-g)) * u;
    else
      return g;
  };
  if constexpr (kSplit == 1) {
    if (valid && lane == 0) {
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        float* dst = y + static_cast<int64_t>(m) * n + row;
        const float r = out(acc[0][m], acc[kW - 1][m]);
        *dst = accumulate ? *dst + r : r;
      }
    }
  } else {
    __shared__ float partial[kW][kWarps][kM];
    if (lane == 0) {
#pragma unroll
      for (int v = 0; v < kW; ++v)
#pragma unroll
        for (int m = 0; m < kM; ++m) partial[v][warp][m] = acc[v][m];
    }
    __syncthreads();
    // Lane m of the row's first warp adds the partials in warp order (fixed, independent of m).
    if (valid && part == 0 && lane < kM) {
      float s[kW];
#pragma unroll
      for (int v = 0; v < kW; ++v) {
        s[v] = partial[v][warp][lane];
#pragma unroll
        for (int p = 1; p < kSplit; ++p) s[v] += partial[v][warp + p][lane];
      }
      float* dst = y + static_cast<int64_t>(lane) * n + row;
      const float r = out(s[0], s[kW - 1]);
      *dst = accumulate ? *dst + r : r;
    }
  }
}

// groups GEMVs of at most max_n rows each (blockIdx.y: the GEMV).
template <int kM, bool kBf16, bool kPair, class Ops>
cudaError_t LaunchM(const Ops& ops, int groups, int max_n, int k, bool acc, int split, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((max_n + kWarps / split - 1) / (kWarps / split)),
                  static_cast<unsigned>(groups));
  switch (split) {
    case 1:
      return LaunchPdl(GemvKernel<kM, kBf16, 1, kPair, Ops>, grid, dim3(kWarps * 32), 0, s, ops, k, acc);
    case 2:
      return LaunchPdl(GemvKernel<kM, kBf16, 2, kPair, Ops>, grid, dim3(kWarps * 32), 0, s, ops, k, acc);
    case 4:
      return LaunchPdl(GemvKernel<kM, kBf16, 4, kPair, Ops>, grid, dim3(kWarps * 32), 0, s, ops, k, acc);
    default:
      return LaunchPdl(GemvKernel<kM, kBf16, 8, kPair, Ops>, grid, dim3(kWarps * 32), 0, s, ops, k, acc);
  }
}

template <bool kBf16, bool kPair, class Ops>
cudaError_t Dispatch(const Ops& ops, int m, int groups, int max_n, int k, bool acc, int split, cudaStream_t s) {
  switch (m) {
#define EF_GEMV_CASE(M) \
  case M:               \
    return LaunchM<M, kBf16, kPair>(ops, groups, max_n, k, acc, split, s);
    EF_GEMV_CASE(1)
    EF_GEMV_CASE(2)
    EF_GEMV_CASE(3)
    EF_GEMV_CASE(4)
    EF_GEMV_CASE(5)
    EF_GEMV_CASE(6)
    EF_GEMV_CASE(7)
    EF_GEMV_CASE(8)
#undef EF_GEMV_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

template <bool kPair, class Ops>
cudaError_t DispatchDtype(DType wdt, const Ops& ops, int m, int groups, int max_n, int k, bool acc, int split,
                          cudaStream_t s) {
  if (split != 1 && split != 2 && split != 4 && split != 8) return cudaErrorInvalidValue;
  if (wdt == DType::kBF16) return Dispatch<true, kPair>(ops, m, groups, max_n, k, acc, split, s);
  return Dispatch<false, kPair>(ops, m, groups, max_n, k, acc, split, s);
}

bool RowsFit(int64_t n, int64_t k) { return n >= 1 && n <= 0x7fffffff && k <= 0x7fffffff; }

// Combine of a routed MoE layer (CombinePairs, kernel_util.cuh): y's row of pair p is p.
__global__ void __launch_bounds__(kCombineThreads)
    MoeCombineKernel(const float* __restrict__ y, const int32_t* __restrict__ ids, const float* __restrict__ weights,
                     int top_k, int num_experts, int dim, bool vec4, float* __restrict__ resid) {
  PdlEnter();
  CombinePairs(y, ids, weights, nullptr, top_k, num_experts, dim, vec4, resid);
}
}  // namespace

bool gemv_supported(int64_t m, int64_t k, DType wdt, const void* x, const void* w) {
  return m >= 1 && m <= kGemvMaxRows && (wdt == DType::kBF16 || wdt == DType::kF16) && k % 8 == 0 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

int gemv_warps_per_row(int64_t n, int64_t k, int num_sms) {
  const int64_t target = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * kTargetWarpsPerSm;
  const int64_t k8 = k / 8;
  int split = 1;
  while (split < kGemvMaxWarpsPerRow && n * split < target && k8 >= int64_t{2} * split * 32 * kMinLoadsPerLane)
    split *= 2;
  return split;
}

cudaError_t launch_gemv(const float* x, int64_t m, const void* w, DType wdt, int64_t n, int64_t k, float* y,
                        bool accumulate, int warps_per_row, cudaStream_t stream) {
  if (!gemv_supported(m, k, wdt, x, w) || !RowsFit(n, k)) return cudaErrorInvalidValue;
  DirectOperands ops{};
  ops.g0 = GemvOperands{x, w, nullptr, y, static_cast<int>(n)};
  return DispatchDtype<false>(wdt, ops, static_cast<int>(m), 1, static_cast<int>(n), static_cast<int>(k), accumulate,
                              warps_per_row, stream);
}

cudaError_t launch_gemv_group(const float* x, int64_t m, const GemvGroupItem* items, int num_items, DType wdt,
                              int64_t k, int warps_per_row, cudaStream_t stream) {
  if (num_items < 1 || num_items > kGemvMaxGroups) return cudaErrorInvalidValue;
  DirectOperands ops{};
  GemvOperands* g[kGemvMaxGroups] = {&ops.g0, &ops.g1, &ops.g2};
  int64_t max_n = 0;
  for (int i = 0; i < num_items; ++i) {
    if (!gemv_supported(m, k, wdt, x, items[i].w) || !RowsFit(items[i].n, k)) return cudaErrorInvalidValue;
    *g[i] = GemvOperands{x, items[i].w, nullptr, items[i].y, static_cast<int>(items[i].n)};
    max_n = std::max(max_n, items[i].n);
  }
  return DispatchDtype<false>(wdt, ops, static_cast<int>(m), num_items, static_cast<int>(max_n), static_cast<int>(k),
                              false, warps_per_row, stream);
}

cudaError_t launch_gemv_gate_up(const float* x, int64_t m, const void* gate, const void* up, DType wdt, int64_t n,
                                int64_t k, float* y, int warps_per_row, cudaStream_t stream) {
  if (!gemv_supported(m, k, wdt, x, gate) || !gemv_supported(m, k, wdt, x, up) || !RowsFit(n, k))
    return cudaErrorInvalidValue;
  DirectOperands ops{};
  ops.g0 = GemvOperands{x, gate, up, y, static_cast<int>(n)};
  return DispatchDtype<true>(wdt, ops, static_cast<int>(m), 1, static_cast<int>(n), static_cast<int>(k), false,
                             warps_per_row, stream);
}

cudaError_t launch_moe_routed(const MoeRoutedArgs& a, cudaStream_t stream) {
  const int pairs = static_cast<int>(a.tokens * a.top_k);
  if (a.tokens < 1 || a.top_k < 1 || a.top_k > kMoeRoutedMaxTopK || pairs > 65535 || !RowsFit(a.inter, a.hidden) ||
      !RowsFit(a.hidden, a.inter) || a.hidden % 8 != 0 || a.inter % 8 != 0 ||
      (a.dtype != DType::kBF16 && a.dtype != DType::kF16) || reinterpret_cast<uintptr_t>(a.x) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(a.act) % 16 != 0)
    return cudaErrorInvalidValue;
  const int H = static_cast<int>(a.hidden), I = static_cast<int>(a.inter);
  // Gate/up of every pair: act[p] = silu(x[t] . gate[e]^T) * (x[t] . up[e]^T).
  RoutedOperands gu{a.x, a.hidden, a.ids, a.top_k, a.num_experts, a.gate, a.up, a.act, I};
  cudaError_t err = DispatchDtype<true>(a.dtype, gu, 1, pairs, I, H, false, a.gate_up_split, stream);
  if (err != cudaSuccess) return err;
  // Down of every pair: y[p] = act[p] . down[e]^T.
  RoutedOperands dn{a.act, a.inter, nullptr, 1, a.num_experts, a.down, nullptr, a.y, H};
  dn.ids = a.ids;
  dn.top_k = 1;  // x is the pair's own row of act
  err = DispatchDtype<false>(a.dtype, dn, 1, pairs, H, I, false, a.down_split, stream);
  if (err != cudaSuccess) return err;
  const unsigned chunks = static_cast<unsigned>((H + 4 * kCombineThreads - 1) / (4 * kCombineThreads));
  const bool vec4 =
      H % 4 == 0 && reinterpret_cast<uintptr_t>(a.y) % 16 == 0 && reinterpret_cast<uintptr_t>(a.resid) % 16 == 0;
  return LaunchPdl(MoeCombineKernel, dim3(static_cast<unsigned>(a.tokens), chunks), dim3(kCombineThreads), 0, stream,
                   a.y, a.ids, a.weights, a.top_k, a.num_experts, H, vec4, a.resid);
}

}  // namespace ef::runtime::cuda
