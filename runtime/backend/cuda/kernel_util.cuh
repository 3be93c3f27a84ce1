// Device helpers shared by the kernels of this folder (included by .cu files only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/core/dtype.h"

namespace ef::runtime::cuda {

// Element i of a F32/F16/BF16 array as fp32.
__device__ __forceinline__ float LoadAsF32(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// Two floats as a bf16 pair (nearest even), lo at the lower address: one 32-bit word of a store.
__device__ __forceinline__ unsigned PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&v);
}

// One float rounded to bf16 (nearest even), as the 16 bits a bf16 array stores.
__device__ __forceinline__ uint16_t Bf16Bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

// Four values rounded to bf16 (nearest even) at p: one 8-byte store where p allows it, else four.
__device__ __forceinline__ void StoreBf16x4(uint16_t* p, float4 v) {
  if (reinterpret_cast<uintptr_t>(p) % 8 == 0) {
    *reinterpret_cast<uint2*>(p) = make_uint2(PackBf16(v.x, v.y), PackBf16(v.z, v.w));
  } else {
    p[0] = Bf16Bits(v.x);
    p[1] = Bf16Bits(v.y);
    p[2] = Bf16Bits(v.z);
    p[3] = Bf16Bits(v.w);
  }
}

// As PackBf16, adding the rounded values to `sum`.
__device__ __forceinline__ unsigned PackBf16Sum(float lo, float hi, float& sum) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  const float2 r = __bfloat1622float2(v);
  sum += r.x + r.y;
  return *reinterpret_cast<const unsigned*>(&v);
}

// d += a * b for one mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 tile: bf16 a (4 words)
// and b (2 words), fp32 d. Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
// point type"), g = lane / 4, t = lane % 4, a word holding two bf16 with the lower index low:
//   A (16 x 16, row-major):  a0 = A[g][2t, 2t+1]   a1 = A[g+8][2t, 2t+1]
//                            a2 = A[g][2t+8, +9]   a3 = A[g+8][2t+8, +9]
//   B (16 x 8, k-major per column n):  b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   C/D (16 x 8, fp32):      c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane i gives the address of row i % 8 of 8x8
// matrix i / 8 (16 contiguous bytes, 16-byte aligned); r[j] receives matrix j's elements (g, 2t)
// and (g, 2t + 1), or with kTrans those of its transpose: (2t, g) and (2t + 1, g).
template <bool kTrans>
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem_row) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// Four bf16 values (8 bytes, the first in the low half of x) as a float4.
__device__ __forceinline__ float4 Bf16x4ToFloat4(uint2 u) {
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                     __uint_as_float(u.y & 0xffff0000u));
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The end of a split-K GEMV row (gemv_quant.cu, gemv_block_scaled.cu): `acc` holds lane partial
// sums of kM output rows for weight row `row`, computed by warp `warp` of a block of kWarps warps
// in which kSplit consecutive warps share a row (`part` = warp % kSplit). Each warp reduces by
// shuffles; with a split, the row's partials are added in warp order through shared memory
// (a fixed order, independent of kM). Every warp of the block must call it (it may hold a barrier).
template <int kWarps, int kM, int kSplit>
__device__ __forceinline__ void StoreGemvRow(float (&acc)[kM], int warp, int lane, int part, int row, bool valid,
                                             float* __restrict__ y, int n, bool accumulate) {
#pragma unroll
  for (int m = 0; m < kM; ++m) acc[m] = WarpSum(acc[m]);
  if constexpr (kSplit == 1) {
    if (valid && lane == 0) {
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        float* dst = y + static_cast<int64_t>(m) * n + row;
        *dst = accumulate ? *dst + acc[m] : acc[m];
      }
    }
  } else {
    __shared__ float partial[kWarps][kM];
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < kM; ++m) partial[warp][m] = acc[m];
    }
    __syncthreads();
    // Lane m of the row's first warp adds the partials in warp order.
    if (valid && part == 0 && lane < kM) {
      float s = partial[warp][lane];
#pragma unroll
      for (int p = 1; p < kSplit; ++p) s += partial[warp + p][lane];
      float* dst = y + static_cast<int64_t>(lane) * n + row;
      *dst = accumulate ? *dst + s : s;
    }
  }
}

// Programmatic dependent launch (Hopper and later). A kernel launched with LaunchPdl may be
// scheduled while the kernel before it on the stream is still running; it must call PdlEnter()
// before it touches global memory: PdlEnter waits until the previous grid has completed and its
// writes are visible (griddepcontrol.wait), then lets the next PDL launch be scheduled
// (griddepcontrol.launch_dependents), whose blocks in turn wait in their PdlEnter. What this buys
// is the gap between dependent kernels (launch, block scheduling, prologue), a few microseconds
// each: most of a decode step's small ops. Stream order is otherwise unchanged. On older GPUs
// (and for kernels launched the usual way) PdlEnter does nothing.
__device__ __forceinline__ void PdlEnter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asynchronous global -> shared copies (sm_80 and later): 16 bytes through L2 only, or 8 bytes
// (both addresses aligned to the size); CpAsyncCommit closes a group of them, CpAsyncWait<N> waits
// until at most N groups are in flight (the copies are then visible to this thread; a barrier
// makes them visible to the block).
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void CpAsync8(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// The combine of a routed MoE layer, the body of the decode paths' combine kernels: resid[t] += o
// with o = 0 + w * y over token t's pairs in increasing expert id, each term as ScatterAddRows adds
// it (dst += c * src) and the sum as Add adds it, so the result is bitwise the host-routed path's
// SetZero, ScatterAddRows per expert (ascending) and Add. Pair p = t * top_k + j reads y's row
// pos[p] (pos null: row p); ids outside [0, num_experts) or pos < 0 computed nothing and are left
// out. Grid (tokens, CombineGrid's column chunks), kCombineThreads threads: the first thread sorts
// the token's pairs into shared memory once, then each thread adds 4 adjacent columns (16-byte
// loads where vec4: dim % 4 == 0 and y, resid 16-byte aligned). One block per token that looked
// the pairs up again for every column took 15-25 us at batches 1 and 64 on an H100: a chain of
// dependent loads per column.
inline constexpr int kCombineThreads = 128;
inline dim3 CombineGrid(int64_t tokens, int64_t dim) {
  return dim3(static_cast<unsigned>(tokens),
              static_cast<unsigned>((dim + 4 * kCombineThreads - 1) / (4 * kCombineThreads)));
}
inline bool CombineVec4(const float* y, const float* resid, int64_t dim) {
  return dim % 4 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0 && reinterpret_cast<uintptr_t>(resid) % 16 == 0;
}
__device__ __forceinline__ void CombinePairs(const float* __restrict__ y, const int32_t* __restrict__ ids,
                                             const float* __restrict__ weights, const int32_t* __restrict__ pos,
                                             int top_k, int num_experts, int dim, bool vec4,
                                             float* __restrict__ resid) {
  constexpr int kMaxPairs = kMoeRoutedMaxTopK;
  __shared__ int64_t row_of[kMaxPairs];
  __shared__ float weight_of[kMaxPairs];
  __shared__ int id_of[kMaxPairs];
  __shared__ int num_pairs;
  const int t = blockIdx.x;
  if (threadIdx.x == 0) {
    int n = 0;
    for (int j = 0; j < top_k && j < kMaxPairs; ++j) {  // insertion sort by expert id, stable
      const int p = t * top_k + j, e = ids[p];
      const int64_t row = pos ? pos[p] : p;
      if (e < 0 || e >= num_experts || row < 0) continue;
      int b = n++;
      for (; b > 0 && id_of[b - 1] > e; --b) {
        row_of[b] = row_of[b - 1];
        weight_of[b] = weight_of[b - 1];
        id_of[b] = id_of[b - 1];
      }
      row_of[b] = row;
      weight_of[b] = weights[p];
      id_of[b] = e;
    }
    num_pairs = n;
  }
  __syncthreads();
  const int n = num_pairs;
  const int c = 4 * (blockIdx.y * kCombineThreads + threadIdx.x);
  if (c >= dim) return;
  float* dst = resid + static_cast<int64_t>(t) * dim + c;
  if (vec4) {
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j = 0; j < n; ++j) {
      const float w = weight_of[j];
      const float4 v = *reinterpret_cast<const float4*>(y + row_of[j] * dim + c);
      o.x += w * v.x;
      o.y += w * v.y;
      o.z += w * v.z;
      o.w += w * v.w;
    }
    float4 r = *reinterpret_cast<float4*>(dst);
    r.x += o.x;
    r.y += o.y;
    r.z += o.z;
    r.w += o.w;
    *reinterpret_cast<float4*>(dst) = r;
    return;
  }
  for (int i = 0; i < 4 && c + i < dim; ++i) {
    float o = 0.f;
    for (int j = 0; j < n; ++j) o += weight_of[j] * y[row_of[j] * dim + c + i];
    dst[i] += o;
  }
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization allowed.
// The kernel must begin with PdlEnter().
template <typename... Params, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = PdlEnabled() ? 1 : 0;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

inline unsigned GridFor(int64_t n, int block) {
  int64_t g = (n + block - 1) / block;
  return static_cast<unsigned>(g < 1 ? 1 : (g > 65535 * 16 ? 65535 * 16 : g));
}

// One rotary pair (a, b) = (x[i], x[i + half]) by the angle of (c, s) = (cos, sin), with the
// rounding spelled out (one fused multiply-add each) so that every kernel that rotates gives the
// same bits whatever the compiler would contract.
__device__ __forceinline__ float2 RopeRotate(float a, float b, float c, float s) {
  return make_float2(__fmaf_rn(a, c, -__fmul_rn(b, s)), __fmaf_rn(b, c, __fmul_rn(a, s)));
}

// The rotary angles of one position: cs[i] = cos(pos * theta^(-2i / head_dim)), sn[i] the sine,
// i < head_dim / 2, computed by the block's threads in turn (the caller synchronises). One
// definition, so that every kernel that rotates (rope.cu, the step's rotate-and-append) gets the
// same bits.
__device__ __forceinline__ void RopeAngles(float pos, int head_dim, float theta, float* cs, float* sn) {
  const int half = head_dim / 2;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float inv_freq = 1.0f / powf(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
    const float ang = pos * inv_freq;
    cs[i] = cosf(ang);
    sn[i] = sinf(ang);
  }
}

}  // namespace ef::runtime::cuda
