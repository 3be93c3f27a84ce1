// The CPU backend: the reference implementation of every op (fp32 math, weights converted on
// use), parallelised over the process thread pool (EF_NUM_THREADS).
#pragma once

#include <atomic>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/core/thread_pool.h"

namespace ef::runtime {

class CpuBackend final : public Backend {
 public:
  // memory_budget: bytes Allocate may hold at once (0: the EF_CPU_MEMORY_BUDGET_MIB knob; 0 there
  // too: no limit but the host's).
  explicit CpuBackend(ThreadPool* pool = &ThreadPool::Default(), size_t memory_budget = 0);
  size_t memory_budget() const { return budget_; }
  void set_memory_budget(size_t bytes) { budget_ = bytes; }

  BackendKind kind() const override { return BackendKind::kCpu; }
  std::string name() const override;

  StatusOr<Buffer> Allocate(size_t bytes) override;
  void Free(void* ptr, size_t bytes) override;
  void CopyToDevice(void* dst, const void* host_src, size_t bytes) override;
  void CopyToHost(void* host_dst, const void* src, size_t bytes) override;
  void CopyOnDevice(void* dst, const void* src, size_t bytes) override;
  void CopyBatchToBf16(const CopyItem* items, int num_items) override;
  // bf16 K/V are widened to fp32 per sequence, then attended as fp32.
  bool SetKvCacheDType(DType t) override {
    if (t != DType::kF32 && t != DType::kBF16) return false;
    kv_bf16_ = t == DType::kBF16;
    return true;
  }
  void SetZero(void* dst, size_t bytes) override;
  void Synchronize() override {}
  // The step ops on host memory (no graphs): the uploaded sequences are a host copy.
  bool StepSeqs() const override { return true; }
  StatusOr<uint64_t> UploadStepSeqs(const AttentionSeq* seqs_host, int num_seqs, int num_heads, int num_kv_heads,
                                    int head_dim) override;
  void AppendKvStep(void* k_pool, void* v_pool, const float* k, const float* v, int64_t k_width,
                    int64_t v_width) override;
  void AttentionStep(const float* q, const void* k_pool, const void* v_pool, float* out) override;
  StatusOr<Weight> UploadWeight(DType dtype, const void* host_data, int64_t rows, int64_t cols) override;
  size_t bytes_in_use() const override { return bytes_in_use_.load(); }

  void Embed(const int32_t* ids, int n, const Weight& table, float* out) override;
  void RmsNorm(const float* x, int64_t rows, int dim, const Weight& w, float eps, float* out) override;
  void RmsNormTwin(const float* x, int64_t rows, int dim, const Weight& w, float eps, float* out,
                   uint16_t* out16) override;
  void Gemm(const float* x, int64_t m, const Weight& w, const Weight* bias, float* y, bool accumulate) override;
  void Rope(float* x, const int32_t* positions, int64_t rows, int num_heads, int head_dim, float theta) override;
  void Attention(const float* q, int n_new, const float* k, const float* v, int n_total, int num_heads,
                 int num_kv_heads, int head_dim, float* out) override;
  void AttentionBatch(const float* q, const AttentionSeq* seqs_host, int num_seqs, int num_heads, int num_kv_heads,
                      int head_dim, float* out) override;
  void RopeTable(float* x, const int32_t* positions, int64_t rows, int num_heads, const RopeSpec& spec) override;
  void AttentionEx(const float* q, const AttentionSeq* seqs_host, int num_seqs, const AttentionSpec& spec,
                   float* out) override;
  void GemmPerHead(const float* x, int64_t rows, int num_heads, int64_t x_stride, int x_head_stride, const Weight& w,
                   int n, float* y, int64_t y_stride, int y_head_stride) override;
  void Copy2D(float* dst, int64_t dst_pitch, const float* src, int64_t src_pitch, int64_t width, int64_t rows) override;
  void ClampedSwiGlu(const float* gate, const float* up, float* out, int64_t n, float alpha, float limit) override;
  void SiluMul(const float* gate, const float* up, float* out, int64_t n) override;
  void Add(float* y, const float* x, int64_t n) override;
  void Clamp(float* x, int64_t n, float c) override;
  void RouterTopK(const float* logits, int64_t rows, int num_experts, int k, bool renormalize, int32_t* ids,
                  float* weights) override;
  void GatherRows(const float* src, const int32_t* idx, int64_t n, int dim, float* dst) override;
  void GatherRowsTwin(const float* src, const int32_t* idx, int64_t n, int dim, float* dst, uint16_t* dst16) override;
  void ArgMaxRows(const float* x, int64_t rows, int64_t cols, int32_t* out) override;
  void SampleRows(const float* x, int64_t rows, int64_t cols, const RowSampling* params, int32_t* out) override;
  void CombineRows(const float* src, const int32_t* pos, const float* scale, int64_t tokens, int k, int dim,
                   float* dst) override;
  void ScatterAddRows(const float* src, const int32_t* idx, const float* scale, int64_t n, int dim,
                      float* dst) override;
  void AddSigmoidGated(const float* src, const float* gate_logit, int64_t rows, int dim, float* dst) override;

 private:
  ThreadPool* pool_;
  std::atomic<size_t> bytes_in_use_{0};
  size_t budget_ = 0;  // 0: none
  void GatherKvRow(const AttentionSeq& a, int64_t t, int64_t kw, int64_t vw, float* k, float* v) const;

  bool kv_bf16_ = false;
  std::vector<AttentionSeq> step_seqs_;  // UploadStepSeqs, and its attention shape
  int step_heads_ = 0, step_kv_heads_ = 0, step_head_dim_ = 0;
};

}  // namespace ef::runtime
