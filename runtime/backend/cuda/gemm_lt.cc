#include "runtime/backend/cuda/gemm_lt.h"

#include <algorithm>
#include <bit>
#include <string>

#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/core/logging.h"

namespace ef::runtime::cuda {
namespace {

cudaDataType_t LtType(DType t) { return t == DType::kF16 ? CUDA_R_16F : CUDA_R_16BF; }

// The largest power of two (<= 256) dividing every address: what the algorithm may assume.
int AlignmentOf(const void* w, const void* x, const void* y) {
  const auto a = reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y);
  return a == 0 ? 256 : static_cast<int>(std::min<uintptr_t>(256, a & (~a + 1)));
}

// Column-major layouts of the problem y^T[n, m] = w^T[n, k] . x^T[k, m] (w is a column-major
// [k, n] matrix used transposed, x a column-major [k, m] one), destroyed with the object.
struct Layouts {
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  Layouts(DType t, DType yt, int64_t m, int64_t n, int64_t k, int64_t ldy) {
    st = cublasLtMatrixLayoutCreate(&a, LtType(t), static_cast<uint64_t>(k), static_cast<uint64_t>(n), k);
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatrixLayoutCreate(&b, LtType(t), static_cast<uint64_t>(k), static_cast<uint64_t>(m), k);
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatrixLayoutCreate(&c, yt == DType::kF32 ? CUDA_R_32F : LtType(yt), static_cast<uint64_t>(n),
                                      static_cast<uint64_t>(m), ldy);
  }
  ~Layouts() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
  }
};

}  // namespace

int64_t LtGemmBucket(int64_t m) { return std::max<int64_t>(16, std::bit_ceil(static_cast<uint64_t>(m))); }

StatusOr<std::unique_ptr<LtGemm>> LtGemm::Create(void* workspace, size_t ws_bytes) {
  std::unique_ptr<LtGemm> g(new LtGemm());
  g->workspace_ = workspace;
  g->ws_bytes_ = ws_bytes;
  CUBLAS_CHECK(cublasLtCreate(&g->handle_));
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&g->desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(g->desc_, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(g->desc_, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  return g;
}

LtGemm::~LtGemm() {
  if (desc_) cublasLtMatmulDescDestroy(desc_);
  if (handle_) cublasLtDestroy(handle_);
}

const LtGemm::Plan& LtGemm::PlanFor(DType t, DType yt, int64_t n, int64_t k, int64_t ldy, int64_t bucket, int align) {
  const auto key = std::make_tuple(static_cast<int>(t), static_cast<int>(yt), n, k, ldy, bucket, align);
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  Plan& p = plans_[key];
  ++plans_made_;
  Layouts l(t, yt, bucket, n, k, ldy);
  cublasLtMatmulPreference_t pref = nullptr;
  if (l.st != CUBLAS_STATUS_SUCCESS || cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS) return p;
  const uint64_t ws = ws_bytes_;
  const uint32_t al = static_cast<uint32_t>(align);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    cublasLtMatmulPreferenceSetAttribute(pref, attr, &al, sizeof(al));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(handle_, desc_, l.a, l.b, l.c, l.c, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS) {
    p.ok = true;
    p.algo = result.algo;
  } else {
    EF_LOG(DEBUG, CUDA, "cublasLt has no algorithm for %s [%lld x %lld] x %lld rows: cublasGemmEx serves it",
           DTypeName(t), static_cast<long long>(n), static_cast<long long>(k), static_cast<long long>(bucket));
  }
  return p;
}

bool LtGemm::Supports(DType t, const void* w, const void* x, const void* y, DType yt, int64_t m, int64_t n, int64_t k,
                      int64_t ldy) {
  if ((t != DType::kBF16 && t != DType::kF16) || (yt != DType::kF32 && yt != t) || ldy < n || m <= 0) return false;
  return PlanFor(t, yt, n, k, ldy, LtGemmBucket(m), AlignmentOf(w, x, y)).ok;
}

cublasStatus_t LtGemm::Run(DType t, const void* w, const void* x, void* y, DType yt, int64_t m, int64_t n, int64_t k,
                           int64_t ldy, bool accumulate, cudaStream_t stream, void* workspace) {
  if (!Supports(t, w, x, y, yt, m, n, k, ldy)) return CUBLAS_STATUS_NOT_SUPPORTED;
  const Plan& p = PlanFor(t, yt, n, k, ldy, LtGemmBucket(m), AlignmentOf(w, x, y));
  Layouts l(t, yt, m, n, k, ldy);
  if (l.st != CUBLAS_STATUS_SUCCESS) return l.st;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  return cublasLtMatmul(handle_, desc_, &alpha, w, l.a, x, l.b, &beta, y, l.c, y, l.c, &p.algo,
                        workspace ? workspace : workspace_, ws_bytes_, stream);
}

}  // namespace ef::runtime::cuda
