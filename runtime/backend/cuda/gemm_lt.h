// LtGemm: the backend's tensor-core GEMM y[m, n] (fp32) = x[m, k] . w[n, k]^T (+ y) on 16-bit
// operands, through cuBLASLt with algorithms chosen once per shape class and reused.
//
// Why: the rows of an expert's GEMM are its tokens, so in prefill and in batched decode past the
// GEMV's rows every call has a new m. cublasGemmEx runs its algorithm heuristic for every shape
// it has not seen, and that host work (hundreds of microseconds a call) left the device idle
// between expert GEMMs: measured on the H200 (ef_decode_bench --profile), a 2048-token prefill of
// a Mixtral-8x7B layer spent 9.7 ms in its expert GEMMs, 3x their device time. Here the heuristic
// runs once per (dtype, n, k, m bucket, alignment) with m rounded up to a power of two (the
// bucket), and the algorithm it returns serves every m of the bucket: an algorithm is a kernel
// configuration (tiles, stages, split-K), valid for any m that cuBLASLt accepts with it. A call
// whose algorithm cuBLASLt refuses returns the error and the caller falls back to cublasGemmEx.
//
// Not thread-safe (one backend, one thread), like the backend.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "runtime/core/dtype.h"
#include "runtime/core/status.h"

namespace ef::runtime::cuda {

class LtGemm {
 public:
  // workspace: device memory of ws_bytes the algorithms may use (shared with cuBLAS: same stream).
  static StatusOr<std::unique_ptr<LtGemm>> Create(void* workspace, size_t ws_bytes);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // w [n, k] and x [m, k] of type t (kBF16 or kF16), row-major; y [m, n] fp32 row-major with
  // rows ldy floats apart (ldy >= n: a column tile of a wider output). CUBLAS_STATUS_SUCCESS, or
  // why not (then nothing was enqueued).
  cublasStatus_t Run(DType t, const void* w, const void* x, float* y, int64_t m, int64_t n, int64_t k, int64_t ldy,
                     bool accumulate, cudaStream_t stream) {
    return Run(t, w, x, y, DType::kF32, m, n, k, ldy, accumulate, stream, nullptr);
  }
  // The same with y of type yt (kF32, or t: the products rounded to the operands' 16 bits) and,
  // for a caller running GEMMs on several streams at once, a workspace of this object's ws_bytes
  // other than the shared one (nullptr: the shared one).
  cublasStatus_t Run(DType t, const void* w, const void* x, void* y, DType yt, int64_t m, int64_t n, int64_t k,
                     int64_t ldy, bool accumulate, cudaStream_t stream, void* workspace);
  // Whether Run with these arguments finds an algorithm (plans it if not yet planned); nothing is
  // enqueued.
  bool Supports(DType t, const void* w, const void* x, const void* y, DType yt, int64_t m, int64_t n, int64_t k,
                int64_t ldy);
  size_t workspace_bytes() const { return ws_bytes_; }

  // Heuristic queries made so far (one per shape class), for tests and logs.
  int64_t plans_made() const { return plans_made_; }

 private:
  struct Plan {
    bool ok = false;
    cublasLtMatmulAlgo_t algo{};
  };
  LtGemm() = default;
  // The algorithm for the shape class of (t, yt, n, k, ldy, bucket, align); queried on first use.
  const Plan& PlanFor(DType t, DType yt, int64_t n, int64_t k, int64_t ldy, int64_t bucket, int align);

  cublasLtHandle_t handle_ = nullptr;
  cublasLtMatmulDesc_t desc_ = nullptr;
  void* workspace_ = nullptr;
  size_t ws_bytes_ = 0;
  // (dtype, output dtype, n, k, ldy, bucket, align)
  std::map<std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, int>, Plan> plans_;
  int64_t plans_made_ = 0;
};

// The m bucket LtGemm plans for: the next power of two >= m, at least 16.
int64_t LtGemmBucket(int64_t m);

}  // namespace ef::runtime::cuda
