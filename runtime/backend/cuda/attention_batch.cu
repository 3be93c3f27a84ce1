// Causal GQA attention of a batch of sequences in one launch (Backend::Attention is the batch of
// one), with two kernels sharing one plan, one workspace layout and one merge kernel:
//
// General (prefill chunks, mixes): online softmax over K/V tiles in shared memory, the query rows
// of one KV head sharing each tile. Grid (ceil(max_n_new * group / kRows), num_kv_heads,
// num_seqs * num_splits), kWarps * 32 threads; blockIdx.z = seq * num_splits + split. Blocks past
// their sequence's rows exit at once (ragged chunks). Static shared memory <= 41 KiB.
//
// Decode (every sequence has one new row; flash-decoding): one block per (key split, KV head,
// sequence) holds the group's query heads, streams its split of the context in tiles of up to 32
// keys (cp.async into two shared buffers: the next tile's copies in flight while the current one is
// computed), scores every (head, key) pair, keeps running softmax stats per head and accumulates
// P.V; it serves the whole group from one read of K/V. Grid (num_splits, num_kv_heads, num_seqs),
// kDecodeThreads threads, dynamic shared memory <= 48 KiB where tiles of 8 keys fit it (the plan
// picks the tile: 16 keys of an fp32 cache with head_dim 128, 32 of a bf16 one), else up to 96 KiB.
//
// Splits: while the real blocks do not fill the SMs, the context is cut into num_splits equal
// chunks (a split gets ceil(n_total / num_splits) keys, possibly none); each split writes
// (acc..., m, l) to the workspace [split][row][head][head_dim + 2] with row the batch row
// q_row + i. The general kernel's splits are merged by a second kernel (one block per (i, head,
// sequence)); the decode kernel's by the last of its split blocks to finish (a counter per
// (sequence, KV head) that the merging block resets), saving a launch. Either merge adds the
// splits in split order, so results do not depend on which block finishes last.
//
// Descriptors: up to kAttentionInlineSeqs sequences travel in the kernels' parameters (no copy
// before the launch); more are read from a device copy. head_dim <= 256.
// Test: tests/gpu/cuda_attention_batch_test.cc (vs the CPU backend on ragged prefill/decode
// mixes, GQA groups 1/4/8, head_dim 64/128/256, long single-sequence contexts, with and without
// splits) and tests/gpu/cuda_ops_test.cc (single sequences).
#include <algorithm>
#include <cmath>

#include "runtime/backend/cuda/attention_seq_table.cuh"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
constexpr int kWarps = 4;
constexpr int kMaxGridZ = 65535;
constexpr int kMaxSplits = 64;

constexpr int kDecodeThreads = 128;
constexpr int kDecodeMaxTile = 32;  // one lane per key in the softmax step
// Tiles shrink to fit the default 48 KiB of shared memory (less the kernel's static 16 bytes), down
// to 8 keys; a shape whose 8-key tiles do not fit takes up to kDecodeOptInSmemBytes (the launch
// raises the kernel's limit), then tiles down to 4 keys.
constexpr int kDecodeMinTile = 4;
constexpr int kDecodeOptInMinTile = 8;
constexpr size_t kDecodeStaticSmemBytes = 16;
constexpr size_t kDecodeMaxSmemBytes = 48 * 1024 - kDecodeStaticSmemBytes;
constexpr size_t kDecodeOptInSmemBytes = 96 * 1024;
// Registers are capped so that many blocks fit an SM (left to itself the compiler took 252 per
// thread, two blocks per SM: 12% occupancy and ~1 TB/s of K/V at batch 64). 5: 96 registers, as
// many blocks as the shared memory of two 16-key fp32 tiles allows.
constexpr int kDecodeMinBlocksPerSm = 5;
static_assert(kDecodeMaxTile <= 32 && kDecodeThreads % 32 == 0, "decode softmax maps one lane to one key");

// The decode kernel's shared memory: q and acc [group][head_dim] (fp32), two K tiles
// [tile][head_dim + pad] and two V tiles [tile][head_dim] in the cache's element type (pad: 16
// bytes, so the row-per-thread score reads are conflict-free), scores [group][tile], and m, l,
// rescale per head.
__host__ __device__ constexpr int DecodeKStride(int head_dim, int elem_bytes) { return head_dim + 16 / elem_bytes; }
size_t DecodeSmemBytes(int group, int head_dim, int tile, int elem_bytes) {
  return sizeof(float) * static_cast<size_t>(2 * group * head_dim + group * tile + 3 * group) +
         static_cast<size_t>(elem_bytes) * 2 * tile * (DecodeKStride(head_dim, elem_bytes) + head_dim);
}

// The decode kernel's own merge stages (m, l) of every split of the group's heads in the K tiles.
bool DecodeMergeFits(int group, int head_dim, int tile, int num_splits, int elem_bytes) {
  return sizeof(float) * 2 * static_cast<int64_t>(group) * num_splits <=
         static_cast<int64_t>(elem_bytes) * 2 * tile * DecodeKStride(head_dim, elem_bytes);
}

// Four values of a K/V tile row as fp32 (T: float for an fp32 cache, uint16_t bf16 bits), p
// 4-value aligned.
template <typename T>
__device__ __forceinline__ float4 KvValue4(const T* p) {
  if constexpr (sizeof(T) == 4)
    return *reinterpret_cast<const float4*>(p);
  else
    return Bf16x4ToFloat4(*reinterpret_cast<const uint2*>(p));
}

// The decode kernel (see the top of the file). T is the cache's element type. Tiles are copied
// global -> shared with cp.async, double-buffered: the next tile's copies are in flight while the
// block scores and accumulates the current one, so HBM stays busy through the compute phases (the
// previous version loaded a tile through registers, then computed it, and read ~1.5 TB/s of K/V at
// batch 64). Per tile: scores, running softmax, P.V as before, so the sums are those of any
// one-tile-at-a-time pass with the same tile size.
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads, kDecodeMinBlocksPerSm)
    AttentionDecodeKernel(const float* __restrict__ q, const __grid_constant__ SeqTable seqs, int num_heads,
                          int num_kv_heads, int head_dim, int tile, float scale, float* __restrict__ out,
                          float* __restrict__ ws, int64_t ws_rows, int num_splits, unsigned* __restrict__ counters) {
  PdlEnter();
  extern __shared__ float4 smem4[];
  const AttentionSeqDesc sd = seqs[blockIdx.z];
  if (sd.n_new != 1) return;  // block-uniform: a sequence with no new row has nothing to write
  const int split = blockIdx.x, kvh = blockIdx.y;
  const int group = num_heads / num_kv_heads, d4 = head_dim / 4;
  const int chunk = (sd.n_total + num_splits - 1) / num_splits;
  const int key_begin = split * chunk, key_end = min(sd.n_total, key_begin + chunk);
  const int kstride = DecodeKStride(head_dim, static_cast<int>(sizeof(T)));
  float* qs = reinterpret_cast<float*>(smem4);
  float* acc = qs + group * head_dim;
  T* kb = reinterpret_cast<T*>(acc + group * head_dim);  // [2][tile][kstride]
  T* vb = kb + 2 * tile * kstride;                       // [2][tile][head_dim]
  float* ps = reinterpret_cast<float*>(vb + 2 * tile * head_dim);
  float* ms = ps + group * tile;
  float* ls = ms + group;
  float* cs = ls + group;
  const int64_t q_stride = static_cast<int64_t>(num_heads) * head_dim;
  const int64_t kv_stride = static_cast<int64_t>(num_kv_heads) * head_dim;
  // The group's query heads are contiguous in the row: heads kvh * group ... kvh * group + group - 1.
  const float4* qrow = reinterpret_cast<const float4*>(q + sd.q_row * q_stride + kvh * group * head_dim);
  for (int t = threadIdx.x; t < group * d4; t += blockDim.x) {
    reinterpret_cast<float4*>(qs)[t] = qrow[t];
    reinterpret_cast<float4*>(acc)[t] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (threadIdx.x < group) {
    ms[threadIdx.x] = -INFINITY;
    ls[threadIdx.x] = 0.f;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, num_warps = blockDim.x >> 5;
  const T* kbase = static_cast<const T*>(sd.k) + kvh * head_dim;
  const T* vbase = static_cast<const T*>(sd.v) + kvh * head_dim;
  // Copies of 16 bytes, or 8 for a bf16 row that does not cut at 8 values. Where the block's
  // threads cover whole rows (dc divides the block), a thread keeps one chunk column and steps over
  // rows, so the copy loop has no division.
  const bool wide = sizeof(T) == 4 || head_dim % 8 == 0;
  const int cv = wide ? 16 / static_cast<int>(sizeof(T)) : 4, dc = head_dim / cv;
  const bool rows_per_pass = blockDim.x % dc == 0;
  const int my_c = (threadIdx.x % dc) * cv, my_j = threadIdx.x / dc, row_step = blockDim.x / dc;
  const auto copy = [&](T* kd, T* vd, int j, int c, int64_t key) {
    const int64_t off = KvRow(sd, key) * kv_stride + c;
    if (wide) {
      CpAsync16(kd + j * kstride + c, kbase + off);
      CpAsync16(vd + j * head_dim + c, vbase + off);
    } else {
      CpAsync8(kd + j * kstride + c, kbase + off);
      CpAsync8(vd + j * head_dim + c, vbase + off);
    }
  };
  // Starts the copies of keys [t0, t0 + tile) into buffer b, as one cp.async group.
  const auto issue = [&](int t0, int b) {
    const int nk = min(tile, key_end - t0);
    T* kd = kb + b * tile * kstride;
    T* vd = vb + b * tile * head_dim;
    if (rows_per_pass) {
      for (int j = my_j; j < nk; j += row_step) copy(kd, vd, j, my_c, t0 + j);
    } else {
      for (int t = threadIdx.x; t < nk * dc; t += blockDim.x) copy(kd, vd, t / dc, (t % dc) * cv, t0 + t / dc);
    }
    CpAsyncCommit();
  };

  int buf = 0;
  if (key_begin < key_end) issue(key_begin, 0);
  for (int t0 = key_begin; t0 < key_end; t0 += tile, buf ^= 1) {
    const int nk = min(tile, key_end - t0);
    // Only this tile's copies are in flight (the next one is issued below).
    CpAsyncWait<0>();
    // The tile is visible to every thread, and every thread is done with the other buffer (the
    // previous tile) and with the scores (first pass: q, acc and stats are set).
    __syncthreads();
    if (t0 + tile < key_end) issue(t0 + tile, buf ^ 1);
    const T* ks = kb + buf * tile * kstride;
    const T* vs = vb + buf * tile * head_dim;
    // Scores: one (head, key) pair per thread.
    for (int o = threadIdx.x; o < group * nk; o += blockDim.x) {
      const int g = o / nk, j = o % nk;
      const float4* qa = reinterpret_cast<const float4*>(qs + g * head_dim);
      const T* ka = ks + j * kstride;
      float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;  // four chains: the loop is latency-bound
      const auto dot4 = [&](const float4& a, const float4& b) {
        d0 += a.x * b.x;
        d1 += a.y * b.y;
        d2 += a.z * b.z;
        d3 += a.w * b.w;
      };
      if (sizeof(T) == 2 && wide) {
        // 16-byte reads of 8 bf16 values (8-byte reads of a row padded by 16 bytes would hit two
        // lanes per bank); the same products in the same order as the 4-value steps.
        for (int c = 0; c < d4; c += 2) {
          const uint4 b = *reinterpret_cast<const uint4*>(ka + 4 * c);
          dot4(qa[c], Bf16x4ToFloat4(make_uint2(b.x, b.y)));
          dot4(qa[c + 1], Bf16x4ToFloat4(make_uint2(b.z, b.w)));
        }
      } else {
        for (int c = 0; c < d4; ++c) dot4(qa[c], KvValue4(ka + 4 * c));
      }
      ps[g * tile + j] = ((d0 + d1) + (d2 + d3)) * scale;
    }
    __syncthreads();
    // Running softmax: one warp per head, one lane per key.
    for (int g = warp; g < group; g += num_warps) {
      const float s = lane < nk ? ps[g * tile + lane] : -INFINITY;
      const float m_old = ms[g];
      const float m_new = fmaxf(m_old, WarpMax(s));
      const float p = lane < nk ? expf(s - m_new) : 0.f;
      const float corr = (m_old == -INFINITY) ? 0.f : expf(m_old - m_new);
      const float sum = WarpSum(p);
      if (lane < nk) ps[g * tile + lane] = p;
      // Every lane has read ms[g] before lane 0 overwrites it: __syncwarp orders the warp's shared
      // memory accesses, the shuffles are not documented to (racecheck flagged the read, then write).
      __syncwarp();
      if (lane == 0) {
        ms[g] = m_new;
        ls[g] = ls[g] * corr + sum;
        cs[g] = corr;
      }
    }
    __syncthreads();
    // acc = acc * rescale + P.V: a thread owns 4 dimensions of one head (the same on every pass)
    // and reads V 16 bytes at a time; a warp's lanes share the head, so its score is one broadcast.
    for (int o4 = threadIdx.x; o4 < group * d4; o4 += blockDim.x) {
      const int g = o4 / d4, c = o4 % d4;
      const float corr = cs[g];
      float4 a = reinterpret_cast<float4*>(acc)[o4];
      a.x *= corr;
      a.y *= corr;
      a.z *= corr;
      a.w *= corr;
      const float* pg = ps + g * tile;
      const T* vc = vs + 4 * c;
#pragma unroll 4
      for (int j = 0; j < nk; ++j) {
        const float p = pg[j];
        const float4 v = KvValue4(vc + j * head_dim);
        a.x += p * v.x;
        a.y += p * v.y;
        a.z += p * v.z;
        a.w += p * v.w;
      }
      reinterpret_cast<float4*>(acc)[o4] = a;
    }
  }
  __syncthreads();  // final stats visible to every thread; no copy is in flight
  // The merge stages (m, l) of every split in the free K tiles (the plan checks the room).
  DecodeSplitEpilogue(acc, ms, ls, reinterpret_cast<float*>(kb), sd, kvh, group, num_heads, head_dim, split, num_splits,
                      ws, ws_rows, counters, num_kv_heads, out);
}

template <int kMaxD, int kTile, int kRows>
__global__ void __launch_bounds__(kWarps * 32)
    AttentionBatchKernel(const float* __restrict__ q, const __grid_constant__ SeqTable seqs, int num_heads,
                         int num_kv_heads, int head_dim, float scale, float* __restrict__ out, float* __restrict__ ws,
                         int64_t ws_rows, int num_splits, bool kv_bf16) {
  constexpr int kPerLane = kMaxD / 32;
  constexpr int kRowsPerWarp = kRows / kWarps;
  __shared__ float ks[kTile][kMaxD + 1];
  __shared__ float vs[kTile][kMaxD];
  __shared__ float qs[kRows][kMaxD];

  const int seq = blockIdx.z / num_splits, split = blockIdx.z % num_splits;
  const AttentionSeqDesc sd = seqs[seq];
  const int n_new = sd.n_new, n_total = sd.n_total;
  const int group = num_heads / num_kv_heads;
  const int kvh = blockIdx.y;
  const int total_rows = n_new * group;
  const int row0 = blockIdx.x * kRows;
  if (row0 >= total_rows) return;  // block-uniform, before any barrier
  const float* __restrict__ k = static_cast<const float*>(sd.k);
  const float* __restrict__ v = static_cast<const float*>(sd.v);
  const __nv_bfloat16* __restrict__ k16 = static_cast<const __nv_bfloat16*>(sd.k);
  const __nv_bfloat16* __restrict__ v16 = static_cast<const __nv_bfloat16*>(sd.v);
  const int offset = n_total - n_new;
  const int q_stride = num_heads * head_dim, kv_stride = num_kv_heads * head_dim;
  const float* qseq = q + sd.q_row * q_stride;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  for (int t = threadIdx.x; t < kRows * head_dim; t += blockDim.x) {
    const int r = t / head_dim, d = t % head_dim, row = row0 + r;
    float val = 0.f;
    if (row < total_rows) {
      const int i = row / group, h = kvh * group + row % group;
      val = qseq[static_cast<int64_t>(i) * q_stride + h * head_dim + d];
    }
    qs[r][d] = val;
  }

  const int last_row = min(row0 + kRows, total_rows) - 1;
  const int key_end_block = offset + last_row / group + 1;
  const int chunk = (n_total + num_splits - 1) / num_splits;
  const int key_begin = split * chunk;
  const int key_end = min(key_end_block, (split + 1) * chunk);

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
  int limit[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
    const int row = row0 + rr * kWarps + warp;
    limit[rr] = row < total_rows ? offset + row / group + 1 : 0;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) acc[rr][c] = 0.f;
  }

  for (int t0 = key_begin; t0 < key_end; t0 += kTile) {
    __syncthreads();  // previous tile consumed (and, on the first pass, qs written)
    for (int t = threadIdx.x; t < kTile * head_dim; t += blockDim.x) {
      const int j = t / head_dim, d = t % head_dim, key = t0 + j;
      float kv = 0.f, vv = 0.f;
      if (key < key_end) {
        const int64_t off = KvRow(sd, key) * kv_stride + kvh * head_dim + d;
        kv = kv_bf16 ? __bfloat162float(k16[off]) : k[off];
        vv = kv_bf16 ? __bfloat162float(v16[off]) : v[off];
      }
      ks[j][d] = kv;
      vs[j][d] = vv;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = rr * kWarps + warp;
      const int lim = min(limit[rr], key_end);
      if (t0 >= lim) continue;  // warp-uniform
      float s = -INFINITY;
      if (lane < kTile && t0 + lane < lim) {
        float dot = 0.f;
        for (int d = 0; d < head_dim; ++d) dot += qs[r][d] * ks[lane][d];
        s = dot * scale;
      }
      const float m_new = fmaxf(m[rr], WarpMax(s));
      const float p = (s == -INFINITY) ? 0.f : expf(s - m_new);
      const float corr = (m[rr] == -INFINITY) ? 0.f : expf(m[rr] - m_new);
      l[rr] = l[rr] * corr + WarpSum(p);
      m[rr] = m_new;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) acc[rr][c] *= corr;
      const int nkeys = min(kTile, lim - t0);
      for (int j = 0; j < nkeys; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
          const int d = lane + 32 * c;
          if (d < head_dim) acc[rr][c] += pj * vs[j][d];
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int row = row0 + rr * kWarps + warp;
    if (row >= total_rows) continue;
    const int i = row / group, h = kvh * group + row % group;
    const int64_t brow = sd.q_row + i;  // row of the batch
    if (num_splits == 1) {
      const float inv = 1.0f / l[rr];
      float* o = out + brow * q_stride + h * head_dim;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int d = lane + 32 * c;
        if (d < head_dim) o[d] = acc[rr][c] * inv;
      }
    } else {
      float* w = ws + ((static_cast<int64_t>(split) * ws_rows + brow) * num_heads + h) * (head_dim + 2);
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int d = lane + 32 * c;
        if (d < head_dim) w[d] = acc[rr][c];
      }
      if (lane == 0) {
        w[head_dim] = m[rr];
        w[head_dim + 1] = l[rr];
      }
    }
  }
}

// Merges the splits of one (i, head) row of sequence blockIdx.y: one thread per dimension.
__global__ void AttentionBatchCombineKernel(const float* __restrict__ ws, const __grid_constant__ SeqTable seqs,
                                            int64_t ws_rows, int num_heads, int head_dim, int num_splits,
                                            float* __restrict__ out) {
  const AttentionSeqDesc sd = seqs[blockIdx.y];
  const int i = blockIdx.x / num_heads, h = blockIdx.x % num_heads;
  if (i >= sd.n_new) return;
  const int64_t row = (sd.q_row + i) * num_heads + h;
  const int64_t split_stride = ws_rows * num_heads * (head_dim + 2);
  const float* w0 = ws + row * (head_dim + 2);
  float mx = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, w0[s * split_stride + head_dim]);
  float denom = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float ms = w0[s * split_stride + head_dim];
    if (ms != -INFINITY) denom += w0[s * split_stride + head_dim + 1] * expf(ms - mx);
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float ms = w0[s * split_stride + head_dim];
      if (ms != -INFINITY) o += w0[s * split_stride + d] * expf(ms - mx);
    }
    out[row * head_dim + d] = o / denom;
  }
}

template <int kMaxD, int kTile, int kRows>
void Launch(const float* q, const SeqTable& seqs, int num_seqs, const AttentionBatchPlan& plan, int num_heads,
            int num_kv_heads, int head_dim, float* out, float* ws, cudaStream_t stream, bool kv_bf16) {
  const int group = num_heads / num_kv_heads;
  dim3 grid((plan.max_n_new * group + kRows - 1) / kRows, num_kv_heads, num_seqs * plan.num_splits);
  const float scale = 1.0f / sqrtf(static_cast<float>(head_dim));
  AttentionBatchKernel<kMaxD, kTile, kRows><<<grid, kWarps * 32, 0, stream>>>(
      q, seqs, num_heads, num_kv_heads, head_dim, scale, out, ws, plan.num_rows, plan.num_splits, kv_bf16);
}

constexpr int RowsFor(int head_dim) { return head_dim <= 128 ? 16 : 8; }
}  // namespace

AttentionBatchPlan plan_attention_batch(const AttentionSeqDesc* seqs_host, int num_seqs, int num_heads,
                                        int num_kv_heads, int head_dim, int num_sms, bool kv_bf16,
                                        int decode_blocks_per_sm, bool decode_tensor_cores) {
  AttentionBatchPlan plan;
  const int elem_bytes = kv_bf16 ? 2 : 4;
  if (num_seqs <= 0 || num_kv_heads <= 0) return plan;
  const int group = num_heads / num_kv_heads, rows = RowsFor(head_dim);
  int64_t blocks = 0, active = 0;
  int max_total = 0;
  bool aligned = true;
  for (int s = 0; s < num_seqs; ++s) {
    const AttentionSeqDesc& d = seqs_host[s];
    if (d.n_new <= 0) continue;
    ++active;
    plan.max_n_new = std::max(plan.max_n_new, d.n_new);
    plan.num_rows = std::max(plan.num_rows, d.q_row + d.n_new);
    max_total = std::max(max_total, d.n_total);
    blocks += static_cast<int64_t>(d.n_new * group + rows - 1) / rows * num_kv_heads;
    aligned = aligned && reinterpret_cast<uintptr_t>(d.k) % 16 == 0 && reinterpret_cast<uintptr_t>(d.v) % 16 == 0;
  }
  if (plan.max_n_new == 1 && head_dim > 0 && head_dim % 4 == 0 && aligned && num_heads % num_kv_heads == 0) {
    int tile = kDecodeMaxTile;
    while (tile > kDecodeOptInMinTile && DecodeSmemBytes(group, head_dim, tile, elem_bytes) > kDecodeMaxSmemBytes)
      tile /= 2;
    while (tile > kDecodeMinTile && DecodeSmemBytes(group, head_dim, tile, elem_bytes) > kDecodeOptInSmemBytes)
      tile /= 2;
    if (DecodeSmemBytes(group, head_dim, tile, elem_bytes) <= kDecodeOptInSmemBytes) {
      plan.decode = true;
      plan.decode_tile = tile;
    }
    plan.decode_tc = plan.decode && decode_tensor_cores && kv_bf16 &&
                     attention_decode_tc_supported(num_heads, num_kv_heads, head_dim, 1);
  }
  const int max_splits = std::min(kMaxSplits, kMaxGridZ / num_seqs);
  if (plan.decode) {
    // Enough splits for decode_blocks_per_sm blocks per SM (several blocks per SM keep loads in
    // flight while others compute), each split at least one tile of keys.
    const int64_t decode_blocks = active * num_kv_heads,
                  target = static_cast<int64_t>(std::max(0, decode_blocks_per_sm)) * num_sms;
    if (decode_blocks < target) {
      // No more splits than the longest context has keys per tensor-core block (a 16-key step per
      // warp) or per fp32 tile.
      const int keys = plan.decode_tc ? attention_decode_tc_keys_per_block() : plan.decode_tile;
      int64_t splits = (target + decode_blocks - 1) / decode_blocks;
      splits = std::min<int64_t>(splits, (max_total + keys - 1) / keys);
      plan.num_splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(splits, max_splits)));
      if (plan.decode_tc && !attention_decode_tc_supported(num_heads, num_kv_heads, head_dim, plan.num_splits))
        plan.decode_tc = false;
    }
  } else if (blocks > 0 && blocks < num_sms) {
    // Enough splits to fill the SMs about twice, each split at least 64 keys.
    int splits = static_cast<int>((2 * num_sms + blocks - 1) / blocks);
    splits = std::min(splits, std::max(1, max_total / 64));
    plan.num_splits = std::max(1, std::min(splits, max_splits));
  }
  if (plan.num_splits > 1) {
    plan.workspace_floats = static_cast<size_t>(plan.num_splits) * plan.num_rows * num_heads * (head_dim + 2);
    if (plan.decode_tc ||
        (plan.decode && DecodeMergeFits(group, head_dim, plan.decode_tile, plan.num_splits, elem_bytes)))
      plan.num_counters = static_cast<int64_t>(num_seqs) * num_kv_heads;
  }
  return plan;
}

namespace {

cudaError_t LaunchAttention(const float* q, const SeqTable& table, int num_seqs, const AttentionBatchPlan& plan,
                            int num_heads, int num_kv_heads, int head_dim, float* out, float* workspace,
                            unsigned* counters, cudaStream_t stream, bool kv_bf16) {
  if (num_seqs <= 0 || plan.max_n_new <= 0) return cudaSuccess;
  if (head_dim <= 0 || head_dim > 256 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || plan.num_splits < 1 ||
      static_cast<int64_t>(num_seqs) * plan.num_splits > kMaxGridZ ||
      num_heads * static_cast<int64_t>(plan.max_n_new) > 0x7fffffff)
    return cudaErrorInvalidValue;
  if (plan.num_splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  const int group = num_heads / num_kv_heads, elem_bytes = kv_bf16 ? 2 : 4;
  const size_t decode_smem = DecodeSmemBytes(group, head_dim, plan.decode_tile, elem_bytes);
  // A plan made for the other cache dtype may not fit the decode kernel: the general one serves.
  const bool decode = plan.decode && plan.max_n_new == 1 && plan.decode_tile >= 1 &&
                      plan.decode_tile <= kDecodeMaxTile && head_dim % 4 == 0 && decode_smem <= kDecodeOptInSmemBytes &&
                      reinterpret_cast<uintptr_t>(q) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  // The decode kernel merges its own splits when it has the counters and the room.
  const bool merged =
      decode && (plan.num_splits == 1 || (counters != nullptr && DecodeMergeFits(group, head_dim, plan.decode_tile,
                                                                                 plan.num_splits, elem_bytes)));
  if (decode && kv_bf16 && plan.decode_tc) {
    // The tensor-core decode kernel always merges its own splits when it has the counters.
    const bool tc_merged = plan.num_splits == 1 || counters != nullptr;
    const cudaError_t e = launch_attention_decode_tc(q, table, num_seqs, plan, num_heads, num_kv_heads, head_dim, out,
                                                     workspace, tc_merged ? counters : nullptr, stream);
    if (e != cudaSuccess) return e;
    if (plan.num_splits > 1 && !tc_merged) {
      dim3 grid(plan.max_n_new * num_heads, num_seqs);
      AttentionBatchCombineKernel<<<grid, head_dim <= 128 ? 128 : 256, 0, stream>>>(
          workspace, table, plan.num_rows, num_heads, head_dim, plan.num_splits, out);
    }
    return cudaGetLastError();
  }
  if (decode) {
    // Past the default limit the kernel's own limit is raised (idempotent, not a stream operation).
    if (decode_smem > kDecodeMaxSmemBytes) {
      const cudaError_t e =
          kv_bf16 ? cudaFuncSetAttribute(AttentionDecodeKernel<uint16_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kDecodeOptInSmemBytes))
                  : cudaFuncSetAttribute(AttentionDecodeKernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kDecodeOptInSmemBytes));
      if (e != cudaSuccess) return e;
    }
    dim3 grid(plan.num_splits, num_kv_heads, num_seqs);
    unsigned* const merge_counters = merged ? counters : nullptr;
    const float scale = 1.0f / sqrtf(static_cast<float>(head_dim));
    const int64_t ws_rows = plan.num_rows;
    const cudaError_t e = kv_bf16 ? LaunchPdl(AttentionDecodeKernel<uint16_t>, grid, dim3(kDecodeThreads), decode_smem,
                                              stream, q, table, num_heads, num_kv_heads, head_dim, plan.decode_tile,
                                              scale, out, workspace, ws_rows, plan.num_splits, merge_counters)
                                  : LaunchPdl(AttentionDecodeKernel<float>, grid, dim3(kDecodeThreads), decode_smem,
                                              stream, q, table, num_heads, num_kv_heads, head_dim, plan.decode_tile,
                                              scale, out, workspace, ws_rows, plan.num_splits, merge_counters);
    if (e != cudaSuccess) return e;
  } else if (head_dim <= 32) {
    Launch<32, 32, 16>(q, table, num_seqs, plan, num_heads, num_kv_heads, head_dim, out, workspace, stream, kv_bf16);
  } else if (head_dim <= 64) {
    Launch<64, 32, 16>(q, table, num_seqs, plan, num_heads, num_kv_heads, head_dim, out, workspace, stream, kv_bf16);
  } else if (head_dim <= 128) {
    Launch<128, 32, 16>(q, table, num_seqs, plan, num_heads, num_kv_heads, head_dim, out, workspace, stream, kv_bf16);
  } else {
    Launch<256, 16, 8>(q, table, num_seqs, plan, num_heads, num_kv_heads, head_dim, out, workspace, stream, kv_bf16);
  }
  if (plan.num_splits > 1 && !merged) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    dim3 grid(plan.max_n_new * num_heads, num_seqs);
    AttentionBatchCombineKernel<<<grid, head_dim <= 128 ? 128 : 256, 0, stream>>>(
        workspace, table, plan.num_rows, num_heads, head_dim, plan.num_splits, out);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_attention_batch(const float* q, const AttentionSeqDesc* seqs_host, const AttentionSeqDesc* seqs_dev,
                                   int num_seqs, const AttentionBatchPlan& plan, int num_heads, int num_kv_heads,
                                   int head_dim, float* out, float* workspace, unsigned* counters, cudaStream_t stream,
                                   bool kv_bf16) {
  if (num_seqs <= 0 || plan.max_n_new <= 0) return cudaSuccess;
  SeqTable table;
  if (!MakeSeqTable(seqs_host, seqs_dev, num_seqs, &table)) return cudaErrorInvalidValue;
  return LaunchAttention(q, table, num_seqs, plan, num_heads, num_kv_heads, head_dim, out, workspace, counters, stream,
                         kv_bf16);
}

cudaError_t launch_attention_step(const float* q, const AttentionSeqDesc* seqs_dev, int num_seqs,
                                  const AttentionBatchPlan& plan, const void* k_pool, const void* v_pool, int num_heads,
                                  int num_kv_heads, int head_dim, float* out, float* workspace, unsigned* counters,
                                  cudaStream_t stream, bool kv_bf16) {
  if (num_seqs <= 0 || plan.max_n_new <= 0) return cudaSuccess;
  if (seqs_dev == nullptr || k_pool == nullptr || v_pool == nullptr) return cudaErrorInvalidValue;
  SeqTable table{};
  table.dev = seqs_dev;
  table.k_pool = k_pool;
  table.v_pool = v_pool;
  return LaunchAttention(q, table, num_seqs, plan, num_heads, num_kv_heads, head_dim, out, workspace, counters, stream,
                         kv_bf16);
}

}  // namespace ef::runtime::cuda
