// Sampling on the device (Backend::SampleRows): out[r] = the token runtime::SampleRow draws from
// row r with params[r] (runtime/core/sample_row.h), so a sampled step copies R token ids to the
// host instead of R x vocab logits, and the tokens are the host's for the same draws.
//
// One block of 1024 threads per row, every cut exact and deterministic (integer masses, integer
// histograms; no float sum whose order could change):
//   1. the largest logit and the count of non-NaN logits; greedy rows end with the arg max;
//   2. top_k: the k-th largest rank (logit descending, id ascending: runtime::SampleRank, 64 bits,
//      all distinct) by a radix select, 8 bits a pass from the top, counting;
//   3. top_p: the same select over the ranks at or above the top_k cut, weighing each by its mass,
//      down to the rank where the mass from the top first reaches the target;
//   4. the draw: each thread sums the kept mass of its own contiguous range of ids, a block scan
//      places the ranges in id order, and the thread whose range holds the drawn point walks it.
// A select stops as soon as its bucket holds one token. Histograms have 8 copies (an eighth of the
// warps each) to spread the shared-memory atomics of flat rows, whose top bits are nearly equal.
// Test: tests/gpu/cuda_ops_test.cc (SampleRows against runtime::SampleRow).
#include <climits>
#include <cmath>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"
#include "runtime/core/sample_row.h"
#include "runtime/core/sample_row_math.h"

namespace ef::runtime::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kCopies = 8;
constexpr int kBuckets = 256;

using u64 = unsigned long long;

struct Shared {
  u64 mass[kCopies][kBuckets];
  unsigned count[kCopies][kBuckets];
  u64 bucket_mass[kBuckets];
  unsigned bucket_count[kBuckets];
  u64 red[kWarps];
  float redf[kWarps];
  int redi[kWarps];
  u64 prefix, mask, remaining;
  int done;
};

__device__ __forceinline__ u64 BlockSum(u64 v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) sh.red[warp] = v;
  __syncthreads();
  v = lane < kWarps ? sh.red[lane] : 0;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Exclusive prefix sum of v over the block in thread order; *total = the sum of all.
__device__ __forceinline__ u64 BlockExclusiveScan(u64 v, Shared& sh, u64* total) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  u64 inc = v;
  for (int o = 1; o < 32; o <<= 1) {
    const u64 n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  __syncthreads();
  if (lane == 31) sh.red[warp] = inc;
  __syncthreads();
  u64 w = lane < kWarps ? sh.red[lane] : 0;
  u64 winc = w;
  for (int o = 1; o < 32; o <<= 1) {
    const u64 n = __shfl_up_sync(0xffffffffu, winc, o);
    if (lane >= o) winc += n;
  }
  const u64 warp_before = __shfl_sync(0xffffffffu, winc - w, warp);
  *total = __shfl_sync(0xffffffffu, winc, kWarps - 1);
  return warp_before + inc - v;
}

// The rank selected by a radix select over the ranks r of the row's non-NaN tokens with
// r >= floor. Each token weighs its mass when `by_mass`, 1 otherwise; the result is the rank of
// the token where the weight counted from the largest rank first reaches `target` (>= 1).
__device__ u64 RadixSelect(const float* row, int cols, u64 floor, bool by_mass, u64 target, float mx, float inv_t,
                           Shared& sh) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.mask = 0;
    sh.remaining = target;
    sh.done = 0;
  }
  const int copy = (threadIdx.x >> 5) % kCopies;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kCopies * kBuckets; i += kThreads) {
      (&sh.mass[0][0])[i] = 0;
      (&sh.count[0][0])[i] = 0;
    }
    __syncthreads();
    const u64 prefix = sh.prefix, mask = sh.mask;
    for (int j = threadIdx.x; j < cols; j += kThreads) {
      const float v = row[j];
      if (v != v) continue;
      const u64 r = SampleRank(v, j);
      if (r < floor || (r & mask) != prefix) continue;
      const int d = static_cast<int>((r >> shift) & 0xff);
      atomicAdd(&sh.count[copy][d], 1u);
      if (by_mass) atomicAdd(&sh.mass[copy][d], static_cast<u64>(sample_math::SampleMass(v, mx, inv_t)));
    }
    __syncthreads();
    if (threadIdx.x < kBuckets) {
      u64 m = 0;
      unsigned c = 0;
      for (int k = 0; k < kCopies; ++k) {
        m += sh.mass[k][threadIdx.x];
        c += sh.count[k][threadIdx.x];
      }
      sh.bucket_mass[threadIdx.x] = by_mass ? m : c;
      sh.bucket_count[threadIdx.x] = c;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      u64 acc = 0;
      int digit = 0;
      for (int d = kBuckets - 1; d >= 0; --d) {
        if (acc + sh.bucket_mass[d] >= sh.remaining) {
          digit = d;
          break;
        }
        acc += sh.bucket_mass[d];
      }
      sh.remaining -= acc;
      sh.prefix |= static_cast<u64>(digit) << shift;
      sh.mask |= u64{0xff} << shift;
      sh.done = sh.bucket_count[digit] == 1;
    }
    __syncthreads();
    if (sh.done) break;
  }
  // One token holds the prefix: its rank (when the select ran to the last digit, the prefix is it).
  if (sh.mask == ~u64{0}) return sh.prefix;
  const u64 prefix = sh.prefix, mask = sh.mask;
  __syncthreads();
  for (int j = threadIdx.x; j < cols; j += kThreads) {
    const float v = row[j];
    if (v != v) continue;
    const u64 r = SampleRank(v, j);
    if (r >= floor && (r & mask) == prefix) sh.prefix = r;  // exactly one token writes
  }
  __syncthreads();
  return sh.prefix;
}

__global__ void __launch_bounds__(kThreads)
    SampleRowsKernel(const float* __restrict__ x, int cols, const RowSampling* __restrict__ params,
                     int32_t* __restrict__ out) {
  __shared__ Shared sh;
  PdlEnter();
  const float* row = x + static_cast<int64_t>(blockIdx.x) * cols;
  const RowSampling s = params[blockIdx.x];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  // 1. The largest logit and how many are numbers.
  float mx = -INFINITY;
  int numbers = 0;
  for (int j = threadIdx.x; j < cols; j += kThreads) {
    const float v = row[j];
    if (v == v) {
      mx = v > mx ? v : mx;
      ++numbers;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m = __shfl_xor_sync(0xffffffffu, mx, o);
    mx = m > mx ? m : mx;
    numbers += __shfl_xor_sync(0xffffffffu, numbers, o);
  }
  if (lane == 0) {
    sh.redf[warp] = mx;
    sh.redi[warp] = numbers;
  }
  __syncthreads();
  mx = lane < kWarps ? sh.redf[lane] : -INFINITY;
  numbers = lane < kWarps ? sh.redi[lane] : 0;
  for (int o = 16; o > 0; o >>= 1) {
    const float m = __shfl_xor_sync(0xffffffffu, mx, o);
    mx = m > mx ? m : mx;
    numbers += __shfl_xor_sync(0xffffffffu, numbers, o);
  }
  const float inv_t = s.inv_temperature;
  if (!SamplesRandomly(s) || !isfinite(mx)) {  // greedy: the first index holding the maximum
    int at = INT_MAX;
    for (int j = threadIdx.x; j < cols; j += kThreads)
      if (row[j] == mx) {
        at = j;
        break;
      }
    for (int o = 16; o > 0; o >>= 1) at = min(at, __shfl_xor_sync(0xffffffffu, at, o));
    __syncthreads();
    if (lane == 0) sh.redi[warp] = at;
    __syncthreads();
    if (warp == 0) {
      at = lane < kWarps ? sh.redi[lane] : INT_MAX;
      for (int o = 16; o > 0; o >>= 1) at = min(at, __shfl_xor_sync(0xffffffffu, at, o));
      if (lane == 0) out[blockIdx.x] = at == INT_MAX ? 0 : at;
    }
    return;
  }

  // 2-3. The cuts: kept = the non-NaN tokens of rank >= floor.
  u64 floor = 0;
  if (s.top_k > 0 && s.top_k < numbers)
    floor = RadixSelect(row, cols, 0, false, static_cast<u64>(s.top_k), mx, inv_t, sh);
  if (s.top_p < 1.f) {
    u64 mass = 0;
    for (int j = threadIdx.x; j < cols; j += kThreads) {
      const float v = row[j];
      if (v == v && SampleRank(v, j) >= floor) mass += sample_math::SampleMass(v, mx, inv_t);
    }
    const u64 total = BlockSum(mass, sh);
    floor = RadixSelect(row, cols, floor, true, TopPTarget(s.top_p, total), mx, inv_t, sh);
  }

  // 4. The draw, walking the kept tokens in id order.
  const int chunk = (cols + kThreads - 1) / kThreads;
  const int begin = min(cols, static_cast<int>(threadIdx.x) * chunk), end = min(cols, begin + chunk);
  u64 own = 0;
  for (int j = begin; j < end; ++j) {
    const float v = row[j];
    if (v == v && SampleRank(v, j) >= floor) own += sample_math::SampleMass(v, mx, inv_t);
  }
  u64 total = 0;
  const u64 before = BlockExclusiveScan(own, sh, &total);
  const u64 r = DrawTarget(s.uniform, total);
  if (r >= before && r < before + own) {
    u64 acc = before;
    for (int j = begin; j < end; ++j) {
      const float v = row[j];
      if (v == v && SampleRank(v, j) >= floor) {
        acc += sample_math::SampleMass(v, mx, inv_t);
        if (r < acc) {
          out[blockIdx.x] = j;
          return;
        }
      }
    }
  }
}

}  // namespace

cudaError_t launch_sample_rows(const float* x, int64_t rows, int64_t cols, const RowSampling* params, int32_t* out,
                               cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (cols <= 0 || cols > (1 << 23) || rows > 0x7fffffff) return cudaErrorInvalidValue;  // masses sum < 2^63
  return LaunchPdl(SampleRowsKernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, stream, x,
                   static_cast<int>(cols), params, out);
}

}  // namespace ef::runtime::cuda
