// Decode attention on tensor cores (flash-decoding with mma.sync): the reduced-precision path of a
// decode step over a bf16 KV cache. Every sequence has one new row; its group of query heads that
// share a KV head is the M dimension of the products, so one read of the keys and values serves
// the whole group, and the tensor cores do the arithmetic that bound the fp32 decode kernel (its
// per-thread dot products: ~1 TB/s of K/V for GQA groups of 8 at batch 64).
//
// Grid (num_splits, num_kv_heads, num_seqs), kTcWarps warps. A block owns the keys of one split
// (whole steps of kTcKeys keys) of one (sequence, KV head); warp w takes steps w, w + kTcWarps, ...
// and keeps its own running softmax, so no block barrier runs until the end. Each warp streams its
// steps through kTcStages stages of its own shared memory with cp.async (keys past n_total read
// the last key again and are masked). Per step, with the group's rows r = g and g + 8 (rows past
// the group are zero and never stored):
//   S[r][key] = (scale q_r) . k_key: kD / 16 mma.m16n8k16 per 8 keys, A = the Q fragments (fp32
//     loads rounded to bf16 once, in registers), B = K rows read by ldmatrix;
//   running max and sum per row over the step's 16 keys (shuffles across the 4 lanes of a row);
//   O[r][d] += P[r][key] V[key][d]: the C fragments of the two S tiles are the A fragment of P
//     (rounded to bf16; the sum uses the rounded P, so the weights applied to V sum to one), B = V
//     rows read by ldmatrix.trans, kD / 8 tiles of 8 dimensions.
// The warps' (m, l, O) are merged through shared memory in warp order, then DecodeSplitEpilogue
// writes the row or the split's partials (and the last split block merges), as the fp32 kernel.
//
// Numerics: Q, K, P and V are bf16 (relative error <= 2^-9 each), products and sums fp32: the
// bound of attention_prefill_tc.cu applies. A decode row's result depends on its own sequence and
// on the plan's split count only (not on its batch's other sequences beyond that count).
// Test: tests/gpu/cuda_attention_tc_test.cc (DecodeMatchesCpu).
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "runtime/backend/cuda/attention_seq_table.cuh"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {

constexpr int kTcWarps = 4;
constexpr int kTcKeys = 16;  // keys per warp step: the k of the P.V product
constexpr int kTcStages = 2;
constexpr int kTcPad = 8;  // bf16 per shared row past kD: 16 bytes, so ldmatrix rows hit distinct banks

template <int kD>
constexpr int kRow = kD + kTcPad;
// One stage of one warp: K then V, kTcKeys rows each.
template <int kD>
constexpr int kStageElems = 2 * kTcKeys* kRow<kD>;

template <int kD>
constexpr size_t SmemBytes() {
  return sizeof(uint16_t) * static_cast<size_t>(kTcWarps) * kTcStages * kStageElems<kD>;
}

// Shared memory of the merge after the loop (floats, reusing the stages): per warp O [group][kD],
// m and l [group], the warps' weights [group]; the merged acc [group][kD], ms, ls [group]; then the
// split merge's scratch 2 * group * num_splits.
__host__ __device__ constexpr int64_t MergeFloats(int group, int head_dim, int num_splits) {
  return static_cast<int64_t>(kTcWarps) * group * (head_dim + 3) + static_cast<int64_t>(group) * (head_dim + 2) +
         2LL * group * num_splits;
}

__device__ __forceinline__ float Max4(float a, float b, float c, float d) { return fmaxf(fmaxf(a, b), fmaxf(c, d)); }

template <int kD>
__global__ void __launch_bounds__(kTcWarps * 32)
    AttentionDecodeTcKernel(const float* __restrict__ q, const __grid_constant__ SeqTable seqs, int num_heads,
                            int num_kv_heads, float scale, float* __restrict__ out, float* __restrict__ ws,
                            int64_t ws_rows, int num_splits, unsigned* __restrict__ counters) {
  PdlEnter();
  extern __shared__ float4 smem4[];
  const AttentionSeqDesc sd = seqs[blockIdx.z];
  if (sd.n_new != 1) return;  // block-uniform
  constexpr int kSteps = kD / 16, kTiles = kD / 8;
  const int split = blockIdx.x, kvh = blockIdx.y;
  const int group = num_heads / num_kv_heads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int steps_total = (sd.n_total + kTcKeys - 1) / kTcKeys;
  const int per_split = (steps_total + num_splits - 1) / num_splits;
  const int step_begin = split * per_split, step_end = min(steps_total, step_begin + per_split);

  // Q fragments of rows g and g + 8: qa[s] = {row g at k 16s + 2t, row g + 8, row g at 16s + 2t + 8,
  // row g + 8 at 16s + 2t + 8}, scaled and rounded to bf16.
  const int64_t q_stride = static_cast<int64_t>(num_heads) * kD;
  const float* qg = q + sd.q_row * q_stride + static_cast<int64_t>(kvh) * group * kD;
  uint32_t qa[kSteps][4];
#pragma unroll
  for (int s = 0; s < kSteps; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i & 1), k = 16 * s + 2 * t + 8 * (i >> 1);
      const float2 v = r < group ? *reinterpret_cast<const float2*>(qg + r * kD + k) : make_float2(0.f, 0.f);
      qa[s][i] = PackBf16(v.x * scale, v.y * scale);
    }

  uint16_t* stages = reinterpret_cast<uint16_t*>(smem4) + warp * kTcStages * kStageElems<kD>;
  const int64_t kv_stride = static_cast<int64_t>(num_kv_heads) * kD;
  const uint16_t* kbase = static_cast<const uint16_t*>(sd.k) + kvh * kD;
  const uint16_t* vbase = static_cast<const uint16_t*>(sd.v) + kvh * kD;
  // The copies of step `step` into stage b, one cp.async group (keys past n_total: the last key).
  const auto issue = [&](int step, int b) {
    uint16_t* ks = stages + b * kStageElems<kD>;
    uint16_t* vs = ks + kTcKeys * kRow<kD>;
    constexpr int kChunks = kD / 8;  // 16-byte chunks of a row
#pragma unroll
    for (int i = lane; i < kTcKeys * kChunks; i += 32) {
      const int j = i / kChunks, c = (i % kChunks) * 8;
      const int64_t off = KvRow(sd, min(step * kTcKeys + j, sd.n_total - 1)) * kv_stride + c;
      CpAsync16(ks + j * kRow<kD> + c, kbase + off);
      CpAsync16(vs + j * kRow<kD> + c, vbase + off);
    }
    CpAsyncCommit();
  };

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[kTiles][4];
#pragma unroll
  for (int n = 0; n < kTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  // ldmatrix row addresses: lane i gives row i % 8 of matrix i / 8.
  const int mat = lane >> 3, mrow = lane & 7;
  int b = 0;
  if (step_begin + warp < step_end) issue(step_begin + warp, 0);
  for (int step = step_begin + warp; step < step_end; step += kTcWarps, b ^= 1) {
    if (step + kTcWarps < step_end) {
      issue(step + kTcWarps, b ^ 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncwarp();  // every lane's copies of this stage are visible to the warp
    const uint16_t* ks = stages + b * kStageElems<kD>;
    const uint16_t* vs = ks + kTcKeys * kRow<kD>;
    // S: tile j covers keys 8j..8j+7 of the step; ldmatrix x4 gives b0, b1 of both tiles for one k16
    // step (matrices: keys 0-7 at d, keys 0-7 at d + 8, keys 8-15 at d, keys 8-15 at d + 8).
    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      uint32_t kf[4];
      LdMatrixX4<false>(kf, ks + ((mat >> 1) * 8 + mrow) * kRow<kD> + 16 * s + (mat & 1) * 8);
      MmaBf16(sc[0], qa[s], kf[0], kf[1]);
      MmaBf16(sc[1], qa[s], kf[2], kf[3]);
    }
    // sc[j][0..1]: row g, keys 8j + 2t (+1); sc[j][2..3]: row g + 8, the same keys.
    const int key0 = step * kTcKeys;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (key0 + 8 * j + 2 * t + (e & 1) >= sd.n_total) sc[j][e] = -INFINITY;
    float mx[2] = {Max4(sc[0][0], sc[0][1], sc[1][0], sc[1][1]), Max4(sc[0][2], sc[0][3], sc[1][2], sc[1][3])};
    float corr[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h]);  // finite: key0 < n_total
      corr[h] = m[h] == -INFINITY ? 0.f : expf(m[h] - m_new);
      m[h] = m_new;
    }
    // P as the A fragment of the P.V product: a0 = row g keys 2t, a1 = row g + 8, a2 / a3 keys 8 + 2t.
    float rs[2] = {0.f, 0.f};
    uint32_t pa[4];
    pa[0] = PackBf16Sum(expf(sc[0][0] - m[0]), expf(sc[0][1] - m[0]), rs[0]);
    pa[1] = PackBf16Sum(expf(sc[0][2] - m[1]), expf(sc[0][3] - m[1]), rs[1]);
    pa[2] = PackBf16Sum(expf(sc[1][0] - m[0]), expf(sc[1][1] - m[0]), rs[0]);
    pa[3] = PackBf16Sum(expf(sc[1][2] - m[1]), expf(sc[1][3] - m[1]), rs[1]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      rs[h] += __shfl_xor_sync(0xffffffffu, rs[h], 1);
      rs[h] += __shfl_xor_sync(0xffffffffu, rs[h], 2);
      l[h] = l[h] * corr[h] + rs[h];
    }
    // O = O * corr + P V; ldmatrix.trans x4 gives b0, b1 of two 8-dimension tiles (matrices: keys
    // 0-7 at d, keys 8-15 at d, keys 0-7 at d + 8, keys 8-15 at d + 8).
#pragma unroll
    for (int n = 0; n < kTiles; ++n) {
      o[n][0] *= corr[0];
      o[n][1] *= corr[0];
      o[n][2] *= corr[1];
      o[n][3] *= corr[1];
    }
#pragma unroll
    for (int n2 = 0; n2 < kD / 16; ++n2) {
      uint32_t vf[4];
      LdMatrixX4<true>(vf, vs + ((mat & 1) * 8 + mrow) * kRow<kD> + 16 * n2 + (mat >> 1) * 8);
      MmaBf16(o[2 * n2], pa, vf[0], vf[1]);
      MmaBf16(o[2 * n2 + 1], pa, vf[2], vf[3]);
    }
    __syncwarp();  // the warp is done with stage b before it is refilled
  }

  // Merge the warps in warp order. Every warp's copies are complete (it waited for its last stage).
  __syncthreads();
  float* wo = reinterpret_cast<float*>(smem4);  // [kTcWarps][group][kD]
  float* wm = wo + kTcWarps * group * kD;       // [kTcWarps][group]
  float* wl = wm + kTcWarps * group;
  float* ww = wl + kTcWarps * group;   // the warps' weights exp(m_w - m)
  float* acc = ww + kTcWarps * group;  // [group][kD]
  float* ms = acc + group * kD;
  float* ls = ms + group;
  float* scratch = ls + group;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = g + 8 * h;
    if (r >= group) continue;
    float* dst = wo + (warp * group + r) * kD + 2 * t;
#pragma unroll
    for (int n = 0; n < kTiles; ++n)
      *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(o[n][2 * h], o[n][2 * h + 1]);
    if (t == 0) {
      wm[warp * group + r] = m[h];
      wl[warp * group + r] = l[h];
    }
  }
  __syncthreads();
  for (int r = threadIdx.x; r < group; r += blockDim.x) {
    float mr = -INFINITY;
    for (int w = 0; w < kTcWarps; ++w) mr = fmaxf(mr, wm[w * group + r]);
    float lr = 0.f;
    for (int w = 0; w < kTcWarps; ++w) {
      const float mw = wm[w * group + r];
      const float e = mw == -INFINITY ? 0.f : expf(mw - mr);  // a warp with no keys adds nothing
      ww[w * group + r] = e;
      lr += wl[w * group + r] * e;
    }
    ms[r] = mr;
    ls[r] = lr;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < group * kD; i += blockDim.x) {
    const int r = i / kD;
    float a = 0.f;
    for (int w = 0; w < kTcWarps; ++w) a += wo[w * group * kD + i] * ww[w * group + r];
    acc[i] = a;
  }
  __syncthreads();
  DecodeSplitEpilogue(acc, ms, ls, scratch, sd, kvh, group, num_heads, kD, split, num_splits, ws, ws_rows, counters,
                      num_kv_heads, out);
}

template <int kD>
cudaError_t Launch(const float* q, const SeqTable& table, int num_seqs, const AttentionBatchPlan& plan, int num_heads,
                   int num_kv_heads, float* out, float* workspace, unsigned* counters, cudaStream_t stream) {
  // Idempotent, not stream operations (allowed while a graph is recorded): the limit past 48 KiB,
  // and the largest shared-memory carveout, so that blocks fit an SM as their shared memory
  // allows (3 of head_dim 128) rather than as the driver's default split with L1 would.
  if (SmemBytes<kD>() > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(AttentionDecodeTcKernel<kD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(SmemBytes<kD>()));
    if (e != cudaSuccess) return e;
  }
  if (const cudaError_t e = cudaFuncSetAttribute(
          AttentionDecodeTcKernel<kD>, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
      e != cudaSuccess)
    return e;
  const dim3 grid(plan.num_splits, num_kv_heads, num_seqs);
  const float scale = 1.0f / sqrtf(static_cast<float>(kD));
  return LaunchPdl(AttentionDecodeTcKernel<kD>, grid, dim3(kTcWarps * 32), SmemBytes<kD>(), stream, q, table, num_heads,
                   num_kv_heads, scale, out, workspace, plan.num_rows, plan.num_splits, counters);
}

}  // namespace

bool attention_decode_tc_supported(int num_heads, int num_kv_heads, int head_dim, int num_splits) {
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0) return false;
  const int group = num_heads / num_kv_heads;
  if (group > 16 || (head_dim != 64 && head_dim != 128) || num_splits < 1) return false;
  const size_t smem = head_dim == 64 ? SmemBytes<64>() : SmemBytes<128>();
  return static_cast<size_t>(MergeFloats(group, head_dim, num_splits)) * sizeof(float) <= smem;
}

int attention_decode_tc_keys_per_block() { return kTcWarps * kTcKeys; }

cudaError_t launch_attention_decode_tc(const float* q, const SeqTable& table, int num_seqs,
                                       const AttentionBatchPlan& plan, int num_heads, int num_kv_heads, int head_dim,
                                       float* out, float* workspace, unsigned* counters, cudaStream_t stream) {
  if (!attention_decode_tc_supported(num_heads, num_kv_heads, head_dim, plan.num_splits) ||
      (plan.num_splits > 1 && workspace == nullptr) || reinterpret_cast<uintptr_t>(q) % 8 != 0)
    return cudaErrorInvalidValue;
  if (head_dim == 64)
    return Launch<64>(q, table, num_seqs, plan, num_heads, num_kv_heads, out, workspace, counters, stream);
  return Launch<128>(q, table, num_seqs, plan, num_heads, num_kv_heads, out, workspace, counters, stream);
}

}  // namespace ef::runtime::cuda
