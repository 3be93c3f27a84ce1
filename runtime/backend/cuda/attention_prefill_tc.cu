// Causal GQA attention of prefill chunks on tensor cores (flash attention 2): the reduced-precision
// path of Backend::AttentionBatch. S = Q K^T and O = P V are mma.sync.m16n8k16 bf16 products with
// fp32 accumulation; the online softmax runs in fp32 registers (exp2, with the scale and log2(e)
// folded into Q); P is rounded to bf16 for P V. Two kernels:
//
// Staging: K and V stay fp32 in the caches; one pass rounds the keys of every sequence to bf16
// into the workspace, in blocks of kKeys keys per KV head: K row-major [key][d], then V transposed
// [d][key] (the layouts the fragment loads below want), keys past n_total zero. Every block of
// the attention kernel then reads bf16 with cp.async (half the bytes of fp32, no registers for
// loads in flight); each key is converted once instead of once per query tile and head of its
// group. Grid (max key blocks, num_kv_heads, num_seqs), 256 threads; V goes through shared memory
// to be transposed.
//
// Attention: grid (num_heads, ceil(max_n_new / kRows), num_seqs), kWarps * 32 threads, kRows =
// 16 kWarps (the launch: 4 warps, 64 query rows; key blocks of 64 keys in a ring of 2 stages of
// dynamic shared memory, 17 KiB each at head_dim 64, 35 KiB at 128). A block owns kRows query rows
// of one query head of one sequence; warp w owns the m16 strip of rows 16w..16w+15 and keeps its
// Q fragments (fp32 loads rounded once), S, P and O in registers. The row tiles are issued
// last-first (the longest key ranges start first); blocks past their sequence's n_new exit at once
// (ragged chunks). The block walks the key blocks up to its last row's causal limit through the
// ring of kStages stages (K rows and V^T rows padded by 16 bytes, so that the fragment loads hit
// 32 distinct banks): one barrier per key block, after which the block issues the copy of key
// block j + kStages - 1 into the stage freed by block j - 1. The causal mask is applied on the
// blocks that cross the diagonal only; a warp whose rows all precede a key block skips its
// products. Query rows past n_new are zero and never stored.
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
#include <atomic>
#include <cmath>
#include <cstdint>

#include "runtime/backend/cuda/attention_seq_table.cuh"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {

constexpr int kKeys = 64;  // keys per staged block (one K/V tile)
constexpr int kStageThreads = 256;
constexpr int kMaxGridYZ = 65535;

// Key blocks of a sequence in the workspace (none when it has no new row).
__host__ __device__ __forceinline__ int64_t KeyBlocks(const AttentionSeqDesc& sd) {
  return sd.n_new > 0 ? (static_cast<int64_t>(sd.n_total) + kKeys - 1) / kKeys : 0;
}

// The first key block of sequence z in the workspace: the key blocks of sequences 0..z-1. Every
// thread of the block must call it (it has barriers); `red` is shared scratch of 32 entries.
__device__ int64_t FirstKeyBlock(const SeqTable& seqs, int z, int64_t* red) {
  int64_t n = 0;
  for (int s = threadIdx.x; s < z; s += blockDim.x) n += KeyBlocks(seqs[s]);
  for (int o = 16; o > 0; o >>= 1) n += __shfl_xor_sync(0xffffffffu, n, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = n;
  __syncthreads();
  int64_t total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += red[w];
  return total;
}

// One key block (kKeys keys of one KV head) of the workspace: K [kKeys][kD] then V^T [kD][kKeys],
// bf16, in 16-byte chunks (8 bf16 each).
template <int kD>
constexpr int kBlockChunks = (2 * kKeys * kD) / 8;

template <int kD>
__global__ void __launch_bounds__(kStageThreads)
    AttentionStageKvKernel(const __grid_constant__ SeqTable seqs, int num_kv_heads, uint4* __restrict__ kv,
                           bool kv_bf16) {
  constexpr int kC = kD / 4;  // float4 per key of one head
  __shared__ float vs[kKeys][kD + 1];
  __shared__ int64_t red[32];
  const AttentionSeqDesc sd = seqs[blockIdx.z];
  const int block = blockIdx.x, kvh = blockIdx.y;
  if (block >= KeyBlocks(sd)) return;  // block-uniform, before any barrier
  const int64_t first = FirstKeyBlock(seqs, blockIdx.z, red);
  uint32_t* dst = reinterpret_cast<uint32_t*>(kv + ((first + block) * num_kv_heads + kvh) * kBlockChunks<kD>);
  const int64_t kv_stride = static_cast<int64_t>(num_kv_heads) * kD;
  // fp32 K/V rounded here, or a bf16 KV cache's values (widened, then packed back unchanged).
  const float* kh = static_cast<const float*>(sd.k) + kvh * kD;
  const float* vh = static_cast<const float*>(sd.v) + kvh * kD;
  const uint16_t* kh16 = static_cast<const uint16_t*>(sd.k) + kvh * kD;
  const uint16_t* vh16 = static_cast<const uint16_t*>(sd.v) + kvh * kD;
  const int t0 = block * kKeys;
  const float4 zero4 = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int f = threadIdx.x; f < kKeys * kC; f += kStageThreads) {
    const int j = f / kC, c = f % kC, key = t0 + j;
    float4 kx = zero4, vx = zero4;
    const int64_t row = key < sd.n_total ? KvRow(sd, key) * kv_stride : 0;
    if (key < sd.n_total && kv_bf16) {
      kx = Bf16x4ToFloat4(__ldg(reinterpret_cast<const uint2*>(kh16 + row) + c));
      vx = Bf16x4ToFloat4(__ldg(reinterpret_cast<const uint2*>(vh16 + row) + c));
    } else if (key < sd.n_total) {
      kx = __ldg(reinterpret_cast<const float4*>(kh + row) + c);
      vx = __ldg(reinterpret_cast<const float4*>(vh + row) + c);
    }
    *reinterpret_cast<uint2*>(dst + j * (kD / 2) + 2 * c) = make_uint2(PackBf16(kx.x, kx.y), PackBf16(kx.z, kx.w));
    vs[j][4 * c] = vx.x;
    vs[j][4 * c + 1] = vx.y;
    vs[j][4 * c + 2] = vx.z;
    vs[j][4 * c + 3] = vx.w;
  }
  __syncthreads();
  uint32_t* vt = dst + kKeys * kD / 2;  // word (d, key pair p) at d * kKeys / 2 + p
  for (int w = threadIdx.x; w < kD * kKeys / 2; w += kStageThreads) {
    const int d = w / (kKeys / 2), p = w % (kKeys / 2);
    vt[w] = PackBf16(vs[2 * p][d], vs[2 * p + 1][d]);
  }
}

// 32-bit words per staged K row (bf16 pairs + 16 bytes) and per staged V^T row.
__host__ __device__ constexpr int KStride(int d) { return d / 2 + 4; }
constexpr int kVStride = kKeys / 2 + 4;
// 32-bit words of one stage: K rows, then V^T rows.
__host__ __device__ constexpr int StageWords(int d) { return kKeys * KStride(d) + d * kVStride; }

template <int kD, int kWarps, int kMinBlocks, int kStages>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    AttentionPrefillTcKernel(const float* __restrict__ q, const __grid_constant__ SeqTable seqs, int num_heads,
                             int num_kv_heads, float scale_log2, const uint4* __restrict__ kv,
                             float* __restrict__ out) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kRows = kWarps * 16;
  constexpr int kKS = KStride(kD), kVS = kVStride, kStage = StageWords(kD);
  static_assert(kD % 16 == 0 && kKeys % 16 == 0 && kStages >= 2, "shapes");
  // Bank-conflict-free fragment loads: row strides of 4 (mod 32) words put the 8 rows g of a
  // warp's load on bank groups 4g, the 4 columns t inside them; rows stay 16-byte aligned.
  static_assert(kKS % 32 == 4 && kVS % 32 == 4, "padded strides");
  extern __shared__ uint4 smem4[];
  uint32_t* const smem = reinterpret_cast<uint32_t*>(smem4);
  __shared__ int64_t red[32];

  const AttentionSeqDesc sd = seqs[blockIdx.z];
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kRows;  // first query row (within the chunk)
  if (m0 >= sd.n_new) return;                           // block-uniform, before any barrier
  const int h = blockIdx.x, kvh = h / (num_heads / num_kv_heads);
  const int64_t q_stride = static_cast<int64_t>(num_heads) * kD;
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

  // Key block j of this KV head into stage `st`: 16-byte copies, K rows then V^T rows.
  const uint4* kv_head = kv + (FirstKeyBlock(seqs, blockIdx.z, red) * num_kv_heads + kvh) * kBlockChunks<kD>;
  auto load_tile = [&](int j, int st) {
    const uint4* src = kv_head + static_cast<int64_t>(j) * num_kv_heads * kBlockChunks<kD>;
    uint32_t* ks = smem + st * kStage;
    uint32_t* vt = ks + kKeys * kKS;
    constexpr int kRowChunksK = kD / 8, kRowChunksV = kKeys / 8;  // 8 bf16 per chunk
    static_assert(kKeys * kRowChunksK % kThreads == 0 && kD * kRowChunksV % kThreads == 0, "whole passes");
#pragma unroll
    for (int u = 0; u < kKeys * kRowChunksK / kThreads; ++u) {
      const int i = threadIdx.x + u * kThreads;
      CpAsync16(ks + (i / kRowChunksK) * kKS + 4 * (i % kRowChunksK), src + i);
    }
#pragma unroll
    for (int u = 0; u < kD * kRowChunksV / kThreads; ++u) {
      const int i = threadIdx.x + u * kThreads;
      CpAsync16(vt + (i / kRowChunksV) * kVS + 4 * (i % kRowChunksV), src + kKeys * kRowChunksK + i);
    }
  };
  // The ring's first kStages - 1 key blocks go out before Q is loaded.
#pragma unroll
  for (int j = 0; j < kStages - 1; ++j) {
    if (j < num_tiles) load_tile(j, j);
    CpAsyncCommit();  // one group per key block, empty past the last: the wait count stays fixed
  }

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
        qf[k][i] = PackBf16(v.x * scale_log2, v.y * scale_log2);
      }
    }
  }

  // o[n][i]: C fragment of the n8 tile n of O (d = 8n..8n+7); rows g (i = 0, 1) and g + 8 (i = 2, 3).
  float o[kD / 8][4];
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  // Running max (log2 domain) and this thread's part of the row sum (its columns), rows g, g + 8.
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int t0 = tile * kKeys;
    CpAsyncWait<kStages - 2>();  // this thread's copies of key block `tile` have landed
    __syncthreads();             // everyone's have; every warp is done with block tile - 1's stage
    {
      const int next = tile + kStages - 1;  // into the stage of block tile - 1
      if (next < num_tiles) load_tile(next, next % kStages);
      CpAsyncCommit();
    }
    const uint32_t* ks = smem + (tile % kStages) * kStage;
    const uint32_t* vt = ks + kKeys * kKS;
    // A warp whose rows all precede the key block skips it (warp-uniform). Every row sees key 0,
    // so a warp's first block is block 0 and its running max is finite from then on.
    if (t0 > warp_last_key) continue;

    float s[kKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int k = 0; k < kD / 16; ++k) {
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
        const uint32_t* b = ks + (8 * n + g) * kKS + 8 * k + t;  // K[key 8n+g][d 16k+2t (+8)]
        MmaBf16(s[n], qf[k], b[0], b[4]);
      }
    }
    if (t0 + kKeys > unmasked_end) {  // the block crosses the diagonal (or the end of the keys)
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
      const float corr = exp2f(m_run[r] - m_new);  // 0 on the first block (m_run = -inf)
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
      const uint32_t pa[4] = {PackBf16Sum(s[2 * k][0], s[2 * k][1], l_run[0]),
                              PackBf16Sum(s[2 * k][2], s[2 * k][3], l_run[1]),
                              PackBf16Sum(s[2 * k + 1][0], s[2 * k + 1][1], l_run[0]),
                              PackBf16Sum(s[2 * k + 1][2], s[2 * k + 1][3], l_run[1])};
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        const uint32_t* b = vt + (8 * n + g) * kVS + 8 * k + t;  // V[key 16k+2t (+8), +1][d 8n+g]
        MmaBf16(o[n], pa, b[0], b[4]);
      }
    }
  }
  CpAsyncWait<0>();  // no copy outlives the block

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

template <int kD, int kWarps, int kMinBlocks, int kStages>
constexpr size_t kPrefillSmemBytes = static_cast<size_t>(kStages) * StageWords(kD) * sizeof(uint32_t);

// Opts the attention kernel in to its dynamic shared memory, once per device.
template <int kD, int kWarps, int kMinBlocks, int kStages>
cudaError_t AllowPrefillSmem() {
  static std::atomic<uint64_t> done{0};  // bit d: set on device d
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return cudaSuccess;
  e = cudaFuncSetAttribute(AttentionPrefillTcKernel<kD, kWarps, kMinBlocks, kStages>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(kPrefillSmemBytes<kD, kWarps, kMinBlocks, kStages>));
  if (e == cudaSuccess) done.fetch_or(bit, std::memory_order_relaxed);
  return e;
}

template <int kD, int kWarps, int kMinBlocks, int kStages>
cudaError_t LaunchPrefillTc(const float* q, const SeqTable& table, int num_seqs, int max_n_new, int max_blocks,
                            int num_heads, int num_kv_heads, float* out, void* workspace, cudaStream_t stream,
                            bool kv_bf16) {
  constexpr int kRows = kWarps * 16;
  const int row_tiles = (max_n_new + kRows - 1) / kRows;
  if (row_tiles > kMaxGridYZ) return cudaErrorInvalidValue;
  cudaError_t e = AllowPrefillSmem<kD, kWarps, kMinBlocks, kStages>();
  if (e != cudaSuccess) return e;
  uint4* kv = static_cast<uint4*>(workspace);
  AttentionStageKvKernel<kD>
      <<<dim3(max_blocks, num_kv_heads, num_seqs), kStageThreads, 0, stream>>>(table, num_kv_heads, kv, kv_bf16);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const float scale_log2 = 1.4426950408889634f / sqrtf(static_cast<float>(kD));  // log2(e) / sqrt(hd)
  constexpr size_t kSmem = kPrefillSmemBytes<kD, kWarps, kMinBlocks, kStages>;
  AttentionPrefillTcKernel<kD, kWarps, kMinBlocks, kStages>
      <<<dim3(num_heads, row_tiles, num_seqs), kWarps * 32, kSmem, stream>>>(q, table, num_heads, num_kv_heads,
                                                                             scale_log2, kv, out);
  return cudaGetLastError();
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

size_t attention_prefill_tc_workspace_bytes(const AttentionSeqDesc* seqs_host, int num_seqs, int num_kv_heads,
                                            int head_dim) {
  int64_t blocks = 0;
  for (int s = 0; s < num_seqs; ++s) blocks += KeyBlocks(seqs_host[s]);
  return static_cast<size_t>(blocks) * num_kv_heads * (2 * kKeys * head_dim * sizeof(__nv_bfloat16));
}

cudaError_t launch_attention_prefill_tc(const float* q, const AttentionSeqDesc* seqs_host,
                                        const AttentionSeqDesc* seqs_dev, int num_seqs, int num_heads, int num_kv_heads,
                                        int head_dim, float* out, void* workspace, cudaStream_t stream, bool kv_bf16) {
  if (num_seqs <= 0) return cudaSuccess;
  if (!attention_prefill_tc_supported(seqs_host, num_seqs, num_heads, num_kv_heads, head_dim, q, out))
    return cudaErrorInvalidValue;
  int max_n_new = 0;
  int64_t max_blocks = 0;
  for (int s = 0; s < num_seqs; ++s) {
    max_n_new = std::max(max_n_new, seqs_host[s].n_new);
    max_blocks = std::max(max_blocks, KeyBlocks(seqs_host[s]));
  }
  if (max_n_new <= 0) return cudaSuccess;
  if (workspace == nullptr || !Aligned16(workspace) || max_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  SeqTable table;
  if (!MakeSeqTable(seqs_host, seqs_dev, num_seqs, &table)) return cudaErrorInvalidValue;
  const int mb = static_cast<int>(max_blocks);
  // Launch shapes (head_dim, warps, blocks per SM, stages), measured on an H200 over prefills of
  // 512..8192 tokens against 8 warps and 3 stages: 4 warps (64 query rows) and 2 stages, with 4
  // blocks per SM at head_dim 64 (128 registers) and 2 at head_dim 128 (210 registers).
  if (head_dim == 64)
    return LaunchPrefillTc<64, 4, 4, 2>(q, table, num_seqs, max_n_new, mb, num_heads, num_kv_heads, out, workspace,
                                        stream, kv_bf16);
  return LaunchPrefillTc<128, 4, 2, 2>(q, table, num_seqs, max_n_new, mb, num_heads, num_kv_heads, out, workspace,
                                       stream, kv_bf16);
}

}  // namespace ef::runtime::cuda
