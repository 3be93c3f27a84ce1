// Backend: the operations the engine needs, on memory the backend owns.
//
// The engine orchestrates; a backend computes. Every pointer an op takes is backend memory
// (host memory for the CPU backend, device memory for CUDA) unless its name says Host.
// Activations are fp32; weights may be F32, F16 or BF16 and are converted on use with fp32
// accumulation (Gemm also takes the packed kQ8/kQ4/kMxfp4/kFp8Block weights, dequantized on use). Ops are enqueued in
// order on the backend's compute stream; results are visible to the host after CopyToHost (which synchronises). The CPU
// backend is the reference every other backend is tested against. Not thread-safe: one engine drives one backend.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "runtime/core/dtype.h"
#include "runtime/core/status.h"

namespace ef::runtime {

// A 2-D weight [rows, cols] (row-major, as in PyTorch's Linear: y = x W^T) or a 1-D vector
// (rows = 1). `data` is backend memory; Weight does not own it. A packed weight (kQ8, kQ4, kMxfp4,
// kFp8Block) is one block of WeightBytes (values, then scales; runtime/core/quant_format.h and
// block_scaled_format.h) starting 16-byte aligned; only Gemm takes it.
struct Weight {
  DType dtype = DType::kF32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  size_t nbytes() const { return WeightBytes(dtype, rows, cols); }
  bool empty() const { return data == nullptr; }
};

class Backend;
struct RowSampling;  // runtime/core/sample_row.h

// One sequence of a batched attention call (Backend::AttentionBatch). Its query rows are
// q[q_row, q_row + n_new) of the batch (and the same rows of out); they are the last n_new of
// n_total positions whose keys/values are k[n_total, kv_heads*hd], v[...] (backend memory), of the
// backend's KV-cache dtype (Backend::SetKvCacheDType: fp32 unless set).
// Paged (blocks set): k and v are a block pool and position t is its row
// blocks[t / block_size] * block_size + t % block_size (KvRow); the table is backend memory.
struct AttentionSeq {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_row = 0;
  int n_new = 0;
  int n_total = 0;
  const int32_t* blocks = nullptr;  // null: position t is row t
  int block_size = 0;               // a power of two where blocks is set
};

// The pool row of position t of a sequence (AttentionSeq: contiguous or paged).
inline int64_t KvRow(const AttentionSeq& s, int64_t t) {
  return s.blocks ? static_cast<int64_t>(s.blocks[t / s.block_size]) * s.block_size + t % s.block_size : t;
}

// Rotary embedding with a precomputed inverse-frequency table (RopeTable), applied to a slice of
// each head: the rope part of a DeepSeek MLA head, a shared rope key, or a whole GPT-OSS head.
struct RopeSpec {
  int rot_dim = 0;                  // rotated floats per head (even); inv_freq has rot_dim / 2 entries
  int64_t row_stride = 0;           // floats between rows of x
  int head_stride = 0;              // floats between heads within a row
  int offset = 0;                   // first rotated float within a head
  const float* inv_freq = nullptr;  // backend memory, [rot_dim / 2]
  float scale = 1.f;                // multiplies cos and sin (YaRN's attention factor)
  bool interleaved = false;         // pairs (2i, 2i+1) (DeepSeek) instead of (i, i + rot_dim/2) (rotate-half)
};

// Shapes and options of AttentionEx. Query head h of a row is q[row * q_stride + h * qk_dim, +qk_dim);
// it reads KV head h / (num_heads / num_kv_heads), whose key of position t is
// k[t * k_stride + kvh * qk_dim, +qk_dim) and value v[t * v_stride + kvh * v_dim, +v_dim). The output
// of head h is out[row * out_stride + h * v_dim, +v_dim).
struct AttentionSpec {
  int num_heads = 0;
  int num_kv_heads = 0;
  int qk_dim = 0;
  int v_dim = 0;
  int64_t q_stride = 0, k_stride = 0, v_stride = 0, out_stride = 0;
  float scale = 1.f;             // multiplies q.k
  int window = 0;                // > 0: a query at position p sees keys (p - window, p] only (sliding window)
  const float* sinks = nullptr;  // backend memory [num_heads] or null: a per-head logit that joins the softmax
                                 // denominator and carries no value (GPT-OSS attention sinks)
};

// Owns backend memory; frees it on destruction.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend* backend, void* ptr, size_t bytes) : backend_(backend), ptr_(ptr), bytes_(bytes) {}
  ~Buffer();
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return ptr_; }
  float* f32() const { return static_cast<float*>(ptr_); }
  int32_t* i32() const { return static_cast<int32_t*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  Backend* backend_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// A MoE layer's routed experts resident in backend memory, as tables of pointers there (for
// Backend::MoeRouted): gate[e], up[e] ([inter, hidden]) and down[e] ([hidden, inter]) of expert e,
// all of `dtype`, no biases.
struct RoutedExpertTable {
  const void* const* gate = nullptr;
  const void* const* up = nullptr;
  const void* const* down = nullptr;
  DType dtype = DType::kBF16;
  int num_experts = 0;
  int64_t hidden = 0, inter = 0;
};

enum class BackendKind { kCpu, kCuda };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual BackendKind kind() const = 0;
  virtual std::string name() const = 0;  // "cpu", "cuda:0 (NVIDIA H200)", ...

  // --- memory ---
  // Allocates zero-initialised memory; ResourceExhausted (naming the budget) when it cannot.
  virtual StatusOr<Buffer> Allocate(size_t bytes) = 0;
  virtual void Free(void* ptr, size_t bytes) = 0;
  virtual void CopyToDevice(void* dst, const void* host_src, size_t bytes) = 0;
  // Waits for all enqueued work, then copies.
  virtual void CopyToHost(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void CopyOnDevice(void* dst, const void* src, size_t bytes) = 0;
  // Several CopyOnDevice in one call (e.g. the KV appends of a batch): items[i] copies bytes from
  // src to dst (host array of descriptors, read before the call returns). No item's destination
  // may overlap another item's source or destination: the order among items is not kept (CUDA
  // runs small items in one kernel and large ones on the copy engine). Default: one by one.
  struct CopyItem {
    void* dst;
    const void* src;
    size_t bytes;
  };
  virtual void CopyBatch(const CopyItem* items, int num_items) {
    for (int i = 0; i < num_items; ++i) CopyOnDevice(items[i].dst, items[i].src, items[i].bytes);
  }
  // CopyBatch that rounds fp32 to bf16 on the way (nearest even): item i reads bytes / 4 floats
  // from src and writes as many bf16 values to dst (the KV appends of a bf16 KV cache). Same
  // contract on overlaps. A backend without it says so in SetKvCacheDType.
  virtual void CopyBatchToBf16(const CopyItem* items, int num_items) {}
  // Zeroes bytes of backend memory (enqueued; no host transfer).
  virtual void SetZero(void* dst, size_t bytes) = 0;
  virtual void Synchronize() = 0;
  // Makes the calling thread use this backend's device. A thread other than the one that created
  // the backend calls it once before driving the backend (CUDA's current device is per host
  // thread: without it a second GPU's pointers meet the first GPU's context). CPU: nothing.
  virtual Status BindToCallingThread() { return Status::Ok(); }
  // The first error of an enqueued op (ops return nothing; a failed launch or copy is kept here,
  // sticky). The engine checks it after every forward pass.
  virtual Status status() const { return Status::Ok(); }
  // Makes a checkpoint tensor (host bytes) usable by ops. CPU: the same bytes, no copy.
  // CUDA: a device copy that the backend owns until it is destroyed.
  virtual StatusOr<Weight> UploadWeight(DType dtype, const void* host_data, int64_t rows, int64_t cols) = 0;
  // Bytes of backend memory in use (weights + buffers), for accounting.
  virtual size_t bytes_in_use() const = 0;

  // --- numerics ---
  // The model's GEMMs already round activations to 16 bits (bf16/f16 weights); attention may then
  // stage Q, K, V and the softmax weights P in bf16 with fp32 accumulation (CUDA: tensor-core
  // prefill attention, and decode attention over a bf16 KV cache; other backends ignore it). Off by default: the fp32
  // path is the exact reference. Applies to the ops enqueued after the call.
  virtual void SetReducedPrecisionAttention(bool on) {}
  // The dtype of the keys and values AttentionBatch reads (AttentionSeq::k, v): kF32 (default) or
  // kBF16 (half the bytes per cached token; scores and softmax still in fp32). AttentionEx reads
  // fp32 whatever is set. False when the backend cannot read `t`.
  virtual bool SetKvCacheDType(DType t) { return t == DType::kF32; }

  // --- ops (enqueued in order) ---
  // out[i, :] = table[ids[i], :]
  virtual void Embed(const int32_t* ids, int n, const Weight& table, float* out) = 0;
  // out = x / rms(x) * w over rows of length dim (w has dim elements). out may alias x.
  virtual void RmsNorm(const float* x, int64_t rows, int dim, const Weight& w, float eps, float* out) = 0;

  // bf16 twins. The residual stream and every op's output stay fp32 (the sums that accuracy needs,
  // and the exact path of fp32 models); where a backend's GEMMs read 16-bit operands it rounds x to
  // bf16 first. A twin is that rounding (nearest even) written by the op that produces x, beside x,
  // so that the GEMMs reading x (q, k and v; the router; the experts) need no conversion pass each:
  // the same bits, fewer bytes moved. A twin starts an allocation of its own (its alignment can
  // choose a GEMM's algorithm; a backend rounds x itself for one that does not). Whether a twin
  // pays for `rows` rows of activations read by bf16 weights (CUDA: rows past its GEMV's); asked
  // before making one.
  virtual bool Bf16Twins(int64_t rows, DType weights) const { return false; }
  // RmsNorm, and out rounded to bf16 into out16 (rows * dim values).
  virtual void RmsNormTwin(const float* x, int64_t rows, int dim, const Weight& w, float eps, float* out,
                           uint16_t* out16) = 0;
  // The residual add and the next norm as one op: x += add (Add's bits), then RmsNorm of the sums
  // into out, and its twin into out16 unless null. add must not alias x or out.
  virtual void AddRmsNorm(float* x, const float* add, int64_t rows, int dim, const Weight& w, float eps, float* out,
                          uint16_t* out16) {
    Add(x, add, rows * dim);
    if (out16)
      RmsNormTwin(x, rows, dim, w, eps, out, out16);
    else
      RmsNorm(x, rows, dim, w, eps, out);
  }
  // y[m, n] = x[m, k] . w[n, k]^T (+ bias[n]) (+ y if accumulate).
  virtual void Gemm(const float* x, int64_t m, const Weight& w, const Weight* bias, float* y, bool accumulate) = 0;
  // Rotary embedding (rotate-half convention) in place on x[rows, num_heads * head_dim] at positions[rows].
  virtual void Rope(float* x, const int32_t* positions, int64_t rows, int num_heads, int head_dim, float theta) = 0;
  // Rope on a layer's q[rows, num_heads * head_dim] and k[rows, num_kv_heads * head_dim] (a backend
  // may do both in one launch). Default: Rope on each.
  virtual void RopeQK(float* q, float* k, const int32_t* positions, int64_t rows, int num_heads, int num_kv_heads,
                      int head_dim, float theta) {
    Rope(q, positions, rows, num_heads, head_dim, theta);
    Rope(k, positions, rows, num_kv_heads, head_dim, theta);
  }
  // Causal attention of one sequence: q[n_new, heads*hd] are the last n_new of n_total positions
  // whose keys/values are k[n_total, kv_heads*hd], v[...]. out[n_new, heads*hd].
  virtual void Attention(const float* q, int n_new, const float* k, const float* v, int n_total, int num_heads,
                         int num_kv_heads, int head_dim, float* out) = 0;
  // Attention of num_seqs sequences in one call: for each seqs_host[s] (host memory, read before
  // the call returns), the same as Attention(q + q_row * heads*hd, n_new, k, v, n_total, ...,
  // out + q_row * heads*hd). Sequences' query rows must not overlap.
  virtual void AttentionBatch(const float* q, const AttentionSeq* seqs_host, int num_seqs, int num_heads,
                              int num_kv_heads, int head_dim, float* out) = 0;
  // RopeTable: rotary embedding in place on num_heads slices of each of `rows` rows (see RopeSpec):
  // angle_i = positions[r] * inv_freq[i] (fp32), rotated by (cos, sin) * scale.
  virtual void RopeTable(float* x, const int32_t* positions, int64_t rows, int num_heads, const RopeSpec& spec) = 0;
  // Causal attention of num_seqs sequences with the layout and options of `spec`: different query/key
  // and value head sizes (MLA), strided rows (MLA's latent cache), a sliding window and sinks
  // (GPT-OSS). AttentionSeq as for AttentionBatch; k and v are the bases their strides apply to.
  virtual void AttentionEx(const float* q, const AttentionSeq* seqs_host, int num_seqs, const AttentionSpec& spec,
                           float* out) = 0;
  // Per-head GEMM: y[r * y_stride + h * y_head_stride + j] = sum_i x[r * x_stride + h * x_head_stride + i] *
  // w[h * n + j, i] for j < n, i < w.cols; w is [num_heads * n, k]. (MLA's absorbed key and value projections.)
  virtual void GemmPerHead(const float* x, int64_t rows, int num_heads, int64_t x_stride, int x_head_stride,
                           const Weight& w, int n, float* y, int64_t y_stride, int y_head_stride) = 0;
  // dst[r * dst_pitch + i] = src[r * src_pitch + i] for r < rows, i < width (floats; regions do not overlap).
  virtual void Copy2D(float* dst, int64_t dst_pitch, const float* src, int64_t src_pitch, int64_t width,
                      int64_t rows) = 0;
  // GPT-OSS expert activation: g = min(gate, limit), u = clamp(up, -limit, limit),
  // out = (u + 1) * g * sigmoid(alpha * g). out may alias gate or up.
  virtual void ClampedSwiGlu(const float* gate, const float* up, float* out, int64_t n, float alpha, float limit) = 0;
  // out[i] = silu(gate[i]) * up[i]
  virtual void SiluMul(const float* gate, const float* up, float* out, int64_t n) = 0;
  // out[m, n] = silu(x . gate^T) * (x . up^T) (gate and up [n, k], no biases) as one op, bitwise
  // what Gemm, Gemm and SiluMul give, when the backend has a fused kernel for these shapes (CUDA:
  // decode rows, one weight stream pass and no round trip of the two products through memory).
  // Returns false, having enqueued nothing, otherwise.
  virtual bool GateUpSilu(const float* x, int64_t m, const Weight& gate, const Weight& up, float* out) { return false; }
  // One expert's rows for ExpertMlps: rows [begin, begin + rows) of x and y.
  struct ExpertMlpRows {
    const Weight* gate;
    const Weight* up;
    const Weight* down;
    int64_t begin;
    int64_t rows;
  };
  // y[rows of e] = down . (silu(gate . x) * (up . x)) for `count` experts (no biases), each over
  // its own rows of x, when the backend has a path for all of them at once (CUDA: 16-bit dense
  // weights; x rounded to 16 bits once, the two products kept in 16 bits, the experts on several
  // streams so that small GEMMs fill the device together). An expert's result does not depend on
  // the others or on `count`. Returns false, having enqueued nothing, otherwise (the caller runs
  // GateUpSilu / Gemm per expert). x16: x's bf16 twin (Bf16Twins) or null.
  virtual bool ExpertMlps(const float* x, const uint16_t* x16, const ExpertMlpRows* experts, int count, float* y) {
    return false;
  }
  // ys[i][m, n_i] = x . ws[i]^T (+ biases[i] when not null) for `count` weights of one input (q, k
  // and v of attention; the router), as Gemm computes each; a backend may run them in one launch,
  // summing each row as Gemm would for some split of it, and rounds x to 16 bits once for all
  // (x16: x's bf16 twin, see Bf16Twins, or null). Default: one Gemm each.
  virtual void GemmGroup(const float* x, const uint16_t* x16, int64_t m, int count, const Weight* const* ws,
                         const Weight* const* biases, float* const* ys) {
    for (int i = 0; i < count; ++i) Gemm(x, m, *ws[i], biases[i], ys[i], false);
  }
  // The routed experts of a MoE layer with the routing kept in backend memory (RouterTopK's ids
  // and weights): resid[t, :] += the sum over token t's top_k experts, in increasing expert id, of
  // weights[t, j] * down(silu(x[t] . gate^T) * (x[t] . up^T)). CUDA: up to kGemvMaxRows tokens,
  // bitwise what GateUpSilu, Gemm, ScatterAddRows per expert and Add give for these rows; past
  // them, the pairs grouped by expert on the device and each expert's weights read once (rounding
  // as the host-routed path's cuBLAS GEMMs: x and the activation in 16 bits, fp32 sums, a
  // different summation order). Needs no host copy of the routing, so
  // a decode step need not wait for the device at every layer. An id outside [0, num_experts)
  // (the router's -1 for a row of NaN logits) adds nothing and reads no weight; the caller checks
  // the ids afterwards. Returns false, having enqueued nothing, when the backend has no such path
  // for the shapes (CPU; more tokens than it serves).
  virtual bool MoeRouted(const float* x, int64_t tokens, int top_k, const int32_t* ids, const float* weights,
                         const RoutedExpertTable& experts, float* resid) {
    return false;
  }
  // The most tokens MoeRouted serves (0: it has no such path).
  virtual int MoeRoutedMaxTokens() const { return 0; }

  // --- a step's sequences on the device, and graphs ---
  // A decode step recorded once as a graph and replayed must not carry its per-step values (KV
  // lengths, block tables, where new rows go) in what is recorded: they live in device memory the
  // backend keeps at one address, rewritten before each step, and the step ops read them when
  // they run. StepSeqs(): whether the backend has these ops.
  virtual bool StepSeqs() const { return false; }
  // Writes the step's sequences (as for AttentionBatch, paged; k and v are not read: the step ops
  // take the layer's pools) to that memory, enqueued before the ops that read it, with the
  // attention shape AttentionStep will use. Returns a fingerprint of what the backend decides on
  // the host from these values (launch shapes, how attention splits its keys): two steps with the
  // same number of sequences and the same fingerprint record the same ops. Host memory, read
  // before the call returns.
  virtual StatusOr<uint64_t> UploadStepSeqs(const AttentionSeq* seqs_host, int num_seqs, int num_heads,
                                            int num_kv_heads, int head_dim) {
    return Unimplemented("this backend has no step sequences on the device");
  }
  // The uploaded sequences' new rows of k (width k_width values per row) and of v (v_width; v may
  // be null) written to their positions n_total - n_new ... n_total - 1 in the layer's pools, in
  // the KV cache's dtype: what CopyBatch / CopyBatchToBf16 of each row to its KvRow does.
  virtual void AppendKvStep(void* k_pool, void* v_pool, const float* k, const float* v, int64_t k_width,
                            int64_t v_width) {}
  // RopeQK of the uploaded sequences' rows of q and k (positions[row]) and AppendKvStep of the
  // rotated k and of v (widths num_kv_heads * head_dim) as one op, where the backend has it: the
  // same bits as the two. Returns false, having enqueued nothing, otherwise.
  virtual bool RopeQKAppendStep(float* q, float* k, const float* v, const int32_t* positions, int num_heads,
                                int num_kv_heads, int head_dim, float theta, void* k_pool, void* v_pool) {
    return false;
  }
  // AttentionBatch over the uploaded sequences with the layer's pools as their k and v: the same
  // numbers as AttentionBatch given those descriptors.
  virtual void AttentionStep(const float* q, const void* k_pool, const void* v_pool, float* out) {}
  // Graphs: between BeginGraph and EndGraph ops are recorded, not run; LaunchGraph runs a recorded
  // graph with one launch, in stream order. Recording must not move data between host and device
  // (CopyToDevice, CopyToHost, Synchronize) nor grow the backend's own buffers: such a recording
  // fails at EndGraph (Unavailable, nothing ran, nothing is kept broken) and the caller runs the
  // ops the usual way.
  virtual bool Graphs() const { return false; }
  virtual Status BeginGraph() { return Unimplemented("this backend records no graphs"); }
  virtual StatusOr<int> EndGraph() { return Unimplemented("this backend records no graphs"); }
  virtual Status LaunchGraph(int graph) { return Unimplemented("this backend records no graphs"); }
  // Frees every recorded graph (their ids become invalid).
  virtual void DropGraphs() {}
  // Changes whenever memory the backend owns and its ops use (scratch) moves: a graph recorded
  // before then may point at freed memory and must not be launched.
  virtual uint64_t layout_generation() const { return 0; }
  // y[i] += x[i]
  virtual void Add(float* y, const float* x, int64_t n) = 0;
  // x[i] = clamp(x[i], -c, c)
  virtual void Clamp(float* x, int64_t n, float c) = 0;
  // Router: softmax over each row of logits[rows, num_experts], top-k (highest first, ties to the
  // lower id), weights renormalised to sum 1 when `renormalize`.
  virtual void RouterTopK(const float* logits, int64_t rows, int num_experts, int k, bool renormalize, int32_t* ids,
                          float* weights) = 0;
  // out[r] = the first index of the largest value of row r of x[rows, cols] (greedy sampling on the
  // backend); NaN never wins and a row without a number gives 0, as runtime::ArgMax.
  virtual void ArgMaxRows(const float* x, int64_t rows, int64_t cols, int32_t* out) = 0;
  // out[r] = runtime::SampleRow(row r of x[rows, cols], params[r]) (runtime/core/sample_row.h: the
  // same token the host draws; greedy rows, inv_temperature 0, get the arg max). params is backend
  // memory.
  virtual void SampleRows(const float* x, int64_t rows, int64_t cols, const RowSampling* params, int32_t* out) = 0;
  // Whether the engine should call SampleRows; when not, it brings sampled rows' logits to the host
  // and draws there (the same tokens). EF_CUDA_SAMPLE_ROWS=0 turns the CUDA kernel off.
  virtual bool SamplesRows() const { return true; }
  // dst[i, :] = src[idx[i], :]
  virtual void GatherRows(const float* src, const int32_t* idx, int64_t n, int dim, float* dst) = 0;
  // GatherRows, and dst rounded to bf16 into dst16 (a twin, see Bf16Twins).
  virtual void GatherRowsTwin(const float* src, const int32_t* idx, int64_t n, int dim, float* dst,
                              uint16_t* dst16) = 0;
  // dst[idx[i], :] += scale[i] * src[i, :]   (idx distinct within one call)
  virtual void ScatterAddRows(const float* src, const int32_t* idx, const float* scale, int64_t n, int dim,
                              float* dst) = 0;
  // The MoE combine in one call: for each token t < tokens and j = 0 .. k - 1 in turn,
  //   dst[t, :] += scale[r] * src[r, :]   with r = pos[t * k + j].
  // Where pos lists each token's rows by ascending expert, this adds what ScatterAddRows once per
  // expert (ascending) adds, in the same order: the same bits.
  virtual void CombineRows(const float* src, const int32_t* pos, const float* scale, int64_t tokens, int k, int dim,
                           float* dst) = 0;
  // dst[i, :] += sigmoid(gate_logit[i]) * src[i, :]   (Qwen2-MoE shared expert)
  virtual void AddSigmoidGated(const float* src, const float* gate_logit, int64_t rows, int dim, float* dst) = 0;
};

// Whether a weight of `dtype` with `cols` columns is one UploadWeight takes: F32, F16, BF16, or a
// packed format whose group or block divides cols. InvalidArgument naming `backend` otherwise.
[[nodiscard]] Status CheckWeightType(const char* backend, DType dtype, int64_t cols);

StatusOr<std::unique_ptr<Backend>> MakeCpuBackend();
// "cpu", "cuda" or "auto" (cuda when built with it and a GPU is visible, else cpu).
StatusOr<std::unique_ptr<Backend>> MakeBackend(const std::string& name, int device = 0);
// Defined by the CUDA backend when compiled in; the CPU build provides a stub that says why.
StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device);
bool CudaDeviceAvailable();

}  // namespace ef::runtime
