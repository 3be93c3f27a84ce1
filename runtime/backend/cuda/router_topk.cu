// Router: softmax over each row of logits, then top-k (highest probability first, ties to the
// lower expert id), weights renormalised to sum 1 when asked, with the CPU reference's arithmetic
// (max, sum of exp in expert order, divide), so routing decisions agree with it; the k-th pick is
// the best (p, id) strictly after pick k-1 in the order (p descending, id ascending).
// A warp per token row: the lanes take the max and the exponentials of the experts in parallel,
// lane 0 sums them in expert order, and each pick is a warp-wide arg max. (One thread per row, the
// kernel before, took ~1024 dependent exp/divide steps for 128 experts and top-8: about as long
// as the rest of a Qwen3-30B-A3B decode layer.) Launch: ceil(rows / 4) blocks of 4 warps, the
// probabilities in shared memory; past kWarpMaxExperts experts, one thread per row as before.
// Test: tests/gpu/cuda_ops_test.cc (RouterTopK, with planted ties).
#include <cmath>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/kernel_util.cuh"

namespace ef::runtime::cuda {
namespace {
__global__ void RouterTopKKernel(const float* logits, int64_t rows, int num_experts, int k, bool renormalize,
                                 int32_t* ids, float* weights) {
  PdlEnter();
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const float* l = logits + r * num_experts;
  float mx = l[0];
  for (int e = 1; e < num_experts; ++e) mx = fmaxf(mx, l[e]);
  float sum = 0;
  for (int e = 0; e < num_experts; ++e) sum += expf(l[e] - mx);
  float prev_p = INFINITY, top = 0;
  int prev_id = -1;
  for (int j = 0; j < k; ++j) {
    float best_p = -1.0f;
    int best = -1;
    for (int e = 0; e < num_experts; ++e) {
      const float p = expf(l[e] - mx) / sum;
      const bool after_prev = p < prev_p || (p == prev_p && e > prev_id);
      if (after_prev && p > best_p) {  // strict: the lower id wins a tie
        best_p = p;
        best = e;
      }
    }
    ids[r * k + j] = best;
    weights[r * k + j] = best_p;
    top += best_p;
    prev_p = best_p;
    prev_id = best;
  }
  if (renormalize)
    for (int j = 0; j < k; ++j) weights[r * k + j] /= top;
}

constexpr int kRowsPerBlock = 4;
constexpr int kWarpMaxExperts = 2048;  // 4 rows x 2048 floats: 32 KiB of shared memory

// (p, id) of another lane beats (best_p, best): a larger p, or the same p at a lower id (-1: none).
__device__ __forceinline__ void TakeBetter(float p, int id, float* best_p, int* best) {
  if (id >= 0 && (p > *best_p || (p == *best_p && (*best < 0 || id < *best)))) {
    *best_p = p;
    *best = id;
  }
}

__global__ void RouterTopKWarpKernel(const float* logits, int64_t rows, int num_experts, int k, bool renormalize,
                                     int32_t* ids, float* weights) {
  PdlEnter();
  extern __shared__ float probs[];  // [kRowsPerBlock][num_experts]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + warp;
  if (r >= rows) return;  // warp-uniform; only warp-level synchronisation below
  const float* l = logits + r * num_experts;
  float* p = probs + warp * num_experts;
  // fmaxf skips NaN as the serial loop does; a row of NaN (or of -inf) gives NaN probabilities
  // either way, so nothing is picked (-1).
  float mx = -INFINITY;
  for (int e = lane; e < num_experts; e += 32) mx = fmaxf(mx, l[e]);
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  for (int e = lane; e < num_experts; e += 32) p[e] = expf(l[e] - mx);
  __syncwarp();
  float sum = 0;
  if (lane == 0)
    for (int e = 0; e < num_experts; ++e) sum += p[e];  // in expert order, as the CPU reference
  sum = __shfl_sync(0xffffffffu, sum, 0);
  for (int e = lane; e < num_experts; e += 32) p[e] = p[e] / sum;
  __syncwarp();
  float prev_p = INFINITY, top = 0;
  int prev_id = -1;
  for (int j = 0; j < k; ++j) {
    float best_p = -1.0f;
    int best = -1;
    for (int e = lane; e < num_experts; e += 32) {
      const float pe = p[e];
      const bool after_prev = pe < prev_p || (pe == prev_p && e > prev_id);
      if (after_prev && pe > best_p) {  // strict: the lower id wins a tie
        best_p = pe;
        best = e;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float op = __shfl_xor_sync(0xffffffffu, best_p, o);
      const int oid = __shfl_xor_sync(0xffffffffu, best, o);
      TakeBetter(op, oid, &best_p, &best);
    }
    if (lane == 0) {
      ids[r * k + j] = best;
      weights[r * k + j] = best_p;
    }
    top += best_p;
    prev_p = best_p;
    prev_id = best;
  }
  if (renormalize && lane == 0)
    for (int j = 0; j < k; ++j) weights[r * k + j] /= top;
}

}  // namespace

cudaError_t launch_router_topk(const float* logits, int64_t rows, int num_experts, int k, bool renormalize,
                               int32_t* ids, float* weights, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (num_experts >= 1 && num_experts <= kWarpMaxExperts)
    return LaunchPdl(RouterTopKWarpKernel, dim3(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock)),
                     dim3(32 * kRowsPerBlock), sizeof(float) * kRowsPerBlock * num_experts, stream, logits, rows,
                     num_experts, k, renormalize, ids, weights);
  return LaunchPdl(RouterTopKKernel, dim3(GridFor(rows, 128)), dim3(128), 0, stream, logits, rows, num_experts, k,
                   renormalize, ids, weights);
}

}  // namespace ef::runtime::cuda
