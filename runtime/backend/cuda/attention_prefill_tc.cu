// Causal GQA attention of prefill chunks on tensor cores (flash attention 2): the reduced-precision
// path of Backend::AttentionBatch. Q, K, V stay fp32 in global memory and are rounded to bf16 when
// staged (cp.async cannot convert, so tiles go through registers); S = Q K^T and O = P V are
// mma.sync.m16n8k16 bf16 products with fp32 accumulation; the online softmax runs in fp32
// registers (exp2 with the scale and log2(e) folded into Q), P is rounded to bf16 for P V.
//
// Grid (num_heads, ceil(max_n_new / kRows), num_seqs), kWarps * 32 threads. A block owns kRows
// query rows of one query head of one sequence; warp w owns the m16 strip of rows w*16..w*16+15
// and keeps its Q fragments, S, P and O in registers. The row tiles are issued last-first (the
// longest key ranges start first). Blocks past their sequence's n_new exit at once (ragged
// chunks). The block walks K/V tiles of kKeys keys up to its last row's causal limit, staging
// them in shared memory as bf16: K row-major [key][d], V transposed [d][key], rows padded by 16
// bytes so that the fragment loads below hit 32 distinct banks. Two barriers per tile; each
// global load is issued one phase ahead of its store to shared memory, so that its latency hides
// behind the other product: V(j) loads during S(j) = Q K(j)^T, K(j+1) loads during P(j) V(j).
// The causal mask is applied on the tiles that cross the diagonal only; a warp whose rows all
// precede a tile skips its products (it still stages and meets the barriers). Keys at or past the
// block's key end are zero-filled (never read), query rows past n_new are zero-filled and never
// stored. Static shared memory < 48 KiB.
//
// Fragments of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA, "Matrix Fragments
// for mma.m16n8k16 with floating point type"), with g = lane / 4 and t = lane % 4; a .b32 register
// holds two bf16, the lower column (or k) index in the low 16 bits:
//   A (16 x 16, row-major):  a0 = A[g][2t, 2t+1]   a1 = A[g+8][2t, 2t+1]
//                            a2 = A[g][2t+8, +9]   a3 = A[g+8][2t+8, +9]
//   B (16 x 8, "col": k-major per column n):  b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   C/D (16 x 8, fp32):      c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]
// S = Q K^T: A = Q (rows x d), B[d][key] = K[key][d], so b0/b1 are one 32-bit word of K's row
// `key` at d = 2t (+8): K is staged row-major. O = P V: B[key][d] = V[key][d], so b0 is V[2t][n],
// V[2t+1][n]: one 32-bit word of V^T's row n, hence V is staged transposed. P as the A operand:
// the C fragments of the two n8 tiles of S covering keys 16k..16k+15 are exactly the A fragment of
// the k16 step k of P V (c0,c1 of tile 2k = a0, c2,c3 of tile 2k = a1, c0,c1 of tile 2k+1 = a2,
// c2,c3 of tile 2k+1 = a3), so P never leaves registers.
//
// Numerics: each operand rounds to bf16 (relative error <= 2^-9), products and sums are fp32. The
// softmax denominator sums the rounded P, so the weights applied to V sum to one.
// Test: tests/gpu/cuda_attention_tc_test.cc (vs the CPU backend: single prefills 1..2048, ragged
// batches continuing cached contexts, GQA 1/4/8, head_dim 64/128, large scores; rows outside the
// chunks untouched; the switch off leaves the fp32 path unchanged).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "runtime/backend/cuda/attention_seq_table.cuh"
#include "runtime/backend/cuda/cuda_kernels.h"

namespace ef::runtime::cuda {
namespace {

constexpr int kLaunchWarps = 8;  // warps per block of the launch: kLaunchWarps * 16 query rows
constexpr int kKeys = 64;        // keys per K/V tile
constexpr int kMaxGridYZ = 65535;

// Two floats as one bf16x2 word (lo in the low half), round to nearest even.
__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// As PackBf16x2, adding the rounded values to `sum`.
__device__ __forceinline__ uint32_t PackBf16x2Sum(float lo, float hi, float& sum) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  const float2 r = __bfloat1622float2(v);
  sum += r.x + r.y;
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d += a * b for one m16n8k16 tile: bf16 a (4 words) and b (2 words), fp32 d (fragments above).
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int kD, int kWarps>
__global__ void __launch_bounds__(kWarps * 32)
    AttentionPrefillTcKernel(const float* __restrict__ q, const __grid_constant__ SeqTable seqs, int num_heads,
                             int num_kv_heads, float scale_log2, float* __restrict__ out) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kRows = kWarps * 16;
  constexpr int kC = kD / 4;                          // float4 per key row of one head
  constexpr int kKStride = kD / 2 + 4;                // 32-bit words per staged K row (bf16 pairs + 16 bytes)
  constexpr int kVStride = kKeys / 2 + 4;             // 32-bit words per staged V^T row
  constexpr int kKLoads = kKeys * kC / kThreads;      // float4 of K per thread and tile
  constexpr int kVLoads = kKeys / 2 * kC / kThreads;  // key pairs (two float4) of V per thread and tile
  static_assert(kD % 16 == 0 && kC % 2 == 0, "head_dim: k16 steps, pairs of float4 per V item");
  static_assert(kKeys == 64, "the V staging maps 32 key pairs onto the lanes");
  static_assert(kKeys * kC % kThreads == 0 && kKeys / 2 * kC % kThreads == 0, "whole tiles per pass");
  // Bank-conflict-free fragment loads: row strides of 4 (mod 32) words put the 8 rows g of a
  // warp's load on bank groups 4g, the 4 columns t inside them.
  static_assert(kKStride % 32 == 4 && kVStride % 32 == 4, "padded strides");
  __shared__ uint32_t ks[kKeys * kKStride];  // K tile, bf16 pairs: ks[key * kKStride + d / 2]
  __shared__ uint32_t vt[kD * kVStride];     // V tile transposed, bf16 pairs: vt[d * kVStride + key / 2]

  const AttentionSeqDesc sd = seqs[blockIdx.z];
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kRows;  // first query row (within the chunk)
  if (m0 >= sd.n_new) return;                           // block-uniform, before any barrier
  const int h = blockIdx.x, kvh = h / (num_heads / num_kv_heads);
  const int64_t q_stride = static_cast<int64_t>(num_heads) * kD;
  const int64_t kv_stride = static_cast<int64_t>(num_kv_heads) * kD;
  const int offset = sd.n_total - sd.n_new;  // query row i is at position offset + i, sees keys <= it
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  // Keys that some row of the block sees: [0, key_end); every row sees [0, unmasked_end).
  const int key_end = offset + min(m0 + kRows, sd.n_new);
  const int unmasked_end = offset + m0 + 1;
  const int num_tiles = (key_end + kKeys - 1) / kKeys;
  // This warp's rows and the last key any of them sees (-1: no row of the chunk).
  const int wrow0 = m0 + warp * 16;
  const int warp_last_key = wrow0 < sd.n_new ? offset + min(wrow0 + 15, sd.n_new - 1) : -1;
  // The thread's two rows (g and g + 8 of the strip) and their last visible key. Rows past n_new
  // take the last row's limit (finite softmax, never stored).
  int last_key[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) last_key[r] = offset + min(wrow0 + g + 8 * r, sd.n_new - 1);

  // Q fragments, scaled into the log2 domain: qf[k][i] is a_i of the k16 step k (d = 16k..16k+15).
  uint32_t qf[kD / 16][4];
  {
    const float* qh = q + sd.q_row * q_stride + h * kD;
#pragma unroll
    for (int k = 0; k < kD / 16; ++k) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = wrow0 + g + 8 * (i & 1), col = 16 * k + 2 * t + 8 * (i >> 1);
        float2 v = make_float2(0.f, 0.f);
        if (row < sd.n_new) v = *reinterpret_cast<const float2*>(qh + row * q_stride + col);
        qf[k][i] = PackBf16x2(v.x * scale_log2, v.y * scale_log2);
      }
    }
  }

  const float* kh = sd.k + kvh * kD;
  const float* vh = sd.v + kvh * kD;
  const float4 zero4 = make_float4(0.f, 0.f, 0.f, 0.f);
  // K staging: item f = threadIdx.x + u * kThreads is (key f / kC, float4 f % kC): a warp reads
  // whole rows (coalesced) and writes them as 8-byte words (contiguous, conflict-free).
  float4 kr[kKLoads];
  auto load_k = [&](int t0) {
#pragma unroll
    for (int u = 0; u < kKLoads; ++u) {
      const int f = threadIdx.x + u * kThreads, key = t0 + f / kC;
      kr[u] = key < key_end ? __ldg(reinterpret_cast<const float4*>(kh + key * kv_stride) + f % kC) : zero4;
    }
  };
  auto store_k = [&]() {
#pragma unroll
    for (int u = 0; u < kKLoads; ++u) {
      const int f = threadIdx.x + u * kThreads;
      *reinterpret_cast<uint2*>(ks + (f / kC) * kKStride + 2 * (f % kC)) =
          make_uint2(PackBf16x2(kr[u].x, kr[u].y), PackBf16x2(kr[u].z, kr[u].w));
    }
  };
  // V staging: item f is (key pair p, float4 c): lanes 0-15 take pairs p0..p0+15 at column c, lanes
  // 16-31 the same pairs at c + 1 (two lanes fill one 32-byte sector). Each item writes d = 4c..4c+3
  // of V^T's rows as words (key 2p, key 2p + 1): lanes 16-31 land 4 * kVStride = 16 (mod 32) banks
  // from lanes 0-15, so the 32 stores hit distinct banks.
  float4 vr[kVLoads][2];
  auto v_item = [](int f, int& p, int& c) {
    const int rest = f >> 5;
    p = (f & 15) + 16 * (rest & 1);
    c = 2 * (rest >> 1) + ((f >> 4) & 1);
  };
  auto load_v = [&](int t0) {
#pragma unroll
    for (int u = 0; u < kVLoads; ++u) {
      int p, c;
      v_item(threadIdx.x + u * kThreads, p, c);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = t0 + 2 * p + e;
        vr[u][e] = key < key_end ? __ldg(reinterpret_cast<const float4*>(vh + key * kv_stride) + c) : zero4;
      }
    }
  };
  auto store_v = [&]() {
#pragma unroll
    for (int u = 0; u < kVLoads; ++u) {
      int p, c;
      v_item(threadIdx.x + u * kThreads, p, c);
      uint32_t* dst = vt + 4 * c * kVStride + p;
      dst[0 * kVStride] = PackBf16x2(vr[u][0].x, vr[u][1].x);
      dst[1 * kVStride] = PackBf16x2(vr[u][0].y, vr[u][1].y);
      dst[2 * kVStride] = PackBf16x2(vr[u][0].z, vr[u][1].z);
      dst[3 * kVStride] = PackBf16x2(vr[u][0].w, vr[u][1].w);
    }
  };

  // o[n][i]: C fragment of the n8 tile n of O (d = 8n..8n+7); rows g (i = 0, 1) and g + 8 (i = 2, 3).
  float o[kD / 8][4];
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  // Running max (log2 domain) and this thread's part of the row sum (its columns), rows g, g + 8.
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  load_k(0);
  store_k();
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int t0 = tile * kKeys;
    const bool more = tile + 1 < num_tiles;
    load_v(t0);
    __syncthreads();  // ks holds tile `tile`; every warp is done with vt of the previous tile
    // A warp whose rows all precede the tile skips it (warp-uniform). Every row sees key 0, so a
    // warp's first tile is tile 0 and its running max is finite from then on.
    const bool active = t0 <= warp_last_key;
    uint32_t pa[kKeys / 16][4];  // P as A fragments of the k16 steps of P V
    if (active) {
      float s[kKeys / 8][4];
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int k = 0; k < kD / 16; ++k) {
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n) {
          const uint32_t* b = ks + (8 * n + g) * kKStride + 8 * k + t;  // K[key 8n+g][d 16k+2t (+8)]
          MmaBf16(s[n], qf[k], b[0], b[4]);
        }
      }
      if (t0 + kKeys > unmasked_end) {  // the tile crosses the diagonal (or the end of the keys)
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int key = t0 + 8 * n + 2 * t + (i & 1);
            if (key > last_key[i >> 1]) s[n][i] = -INFINITY;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        // The 4 lanes of a quad (t = 0..3) hold the row's columns.
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[r], mx);     // finite (see above)
        const float corr = exp2f(m_run[r] - m_new);  // 0 on the first tile (m_run = -inf)
        m_run[r] = m_new;
        l_run[r] *= corr;
#pragma unroll
        for (int n = 0; n < kD / 8; ++n) {
          o[n][2 * r] *= corr;
          o[n][2 * r + 1] *= corr;
        }
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n) {
          s[n][2 * r] = exp2f(s[n][2 * r] - m_new);  // masked: exp2(-inf) = 0
          s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - m_new);
        }
      }
#pragma unroll
      for (int k = 0; k < kKeys / 16; ++k) {
        pa[k][0] = PackBf16x2Sum(s[2 * k][0], s[2 * k][1], l_run[0]);
        pa[k][1] = PackBf16x2Sum(s[2 * k][2], s[2 * k][3], l_run[1]);
        pa[k][2] = PackBf16x2Sum(s[2 * k + 1][0], s[2 * k + 1][1], l_run[0]);
        pa[k][3] = PackBf16x2Sum(s[2 * k + 1][2], s[2 * k + 1][3], l_run[1]);
      }
    }
    store_v();
    if (more) load_k(t0 + kKeys);
    __syncthreads();  // vt holds tile `tile`; every warp is done with ks
    if (active) {
#pragma unroll
      for (int k = 0; k < kKeys / 16; ++k) {
#pragma unroll
        for (int n = 0; n < kD / 8; ++n) {
          const uint32_t* b = vt + (8 * n + g) * kVStride + 8 * k + t;  // V[key 16k+2t (+8), +1][d 8n+g]
          MmaBf16(o[n], pa[k], b[0], b[4]);
        }
      }
    }
    if (more) store_k();
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = wrow0 + g + 8 * r;
    if (row >= sd.n_new) continue;
    const float inv = 1.0f / l;
    float* orow = out + (sd.q_row + row) * q_stride + h * kD + 2 * t;
#pragma unroll
    for (int n = 0; n < kD / 8; ++n)
      *reinterpret_cast<float2*>(orow + 8 * n) = make_float2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool attention_prefill_tc_supported(const AttentionSeqDesc* seqs_host, int num_seqs, int num_heads, int num_kv_heads,
                                    int head_dim, const float* q, const float* out) {
  if ((head_dim != 64 && head_dim != 128) || num_kv_heads <= 0 || num_heads % num_kv_heads != 0) return false;
  if (!Aligned16(q) || !Aligned16(out) || seqs_host == nullptr || num_seqs > kMaxGridYZ) return false;
  for (int s = 0; s < num_seqs; ++s)
    if (seqs_host[s].n_new > 0 && (!Aligned16(seqs_host[s].k) || !Aligned16(seqs_host[s].v))) return false;
  return true;
}

cudaError_t launch_attention_prefill_tc(const float* q, const AttentionSeqDesc* seqs_host,
                                        const AttentionSeqDesc* seqs_dev, int num_seqs, int num_heads, int num_kv_heads,
                                        int head_dim, float* out, cudaStream_t stream) {
  if (num_seqs <= 0) return cudaSuccess;
  if (!attention_prefill_tc_supported(seqs_host, num_seqs, num_heads, num_kv_heads, head_dim, q, out))
    return cudaErrorInvalidValue;
  int max_n_new = 0;
  for (int s = 0; s < num_seqs; ++s) max_n_new = std::max(max_n_new, seqs_host[s].n_new);
  if (max_n_new <= 0) return cudaSuccess;
  constexpr int kRows = kLaunchWarps * 16;
  const int row_tiles = (max_n_new + kRows - 1) / kRows;
  if (row_tiles > kMaxGridYZ) return cudaErrorInvalidValue;
  SeqTable table;
  if (!MakeSeqTable(seqs_host, seqs_dev, num_seqs, &table)) return cudaErrorInvalidValue;
  const dim3 grid(num_heads, row_tiles, num_seqs);
  const float scale_log2 = 1.4426950408889634f / sqrtf(static_cast<float>(head_dim));  // log2(e) / sqrt(hd)
  if (head_dim == 64)
    AttentionPrefillTcKernel<64, kLaunchWarps>
        <<<grid, kLaunchWarps * 32, 0, stream>>>(q, table, num_heads, num_kv_heads, scale_log2, out);
  else
    AttentionPrefillTcKernel<128, kLaunchWarps>
        <<<grid, kLaunchWarps * 32, 0, stream>>>(q, table, num_heads, num_kv_heads, scale_log2, out);
  return cudaGetLastError();
}

}  // namespace ef::runtime::cuda
