// CudaBackend: the Backend ops on one GPU, with cuBLAS for the GEMMs.
//
// Streams and events: every op, copy, allocation and free is enqueued on one compute stream that
// the backend owns (non-blocking with respect to the legacy default stream). Nothing waits for
// the device except CopyToHost and Synchronize (that stream only), a staging-ring wrap that finds
// an earlier host->device copy still in flight (waits on that copy's event), and UploadWeight.
// Host->device copies go through a pinned staging ring, or for a few KiB in a kernel's parameters
// (cheaper than a copy-engine operation between kernels), so the caller's host memory is free on
// return without a device sync.
//
// Memory: one allocator (cudaMallocAsync on the compute stream from the device's default pool,
// kept across frees so steady-state decode never calls into the driver) with accounting:
// bytes_in_use() counts every live buffer and weight; a request past `memory_budget` (or one the
// driver refuses) is ResourceExhausted naming the requested bytes and the budget.
//
// Errors: ops return void (the Backend contract). A failing CUDA/cuBLAS call is logged once with
// its statement and file:line and kept: status() returns the first error.
//
// Not thread-safe: one engine drives one backend.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/backend/cuda/gemm_lt.h"

namespace ef::runtime {

struct CudaBackendOptions {
  // grouped_experts -1: the largest expert GEMM (rows * inter * hidden multiply-adds) that runs
  // grouped, ~2 GFLOP. One cuBLASLt GEMM costs ~8 us of host time to enqueue, more than such a
  // GEMM takes to run: on an H100, 128 experts of Qwen3-30B-A3B's shape (~128 rows x 768 x 2048)
  // ran at 54 TFLOP/s one call each and at 218 TFLOP/s as one grouped call; 8 of Mixtral's
  // (~512 rows x 14336 x 4096) at 585 TFLOP/s one call each and at 250 grouped.
  static constexpr int64_t kGroupedExpertMaxMacs = int64_t{1} << 30;
  int device = 0;
  // Store F32 matrices (rows > 1) as BF16 at upload; GEMMs then run bf16 x bf16 with fp32
  // accumulation. 1-D vectors (norms, biases) stay F32. Default: EF_CUDA_BF16_WEIGHTS.
  // (Packed kQ8/kQ4/kMxfp4/kFp8Block weights upload as they are.)
  bool bf16_weights = false;
  // Bytes of device memory the backend may hold; 0: free memory at creation less 1 GiB.
  // Default: EF_CUDA_MEMORY_BUDGET_MIB.
  size_t memory_budget = 0;
  // Pinned host staging ring for host->device copies (those over cuda::kParamCopyMaxBytes; smaller
  // ones travel in a kernel's parameters).
  size_t staging_bytes = size_t{64} << 20;
  // cuBLAS workspace (given to cuBLAS so it never allocates by itself).
  size_t cublas_workspace_bytes = size_t{32} << 20;
  // 16-bit GEMMs past the GEMV's rows through LtGemm (algorithms planned once per shape class);
  // false: cublasGemmEx for each (its heuristic runs for every new shape).
  bool lt_gemm = true;
  // GateUpSilu's fused decode kernel (false: the caller's Gemm, Gemm, SiluMul).
  bool fused_gate_up = true;
  // ExpertMlps: streams the experts of one call run on (0: ExpertMlps declines, the caller's
  // per-expert Gemm path serves), and the most scratch its 16-bit products may take (experts
  // past it run in groups that fit, one group after another).
  int expert_streams = 4;  // default: EF_CUDA_EXPERT_STREAMS
  // Programmatic dependent launch of the decode path's kernels (cuda::LaunchPdl; process-wide, the
  // last backend created sets it). Default: EF_CUDA_PDL.
  bool pdl = true;
  // Decode attention splits each sequence's keys for this many blocks per SM (0: no split).
  // Default: EF_CUDA_DECODE_BLOCKS_PER_SM.
  int decode_blocks_per_sm = cuda::kDecodeBlocksPerSmDefault;
  size_t expert_mlp_scratch_bytes = size_t{256} << 20;
  // ExpertMlps' bf16 experts past the GEMV's rows through one grouped cuBLAS call per projection
  // (cublasGemmGroupedBatchedEx, bf16 outputs: fp16 ones could overflow) instead of a cuBLASLt GEMM each: -1 for an
  // expert whose GEMM is small (rows * inter * hidden <= kGroupedExpertMaxMacs: a fine-grained MoE's, where a GEMM's
  // enqueue outlasts its run), 1 for every one, 0 never. Which path an expert takes depends on its own rows and shape
  // only. Default: EF_CUDA_GROUPED_EXPERTS.
  int grouped_experts = -1;
  // Backend::Bf16Twins: the producers of rows that bf16 GEMMs past the GEMV's rows read (RMSNorm,
  // the experts' gather) write them rounded to bf16 as well, so that the GEMMs skip their own
  // rounding pass (same bits). Default: EF_CUDA_BF16_TWINS.
  bool bf16_twins = true;
  // Initial Backend::SetReducedPrecisionAttention: prefill attention (chunks of at least
  // cuda::kAttentionPrefillTcMinRows rows, head_dim 64/128) on tensor cores with bf16 operands,
  // its scratch a bf16 copy of the batch's keys and values (half their fp32 bytes); and decode
  // rows over a bf16 KV cache (head_dim 64/128, GQA groups up to 16) on tensor cores.
  bool reduced_precision_attention = false;

  // The defaults with the EF_CUDA_* knobs applied.
  static CudaBackendOptions FromParams(int device);
};

class CudaBackend final : public Backend {
 public:
  static StatusOr<std::unique_ptr<CudaBackend>> Create(const CudaBackendOptions& options);
  ~CudaBackend() override;

  BackendKind kind() const override { return BackendKind::kCuda; }
  std::string name() const override { return name_; }

  StatusOr<Buffer> Allocate(size_t bytes) override;
  void Free(void* ptr, size_t bytes) override;
  void CopyToDevice(void* dst, const void* host_src, size_t bytes) override;
  void CopyToHost(void* host_dst, const void* src, size_t bytes) override;
  void CopyOnDevice(void* dst, const void* src, size_t bytes) override;
  void CopyBatch(const CopyItem* items, int num_items) override;
  void CopyBatchToBf16(const CopyItem* items, int num_items) override;
  bool GateUpSilu(const float* x, int64_t m, const Weight& gate, const Weight& up, float* out) override;
  bool ExpertMlps(const float* x, const uint16_t* x16, const ExpertMlpRows* experts, int count, float* y) override;
  void GemmGroup(const float* x, const uint16_t* x16, int64_t m, int count, const Weight* const* ws,
                 const Weight* const* biases, float* const* ys) override;
  bool MoeRouted(const float* x, int64_t tokens, int top_k, const int32_t* ids, const float* weights,
                 const RoutedExpertTable& experts, float* resid) override;
  // Pairs sharing an expert each stream it: worth it for the batches the GEMV serves.
  int MoeRoutedMaxTokens() const override { return cuda::kMoeGroupedMaxTokens; }
  void SetZero(void* dst, size_t bytes) override;
  void Synchronize() override;
  Status BindToCallingThread() override;
  StatusOr<Weight> UploadWeight(DType dtype, const void* host_data, int64_t rows, int64_t cols) override;
  size_t bytes_in_use() const override { return bytes_in_use_.load(); }

  void Embed(const int32_t* ids, int n, const Weight& table, float* out) override;
  void RmsNorm(const float* x, int64_t rows, int dim, const Weight& w, float eps, float* out) override;
  // Past the GEMV's rows the GEMMs read x in the weights' 16-bit type.
  bool Bf16Twins(int64_t rows, DType weights) const override {
    return options_.bf16_twins && rows > cuda::kGemvMaxRows && weights == DType::kBF16;
  }
  void RmsNormTwin(const float* x, int64_t rows, int dim, const Weight& w, float eps, float* out,
                   uint16_t* out16) override;
  void AddRmsNorm(float* x, const float* add, int64_t rows, int dim, const Weight& w, float eps, float* out,
                  uint16_t* out16) override;
  void Gemm(const float* x, int64_t m, const Weight& w, const Weight* bias, float* y, bool accumulate) override;
  void Rope(float* x, const int32_t* positions, int64_t rows, int num_heads, int head_dim, float theta) override;
  void RopeQK(float* q, float* k, const int32_t* positions, int64_t rows, int num_heads, int num_kv_heads, int head_dim,
              float theta) override;
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
  bool SamplesRows() const override;
  void CombineRows(const float* src, const int32_t* pos, const float* scale, int64_t tokens, int k, int dim,
                   float* dst) override;
  void ScatterAddRows(const float* src, const int32_t* idx, const float* scale, int64_t n, int dim,
                      float* dst) override;
  void AddSigmoidGated(const float* src, const float* gate_logit, int64_t rows, int dim, float* dst) override;
  bool StepSeqs() const override { return true; }
  StatusOr<uint64_t> UploadStepSeqs(const AttentionSeq* seqs_host, int num_seqs, int num_heads, int num_kv_heads,
                                    int head_dim) override;
  void AppendKvStep(void* k_pool, void* v_pool, const float* k, const float* v, int64_t k_width,
                    int64_t v_width) override;
  bool RopeQKAppendStep(float* q, float* k, const float* v, const int32_t* positions, int num_heads, int num_kv_heads,
                        int head_dim, float theta, void* k_pool, void* v_pool) override;
  void AttentionStep(const float* q, const void* k_pool, const void* v_pool, float* out) override;
  // CUDA graphs by stream capture (relaxed mode) of the compute stream.
  bool Graphs() const override { return true; }
  Status BeginGraph() override;
  StatusOr<int> EndGraph() override;
  Status LaunchGraph(int graph) override;
  void DropGraphs() override;
  uint64_t layout_generation() const override { return layout_generation_; }
  void SetReducedPrecisionAttention(bool on) override { reduced_precision_attention_ = on; }
  bool SetKvCacheDType(DType t) override {
    if (t != DType::kF32 && t != DType::kBF16) return false;
    kv_bf16_ = t == DType::kBF16;
    return true;
  }

  // --- CUDA specifics ---
  // The first CUDA/cuBLAS error seen by an op, or OK.
  Status status() const override { return error_; }
  // The compute stream (for callers that time or fill device memory in stream order).
  cudaStream_t stream() const { return stream_; }
  int device() const { return options_.device; }
  size_t memory_budget() const { return budget_; }
  const CudaBackendOptions& options() const { return options_; }
  // A device weight the backend owns, filled by the caller (e.g. synthetic weights generated on
  // the device); accounted like UploadWeight's.
  StatusOr<Weight> AllocateWeight(DType dtype, int64_t rows, int64_t cols);

 private:
  // MoeRouted past kGemvMaxRows tokens: the grouped tensor-core layer (moe_grouped.cu).
  bool MoeGrouped(const float* x, int64_t tokens, int top_k, const int32_t* ids, const float* weights,
                  const RoutedExpertTable& experts, float* resid);
  struct Pending {  // an in-flight host->device copy out of the staging ring
    size_t begin, end;
    cudaEvent_t done;
  };
  explicit CudaBackend(const CudaBackendOptions& options)
      : options_(options), reduced_precision_attention_(options.reduced_precision_attention) {}
  Status Init();
  StatusOr<void*> DeviceAlloc(size_t bytes);
  void DeviceFree(void* p, size_t bytes);
  // Grows a backend-private scratch buffer (stream-ordered, so no sync). Out of memory: the
  // backend's error when `required`, else only nullptr (the caller has another way).
  void* EnsureScratch(void** buf, size_t* cap, size_t bytes, bool required = true);
  // AttentionBatch with K/V of fp32 or bf16 (Attention: always fp32).
  void AttentionSeqs(const float* q, const AttentionSeq* seqs_host, int num_seqs, int num_heads, int num_kv_heads,
                     int head_dim, float* out, bool kv_bf16);
  // Its paths: the tensor-core prefill (false: not applicable, nothing enqueued), and the split
  // kernels of attention_batch.cu (decode_tc: decode batches over a bf16 cache on tensor cores).
  bool AttentionPrefillTc(const float* q, const std::vector<cuda::AttentionSeqDesc>& desc, int num_heads,
                          int num_kv_heads, int head_dim, float* out, bool kv_bf16);
  void AttentionSplit(const float* q, const std::vector<cuda::AttentionSeqDesc>& desc, int num_heads, int num_kv_heads,
                      int head_dim, float* out, bool kv_bf16, bool decode_tc);
  // The split workspace and merge counters a plan needs (false: not available, nothing launched).
  bool AttentionScratch(const cuda::AttentionBatchPlan& plan, float** ws, unsigned** counters);
  // A device copy of the descriptors when more than fit in a launch's parameters, else nullptr.
  const cuda::AttentionSeqDesc* DeviceDescriptors(const std::vector<cuda::AttentionSeqDesc>& desc);
  void Stage(void* dst, const void* src, size_t bytes);
  void RetireFinishedCopies(bool all_done);
  // y = x . w^T (+ y) on 16-bit operands (type t) with fp32 output whose rows are ldy floats
  // apart: LtGemm, else cublasGemmEx.
  void Gemm16(DType t, const void* w, const void* x, float* y, int64_t m, int64_t n, int64_t k, int64_t ldy,
              bool accumulate);
  // Whether a caller's twin replaces the rounding of x for weights of this type.
  static bool TwinServes(const uint16_t* twin, DType weights);
  // Whether Gemm takes x . w^T on the GEMV (decode rows; fp32 x, no rounding).
  bool GemvTakes(const float* x, int64_t m, const Weight& w) const;
  // GemmGroup past the GEMV's rows.
  void GemmGroup16(const float* x, const uint16_t* twin, int64_t m, int count, const Weight* const* ws,
                   const Weight* const* biases, float* const* ys);
  // Gemm's body for packed weights (kQ8, kQ4, kMxfp4, kFp8Block; bias added by Gemm).
  void GemmQuantized(const float* x, int64_t m, const Weight& w, float* y, bool accumulate);

  CudaBackendOptions options_;
  bool reduced_precision_attention_ = false;
  bool kv_bf16_ = false;  // SetKvCacheDType
  std::string name_;
  size_t budget_ = 0;
  int num_sms_ = 0;
  std::atomic<size_t> bytes_in_use_{0};
  Status error_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  void* cublas_ws_ = nullptr;
  std::unique_ptr<cuda::LtGemm> lt_;  // 16-bit GEMMs past the GEMV's rows (gemm_lt.h)
  // Pinned staging ring and the copies still reading it (oldest first).
  std::byte* staging_ = nullptr;
  size_t staging_head_ = 0;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  // Scratch: activations converted for mixed-precision GEMMs; attention split workspace.
  void* act_ = nullptr;
  size_t act_cap_ = 0;
  void* attn_ws_ = nullptr;
  size_t attn_ws_cap_ = 0;
  // Gemm on a quantized weight past the GEMV's rows: a tile of its rows dequantized to bf16.
  void* dequant_ = nullptr;
  size_t dequant_cap_ = 0;
  // AttentionBatch: sequence descriptors on the device when too many to pass in the launch
  // (rewritten in stream order per call); the decode kernel's split counters (kept zeroed).
  void* attn_desc_ = nullptr;
  size_t attn_desc_cap_ = 0;
  void* attn_counters_ = nullptr;
  size_t attn_counters_cap_ = 0;
  // MoeRouted: each pair's SwiGLU activation and down projection.
  void* moe_act_ = nullptr;
  size_t moe_act_cap_ = 0;
  void* moe_y_ = nullptr;
  size_t moe_y_cap_ = 0;
  // ExpertMlps: x in 16 bits, the gate and up products of a group of experts (16 bits), the
  // GEMV-sized experts' activations (fp32); the side streams, their cuBLASLt workspaces and the
  // events that fork them from and join them to the compute stream.
  void* mlp_x16_ = nullptr;
  size_t mlp_x16_cap_ = 0;
  void* mlp_gu_ = nullptr;
  size_t mlp_gu_cap_ = 0;
  void* mlp_small_ = nullptr;
  size_t mlp_small_cap_ = 0;
  // ... and for the grouped experts: their down products (16 bits) and the device table of the
  // grouped calls' pointers and the rows' segments.
  void* mlp_down16_ = nullptr;
  size_t mlp_down16_cap_ = 0;
  void* mlp_table_ = nullptr;
  size_t mlp_table_cap_ = 0;
  bool grouped_failed_ = false;  // a grouped call was refused once: the per-expert GEMMs serve
  struct SideStream {
    cudaStream_t stream = nullptr;
    void* workspace = nullptr;
    cudaEvent_t done = nullptr;
  };
  std::vector<SideStream> side_;
  cudaEvent_t fork_ = nullptr;
  // Creates the side streams on first use; false (logged) when they cannot be made.
  bool EnsureSideStreams(int count);
  // y_i [rows_i, n] = x_i [rows_i, k] . w_i [n, k]^T for `count` problems of one 16-bit type, in
  // one cublasGemmGroupedBatchedEx call on the compute stream (products in t, fp32 sums); the
  // pointer arrays are on the device. CUBLAS_STATUS_NOT_SUPPORTED where cuBLAS predates it.
  cublasStatus_t GroupedGemm16(DType t, int count, int64_t n, int64_t k, const int* rows, const void* const* w,
                               const void* const* x, void* const* y);
  // MoeRouted past the GEMV's rows: x in 16 bits and the grouping (moe_grouped.cu).
  void* moe_xb_ = nullptr;
  size_t moe_xb_cap_ = 0;
  void* moe_meta_ = nullptr;
  size_t moe_meta_cap_ = 0;
  std::vector<std::pair<void*, size_t>> weights_;  // owned device weights
  // UploadStepSeqs: the step's descriptors on the device (one address while it is big enough)
  // and on the host (for the launches' shapes).
  void* step_desc_ = nullptr;
  size_t step_desc_cap_ = 0;
  std::vector<cuda::AttentionSeqDesc> step_host_;
  cuda::AttentionBatchPlan step_plan_;
  int step_heads_ = 0, step_kv_heads_ = 0, step_head_dim_ = 0, step_max_new_ = 0;
  // Graphs: recorded ones by id; while recording, whether something the recording cannot hold
  // was asked for (an upload, a download, a sync, a scratch that must grow), and the error status
  // before it began (an error during a recording is the recording's, not the backend's).
  std::vector<cudaGraphExec_t> graphs_;
  bool capturing_ = false;
  bool capture_refused_ = false;
  std::string capture_refusal_;
  // Incremented whenever a scratch buffer moves (EnsureScratch).
  uint64_t layout_generation_ = 0;
  // Refuses the recording in progress (true) with `why`; false when not recording.
  bool RefuseCapture(const char* why);
};

}  // namespace ef::runtime
