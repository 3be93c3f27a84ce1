// Router: softmax over each row of logits, then top-k (highest probability first, ties to the
// lower expert id), weights renormalised to sum 1 when asked. One thread per token row does the
// same serial arithmetic as the CPU reference (max, sum of exp in expert order, divide), so
// routing decisions agree with it; the k-th pick is the best (p, id) strictly after pick k-1 in
// the order (p descending, id ascending), recomputed from the logits (no per-row arrays).
// Launch: ceil(rows / 128) blocks of 128 threads. num_experts is small (8..256), k <= 16.
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
}  // namespace

cudaError_t launch_router_topk(const float* logits, int64_t rows, int num_experts, int k, bool renormalize,
                               int32_t* ids, float* weights, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  return LaunchPdl(RouterTopKKernel, dim3(GridFor(rows, 128)), dim3(128), 0, stream, logits, rows, num_experts, k,
                   renormalize, ids, weights);
}

}  // namespace ef::runtime::cuda
