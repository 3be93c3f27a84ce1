// Grouped routed MoE for decode batches past the GEMV's rows (Backend::MoeRouted): the routing
// stays on the device, the tokens are grouped by expert there, and each expert's weights stream
// from memory once per layer whatever number of the batch's tokens chose it.
//
// 1. Group (one launch): block 0 counts the pairs p = t * top_k + j per expert, scans the counts
//    into each expert's first position in expert order and lists the experts that have pairs
//    ("active", in increasing id); pair p lands at position pos[p] and token_of[pos] = t. The
//    other blocks round x to 16 bits (the precision the cuBLAS GEMMs of the host-routed path give
//    their activations). Positions within an expert follow shared-memory atomics, so they may vary
//    between runs; no value depends on them (below).
// 2. Gate/up (one launch): blockIdx.y is an active expert, blockIdx.z a chunk of up to 8 * kNT of
//    its tokens, each warp 16 rows of gate and of up. Swap-AB tensor-core products: the weight
//    rows are mma.m16n8k16's A operand (16 rows x 16 k), the expert's tokens its B operand (16 k x
//    8 tokens), so a warp reads its rows once for all of the chunk's tokens. Lane (g, t) of the
//    fragment loads 16 contiguous bytes (8 k) of row g and of row g + 8 at k = 32 i + 8 t, and the
//    same 8 k of its token's row: it uses them as the fragment's k indices 2t, 2t+1, 2t+8, 2t+9 of
//    two consecutive mma steps. The permutation of k is the same for A and B (both follow t), so
//    the products are the true dot products; the loads are whole 16-byte vectors with 64
//    contiguous bytes per row and step. act[pos] = silu(g) * u, rounded to 16 bits as the cuBLAS
//    down GEMM of the host-routed path rounds its input.
// 3. Down (one launch): the same kernel on act's rows of the expert (contiguous from its first
//    position) against down[e], y[pos] in fp32.
// 4. Combine (one launch): resid[t] += sum over t's pairs in increasing expert id of
//    weights[p] * y[pos[p]].
// A tensor-core product's output element depends only on its row and column operands (fp32
// accumulation in the fragment, a fixed order over k per warp), so a pair's value does not depend
// on the chunk or the position it got: the layer is deterministic. Split K: kSplit warps of a
// block share 16 rows (warp `part` takes the 32-k steps part, part + kSplit, ...), their partial
// fragments added in warp order through shared memory.
//
// Requires 16-bit weights, hidden and inter multiples of 32, and 16-byte aligned rows; ids outside
// [0, num_experts) (the router's -1 for NaN logits) are not grouped and add nothing.
// Test: tests/gpu/cuda_ops_test.cc (MoeGroupedMatchesTheCpuLayer).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
constexpr int kWarps = 8;
constexpr int kGroupThreads = 1024;   // block 0 of the group launch: one thread per pair and per expert
constexpr int kConvertThreads = 256;  // the other blocks: 8 elements per thread
constexpr int kTargetWarpsPerSm = 16;

// The metadata the group step writes (int32, in this order): pos[pairs], token_of[pairs],
// active_expert[slots], active_start[slots], active_count[slots], num_active.
struct Meta {
  int32_t* pos;
  int32_t* token_of;
  int32_t* active_expert;
  int32_t* active_start;
  int32_t* active_count;
  int32_t* num_active;
  __host__ __device__ Meta(int32_t* base, int pairs, int slots)
      : pos(base),
        token_of(base + pairs),
        active_expert(base + 2 * pairs),
        active_start(base + 2 * pairs + slots),
        active_count(base + 2 * pairs + 2 * slots),
        num_active(base + 2 * pairs + 3 * slots) {}
};

// Active experts a layer can have at most: every pair on a different expert.
int ActiveSlots(int pairs, int num_experts) { return std::min(pairs, num_experts); }

template <bool kBf16>
__device__ __forceinline__ uint32_t Pack16x2(float lo, float hi) {
  if constexpr (kBf16) {
    return PackBf16(lo, hi);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

template <bool kBf16>
__device__ __forceinline__ uint16_t To16(float v) {
  if constexpr (kBf16) {
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    return *reinterpret_cast<const uint16_t*>(&b);
  } else {
    const __half h = __float2half_rn(v);
    return *reinterpret_cast<const uint16_t*>(&h);
  }
}

// d += a * b, m16n8k16, 16-bit a (4 words) and b (2 words), fp32 d.
template <bool kBf16>
__device__ __forceinline__ void Mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
  if constexpr (kBf16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Block 0: the grouping (pairs <= kGroupThreads, num_experts <= kGroupThreads). Blocks 1..: x to
// 16 bits.
template <bool kBf16>
__global__ void __launch_bounds__(kGroupThreads)
    GroupKernel(const int32_t* __restrict__ ids, int pairs, int top_k, int num_experts, int slots, int32_t* meta_base,
                const float* __restrict__ x, int64_t x_elems, uint16_t* __restrict__ xb) {
  PdlEnter();
  if (blockIdx.x > 0) {
    const int64_t i = (static_cast<int64_t>(blockIdx.x - 1) * kConvertThreads + threadIdx.x) * 8;
    if (threadIdx.x >= kConvertThreads || i >= x_elems) return;
    const float4 a = *reinterpret_cast<const float4*>(x + i), b = *reinterpret_cast<const float4*>(x + i + 4);
    *reinterpret_cast<uint4*>(xb + i) = make_uint4(Pack16x2<kBf16>(a.x, a.y), Pack16x2<kBf16>(a.z, a.w),
                                                   Pack16x2<kBf16>(b.x, b.y), Pack16x2<kBf16>(b.z, b.w));
    return;
  }
  __shared__ int count[kGroupThreads];
  __shared__ int first[kGroupThreads];
  __shared__ int warp_sum[kGroupThreads / 32];
  const Meta meta(meta_base, pairs, slots);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  count[tid] = 0;
  __syncthreads();
  const int e = tid < pairs ? ids[tid] : -1;
  const bool valid = e >= 0 && e < num_experts;
  const int rank = valid ? atomicAdd(&count[e], 1) : 0;
  __syncthreads();
  // Exclusive scan over experts of (count | active << 16): the first position and the active index.
  const int c = tid < num_experts ? count[tid] : 0;
  const int packed = c | ((c > 0 ? 1 : 0) << 16);
  int incl = packed;
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_sum[warp] = incl;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += warp_sum[w];
  const int excl = before + incl - packed;
  const int start = excl & 0xffff, slot = excl >> 16;
  first[tid] = start;
  if (c > 0) {
    meta.active_expert[slot] = tid;
    meta.active_start[slot] = start;
    meta.active_count[slot] = c;
  }
  if (tid == kGroupThreads - 1) *meta.num_active = (excl + packed) >> 16;
  __syncthreads();
  if (tid < pairs) {
    const int q = valid ? first[e] + rank : -1;
    meta.pos[tid] = q;
    if (valid) meta.token_of[q] = tid / top_k;
  }
}

// The k loop of a warp: its 16 rows of each of kW weights against kTiles n8 tiles of B, steps of
// 32 k from vector i0 (= part * 4 + t) in strides of kSplit steps. kU steps' weight vectors are
// loaded before any of their products, so that many 16-byte loads per lane are in flight.
// a_row[v]: row g of the warp's tile of weight v (row g + 8 is 8 * k8 vectors on); b_off[j]: the
// vector offset in `b` of tile j's column g.
template <bool kBf16, int kSplit, int kW, int kNT, int kTiles>
__device__ __forceinline__ void KLoop(const uint4* const (&a_row)[kW], const uint4* __restrict__ b,
                                      const int (&b_off)[kNT], int i0, int k8, float (&acc)[kW][kNT][4]) {
  constexpr int kU = kW == 2 ? 2 : 4;
  constexpr int kStride = 4 * kSplit;
  const auto step = [&](const uint4(&wa)[kW][2], int i) {
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      const uint4 bv = __ldg(b + b_off[j] + i);
#pragma unroll
      for (int v = 0; v < kW; ++v) {
        Mma<kBf16>(acc[v][j], wa[v][0].x, wa[v][1].x, wa[v][0].y, wa[v][1].y, bv.x, bv.y);
        Mma<kBf16>(acc[v][j], wa[v][0].z, wa[v][1].z, wa[v][0].w, wa[v][1].w, bv.z, bv.w);
      }
    }
  };
  int i = i0;
  for (; i + (kU - 1) * kStride < k8; i += kU * kStride) {
    uint4 wa[kU][kW][2];
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int v = 0; v < kW; ++v) {
        wa[u][v][0] = __ldg(a_row[v] + i + u * kStride);
        wa[u][v][1] = __ldg(a_row[v] + 8 * k8 + i + u * kStride);
      }
#pragma unroll
    for (int u = 0; u < kU; ++u) step(wa[u], i + u * kStride);
  }
  for (; i < k8; i += kStride) {
    uint4 wa[kW][2];
#pragma unroll
    for (int v = 0; v < kW; ++v) {
      wa[v][0] = __ldg(a_row[v] + i);
      wa[v][1] = __ldg(a_row[v] + 8 * k8 + i);
    }
    step(wa, i);
  }
}

// One weight (or the gate/up pair) of the grouped layer for the active experts' token chunks.
// kGateUp: w = gate, w2 = up, in = xb (rows by token), out = act (16-bit, silu(g) * u).
// Otherwise: w = down, in = act (rows by position), out = y (fp32).
template <bool kBf16, int kSplit, int kNT, bool kGateUp>
__global__ void __launch_bounds__(kWarps * 32, 2)
    GroupedKernel(const void* const* __restrict__ w_table, const void* const* __restrict__ w2_table,
                  const uint16_t* __restrict__ in, void* __restrict__ out, const int32_t* meta_base, int pairs,
                  int slots, int n, int k) {
  PdlEnter();
  constexpr int kW = kGateUp ? 2 : 1;
  constexpr int kTilesPerBlock = kWarps / kSplit;
  const Meta meta(const_cast<int32_t*>(meta_base), pairs, slots);
  const int a = blockIdx.y;
  if (a >= *meta.num_active) return;  // the whole block: no barrier is pending
  const int e = meta.active_expert[a], start = meta.active_start[a], cnt = meta.active_count[a];
  const int n0 = blockIdx.z * 8 * kNT;
  if (n0 >= cnt) return;
  const int tiles = min(kNT, (cnt - n0 + 7) / 8);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int part = warp % kSplit;
  const int row0 = (blockIdx.x * kTilesPerBlock + warp / kSplit) * 16;
  const bool valid = row0 < n;  // n % 16 == 0: a tile is whole or absent

  // This lane's B rows: token (gate/up) or position (down) of column g of each n8 tile. A column
  // past the expert's tokens reads the chunk's first row instead (no branch in the loop); its
  // outputs are never stored.
  int b_off[kNT];
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int col = min(n0 + j * 8 + g, cnt - 1);
    b_off[j] = (kGateUp ? meta.token_of[start + col] : start + col) * (k / 8);
  }
  const uint4* a_row[kW];
  {
    const int64_t r = valid ? row0 + g : 0;
    a_row[0] = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(w_table[e]) + r * k);
    if constexpr (kGateUp)
      a_row[kW - 1] = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(w2_table[e]) + r * k);
  }
  float acc[kW][kNT][4];
#pragma unroll
  for (int v = 0; v < kW; ++v)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[v][j][i] = 0.f;

  if (valid) {
    const int i0 = part * 4 + t, k8 = k / 8;
    // The n8 tiles the chunk fills (<= kNT) as a constant of the loop: no branch inside it.
    switch (tiles) {
      case 1:
        KLoop<kBf16, kSplit, kW, kNT, 1>(a_row, reinterpret_cast<const uint4*>(in), b_off, i0, k8, acc);
        break;
      case 2:
        KLoop<kBf16, kSplit, kW, kNT, (kNT < 2 ? kNT : 2)>(a_row, reinterpret_cast<const uint4*>(in), b_off, i0, k8,
                                                           acc);
        break;
      case 3:
        KLoop<kBf16, kSplit, kW, kNT, (kNT < 3 ? kNT : 3)>(a_row, reinterpret_cast<const uint4*>(in), b_off, i0, k8,
                                                           acc);
        break;
      default:
        KLoop<kBf16, kSplit, kW, kNT, kNT>(a_row, reinterpret_cast<const uint4*>(in), b_off, i0, k8, acc);
        break;
    }
  }
  if constexpr (kSplit > 1) {
    __shared__ float partial[kWarps][kW][kNT][4][32];
#pragma unroll
    for (int v = 0; v < kW; ++v)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) partial[warp][v][j][i][lane] = acc[v][j][i];
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int v = 0; v < kW; ++v)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int p = 1; p < kSplit; ++p) acc[v][j][i] += partial[warp + p][v][j][i][lane];
  }
  if (!valid) return;
    // c0, c1: row g, columns 2t, 2t+1; c2, c3: row g + 8.
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    if (j >= tiles) break;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int col = n0 + j * 8 + 2 * t + (i & 1);
      if (col >= cnt) continue;
      const int64_t dst = static_cast<int64_t>(start + col) * n + row0 + g + (i >> 1) * 8;
      if constexpr (kGateUp) {
        const float gv = acc[0][j][i], uv = acc[kW - 1][j][i];
        static_cast<uint16_t*>(out)[dst] = To16<kBf16>(gv / (1.0f + expf(-gv)) * uv);
      } else {
        static_cast<float*>(out)[dst] = acc[0][j][i];
      }
    }
  }
}

// resid[t] += sum over t's pairs in increasing expert id of weights[p] * y[pos[p]] (CombinePairs,
// kernel_util.cuh; pos < 0: not grouped, an id outside the table).
__global__ void __launch_bounds__(kCombineThreads)
    CombineKernel(const float* __restrict__ y, const int32_t* __restrict__ ids, const float* __restrict__ weights,
                  const int32_t* __restrict__ pos, int top_k, int num_experts, int dim, bool vec4,
                  float* __restrict__ resid) {
  PdlEnter();
  CombinePairs(y, ids, weights, pos, top_k, num_experts, dim, vec4, resid);
}

// Warps per row tile: enough loads in flight for the expected active experts (the slots, an upper
// bound), keeping at least 4 steps of 32 k per warp.
int SplitFor(int64_t n, int64_t k, int slots, int num_sms) {
  const int64_t target = static_cast<int64_t>(std::max(num_sms, 1)) * kTargetWarpsPerSm;
  const int64_t warps = n / 16 * slots;
  int split = 1;
  while (split < kWarps && warps * split < target && k / 32 >= int64_t{8} * split) split *= 2;
  return split;
}

template <bool kBf16, int kSplit, int kNT, bool kGateUp>
cudaError_t LaunchSplit(dim3 grid, const void* const* w, const void* const* w2, const uint16_t* in, void* out,
                        const int32_t* meta, int pairs, int slots, int n, int k, cudaStream_t s) {
  grid.x = static_cast<unsigned>((n / 16 + kWarps / kSplit - 1) / (kWarps / kSplit));
  return LaunchPdl(GroupedKernel<kBf16, kSplit, kNT, kGateUp>, grid, dim3(kWarps * 32), 0, s, w, w2, in, out, meta,
                   pairs, slots, n, k);
}

// Blocks of an instance that an SM holds at once (registers bound it: 2 at 128 per thread), asked
// once per process (a process drives GPUs of one kind).
template <bool kBf16, int kSplit, int kNT, bool kGateUp>
int BlocksPerSm() {
  static const int n = [] {
    int b = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, GroupedKernel<kBf16, kSplit, kNT, kGateUp>, kWarps * 32, 0) !=
        cudaSuccess) {
      (void)cudaGetLastError();  // not sticky: leave no error for a later launch check to report
      return 1;
    }
    return b > 0 ? b : 1;
  }();
  return n;
}

// The split of a launch: SplitFor's, or up to 4x it (k permitting) where that fills the launch's
// last wave of blocks better. Mixtral's gate/up at batches 16-64 (8 experts of 14336 rows: 896
// blocks, 2 per SM on 132 SMs) ran 3.4 waves, the last 40% of a wave on 103 SMs; split 2 makes
// it 6.8 waves. The choice depends on the shapes only, so a layer's sums are the same every step.
template <bool kBf16, int kNT, bool kGateUp>
int WaveSplit(int64_t n, int64_t k, int slots, int num_sms) {
  const int base = SplitFor(n, k, slots, num_sms);
  const auto fill = [&](int split) {
    const int per_sm = split == 1   ? BlocksPerSm<kBf16, 1, kNT, kGateUp>()
                       : split == 2 ? BlocksPerSm<kBf16, 2, kNT, kGateUp>()
                       : split == 4 ? BlocksPerSm<kBf16, 4, kNT, kGateUp>()
                                    : BlocksPerSm<kBf16, 8, kNT, kGateUp>();
    const double blocks = static_cast<double>((n / 16 + kWarps / split - 1) / (kWarps / split)) * slots;
    const double waves = blocks / (static_cast<double>(per_sm) * std::max(num_sms, 1));
    return waves / std::ceil(waves);
  };
  int best = base;
  double best_fill = fill(base);
  for (int split = 2 * base; split <= std::min(kWarps, 4 * base) && k / 32 >= int64_t{8} * split; split *= 2) {
    const double f = fill(split);
    if (f > best_fill + 0.05) best = split, best_fill = f;
  }
  return best;
}

template <bool kBf16, int kNT, bool kGateUp>
cudaError_t LaunchGrouped(int split, dim3 grid, const void* const* w, const void* const* w2, const uint16_t* in,
                          void* out, const int32_t* meta, int pairs, int slots, int n, int k, cudaStream_t s) {
  switch (split) {
    case 1:
      return LaunchSplit<kBf16, 1, kNT, kGateUp>(grid, w, w2, in, out, meta, pairs, slots, n, k, s);
    case 2:
      return LaunchSplit<kBf16, 2, kNT, kGateUp>(grid, w, w2, in, out, meta, pairs, slots, n, k, s);
    case 4:
      return LaunchSplit<kBf16, 4, kNT, kGateUp>(grid, w, w2, in, out, meta, pairs, slots, n, k, s);
    default:
      return LaunchSplit<kBf16, 8, kNT, kGateUp>(grid, w, w2, in, out, meta, pairs, slots, n, k, s);
  }
}

template <bool kBf16, int kNT>
cudaError_t Run(const MoeGroupedArgs& a, int pairs, int slots, cudaStream_t s) {
  const int H = static_cast<int>(a.hidden), I = static_cast<int>(a.inter);
  const int64_t x_elems = a.tokens * a.hidden;
  const unsigned convert_blocks = static_cast<unsigned>((x_elems / 8 + kConvertThreads - 1) / kConvertThreads);
  cudaError_t err = LaunchPdl(GroupKernel<kBf16>, dim3(1 + convert_blocks), dim3(kGroupThreads), 0, s, a.ids, pairs,
                              a.top_k, a.num_experts, slots, a.meta, a.x, x_elems, static_cast<uint16_t*>(a.xb));
  if (err != cudaSuccess) return err;
  // A chunk per 8 * kNT tokens an expert may have (at most every token).
  const dim3 grid(1, static_cast<unsigned>(slots), static_cast<unsigned>((a.tokens + 8 * kNT - 1) / (8 * kNT)));
  err = LaunchGrouped<kBf16, kNT, true>(WaveSplit<kBf16, kNT, true>(I, H, slots, a.num_sms), grid, a.gate, a.up,
                                        static_cast<const uint16_t*>(a.xb), a.act, a.meta, pairs, slots, I, H, s);
  if (err != cudaSuccess) return err;
  err = LaunchGrouped<kBf16, kNT, false>(WaveSplit<kBf16, kNT, false>(H, I, slots, a.num_sms), grid, a.down, nullptr,
                                         static_cast<const uint16_t*>(a.act), a.y, a.meta, pairs, slots, H, I, s);
  if (err != cudaSuccess) return err;
  const Meta meta(a.meta, pairs, slots);
  return LaunchPdl(CombineKernel, CombineGrid(a.tokens, H), dim3(kCombineThreads), 0, s, a.y, a.ids, a.weights,
                   static_cast<const int32_t*>(meta.pos), a.top_k, a.num_experts, H, CombineVec4(a.y, a.resid, H),
                   a.resid);
}

template <bool kBf16>
cudaError_t RunTiles(const MoeGroupedArgs& a, int pairs, int slots, cudaStream_t s) {
  // n8 tiles per chunk: as many as the tokens can fill, up to 4 (32 tokens of an expert per read
  // of its weights; more tokens read them again per chunk).
  if (a.tokens <= 8) return Run<kBf16, 1>(a, pairs, slots, s);
  if (a.tokens <= 16) return Run<kBf16, 2>(a, pairs, slots, s);
  return Run<kBf16, 4>(a, pairs, slots, s);
}
}  // namespace

size_t moe_grouped_meta_ints(int64_t tokens, int top_k, int num_experts) {
  const int pairs = static_cast<int>(tokens * top_k);
  return static_cast<size_t>(2 * pairs + 3 * ActiveSlots(pairs, num_experts) + 1);
}

bool moe_grouped_supported(int64_t tokens, int top_k, int num_experts, DType dtype, int64_t hidden, int64_t inter) {
  return tokens >= 1 && tokens <= kMoeGroupedMaxTokens && top_k >= 1 && top_k <= kMoeRoutedMaxTopK &&
         tokens * top_k <= kGroupThreads && num_experts >= 1 && num_experts <= kGroupThreads &&
         (dtype == DType::kBF16 || dtype == DType::kF16) && hidden % 32 == 0 && inter % 32 == 0 && hidden >= 32 &&
         inter >= 32 && hidden <= (1 << 20) && inter <= (1 << 20);
}

cudaError_t launch_moe_grouped(const MoeGroupedArgs& a, cudaStream_t stream) {
  if (!moe_grouped_supported(a.tokens, a.top_k, a.num_experts, a.dtype, a.hidden, a.inter) ||
      reinterpret_cast<uintptr_t>(a.x) % 16 != 0 || reinterpret_cast<uintptr_t>(a.xb) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(a.act) % 16 != 0)
    return cudaErrorInvalidValue;
  const int pairs = static_cast<int>(a.tokens * a.top_k);
  const int slots = ActiveSlots(pairs, a.num_experts);
  return a.dtype == DType::kBF16 ? RunTiles<true>(a, pairs, slots, stream) : RunTiles<false>(a, pairs, slots, stream);
}

}  // namespace ef::runtime::cuda
