// Launchers of the CUDA backend's kernels: stateless free functions over raw device pointers,
// enqueued on `stream`. They own nothing and never synchronise; each returns the launch error
// (cudaGetLastError) for the caller's CUDA_CHECK. One op per .cu in this folder; host code
// includes only this plain header, never a .cuh.
//
// Weights and weight-like vectors come with their DType (F32, F16 or BF16; kQ8/kQ4 where a name
// says quant) and are converted to fp32 on load; activations are fp32 unless a name says otherwise.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "runtime/core/dtype.h"

namespace ef::runtime {
struct RowSampling;  // runtime/core/sample_row.h
}  // namespace ef::runtime

namespace ef::runtime::cuda {

// out[i, :] = table[ids[i], :] (table [*, cols] of dtype dt)
cudaError_t launch_embed(const int32_t* ids, int n, const void* table, DType dt, int64_t cols, float* out,
                         cudaStream_t stream);

// out = x / rms(x) * w over rows of length dim; out may alias x. out16 (or null): out rounded to bf16.
cudaError_t launch_rms_norm(const float* x, int64_t rows, int dim, const void* w, DType wdt, float eps, float* out,
                            uint16_t* out16, cudaStream_t stream);
// x += add, then launch_rms_norm of the sums (out must not alias add).
cudaError_t launch_add_rms_norm(float* x, const float* add, int64_t rows, int dim, const void* w, DType wdt, float eps,
                                float* out, uint16_t* out16, cudaStream_t stream);

// Whether kernels launched through LaunchPdl (kernel_util.cuh) allow programmatic dependent
// launch (default on); off, they launch as usual.
void SetPdlEnabled(bool on);
bool PdlEnabled();

// Rotate-half rotary embedding in place on x[rows, num_heads * head_dim].
cudaError_t launch_rope(float* x, const int32_t* positions, int64_t rows, int num_heads, int head_dim, float theta,
                        cudaStream_t stream);
// The same on q[rows, num_heads * head_dim] and k[rows, num_kv_heads * head_dim] in one launch.
cudaError_t launch_rope_qk(float* q, float* k, const int32_t* positions, int64_t rows, int num_heads, int num_kv_heads,
                           int head_dim, float theta, cudaStream_t stream);

// Causal GQA attention of many sequences in one launch (see Backend::AttentionBatch).
// plan_attention_batch reads the descriptors on the host and chooses the kernel and the key
// splits. Up to kAttentionInlineSeqs descriptors travel in the launch's parameters (seqs_dev may
// be null); more are read from seqs_dev, a device copy of seqs_host. `workspace` holds
// plan.workspace_floats floats when plan.num_splits > 1, else may be null. `counters` holds
// plan.num_counters zeroed uint32 (the decode kernel merges its splits itself and leaves them
// zeroed again), or is null (a second kernel merges).
// k and v: fp32, or bf16 where a launch says kv_bf16 (a bf16 KV cache).
// Paged (blocks non-null): k and v are a block pool and position t is its row
// blocks[t >> block_shift] << block_shift | t & (block size - 1) (AttentionSeq::blocks).
struct AttentionSeqDesc {
  const void* k;
  const void* v;
  int64_t q_row;
  int n_new;
  int n_total;
  const int32_t* blocks = nullptr;
  int block_shift = 0;
};
struct AttentionBatchPlan {
  int num_splits = 1;
  int max_n_new = 0;     // longest query chunk (sizes the grid)
  int64_t num_rows = 0;  // max(q_row + n_new): query rows the workspace covers
  size_t workspace_floats = 0;
  // Every sequence has at most one new row (a decode step) and the shapes suit the decode kernel:
  // it reads K/V in tiles of decode_tile keys, all query heads of one KV head per block. The
  // launcher still falls back to the general kernel if q or out are not 16-byte aligned.
  bool decode = false;
  int decode_tile = 0;
  // A decode plan for the tensor-core decode kernel (plan_attention_batch's decode_tensor_cores, a
  // bf16 cache and shapes it serves); a launch over an fp32 cache takes the fp32 decode kernel.
  bool decode_tc = false;
  int64_t num_counters = 0;
};
inline constexpr int kAttentionInlineSeqs = 16;
// kv_bf16: the plan is for a bf16 cache (the decode kernel's tiles hold twice the keys). A plan
// made for one cache dtype launches with the other too (at worst on the general kernel).
// decode_blocks_per_sm: the decode kernel's splits aim for this many blocks per SM (0: no split).
// decode_tensor_cores: decode batches over a bf16 cache may take the tensor-core decode kernel
// (bf16 Q and P, as the tensor-core prefill: the backend's reduced-precision attention).
// 3: on an H100 (132 SMs, 5 decode blocks fit an SM), batch 64 of Mixtral's 8 KV heads (512
// blocks) ran its attention in 70.6 us unsplit against 80.1 us split in two under 4; batches 1
// and 16 the same either way (16.1 / 16.5 us, 31.6 / 31.3 us).
inline constexpr int kDecodeBlocksPerSmDefault = 3;
AttentionBatchPlan plan_attention_batch(const AttentionSeqDesc* seqs_host, int num_seqs, int num_heads,
                                        int num_kv_heads, int head_dim, int num_sms, bool kv_bf16 = false,
                                        int decode_blocks_per_sm = kDecodeBlocksPerSmDefault,
                                        bool decode_tensor_cores = false);
cudaError_t launch_attention_batch(const float* q, const AttentionSeqDesc* seqs_host, const AttentionSeqDesc* seqs_dev,
                                   int num_seqs, const AttentionBatchPlan& plan, int num_heads, int num_kv_heads,
                                   int head_dim, float* out, float* workspace, unsigned* counters, cudaStream_t stream,
                                   bool kv_bf16 = false);
// The same over a step's sequences (Backend::AttentionStep): descriptors only from the device
// array seqs_dev (read when the kernels run, so a recorded graph sees each replay's values), every
// sequence's k and v the layer's pools. `plan` comes from the host copy of the descriptors.
cudaError_t launch_attention_step(const float* q, const AttentionSeqDesc* seqs_dev, int num_seqs,
                                  const AttentionBatchPlan& plan, const void* k_pool, const void* v_pool, int num_heads,
                                  int num_kv_heads, int head_dim, float* out, float* workspace, unsigned* counters,
                                  cudaStream_t stream, bool kv_bf16);
// The new rows of a step's sequences to their KV rows (Backend::AppendKvStep): row i < n_new of
// sequence s (k + (q_row + i) * k_width, k_width floats; v likewise unless null) goes to pool row
// KvRow(position n_total - n_new + i), as fp32 or rounded to bf16 (nearest even). Descriptors
// from the device array, as launch_attention_step; max_n_new bounds every sequence's n_new.
cudaError_t launch_kv_append_step(const AttentionSeqDesc* seqs_dev, int num_seqs, int max_n_new, void* k_pool,
                                  void* v_pool, const float* k, const float* v, int64_t k_width, int64_t v_width,
                                  bool kv_bf16, cudaStream_t stream);
inline constexpr int kRopeAppendMaxHeadDim = 512;
// RoPE of the step's rows of q ([rows, num_heads * head_dim]) and k ([rows, num_kv_heads *
// head_dim]) at positions[row], in place, and the appends of launch_kv_append_step of the rotated
// k and of v (widths num_kv_heads * head_dim) in one launch: the bits of launch_rope_qk and then
// launch_kv_append_step. head_dim even, at most kRopeAppendMaxHeadDim.
cudaError_t launch_rope_append_step(const AttentionSeqDesc* seqs_dev, int num_seqs, int max_n_new, float* q, float* k,
                                    const float* v, const int32_t* positions, int num_heads, int num_kv_heads,
                                    int head_dim, float theta, void* k_pool, void* v_pool, bool kv_bf16,
                                    cudaStream_t stream);

// Causal GQA attention of prefill chunks on tensor cores (flash attention; see
// attention_prefill_tc.cu): the contract of launch_attention_batch (descriptors inline up to
// kAttentionInlineSeqs, else from seqs_dev; seqs_host is always read, for the grids), without key
// splits. Q, K, V and the softmax weights are rounded to bf16 for the products (relative error
// <= 2^-9 each); accumulation and softmax are fp32. For the backend's reduced-precision attention
// only. attention_prefill_tc_supported(): head_dim 64 or 128, num_heads a multiple of
// num_kv_heads, q, out and every sequence's k and v 16-byte aligned. `workspace` (16-byte
// aligned) holds attention_prefill_tc_workspace_bytes(): the bf16 copy of the keys and values of
// every sequence with new rows (half the bytes of their fp32 K/V), rewritten by each launch.
// Chunks shorter than kAttentionPrefillTcMinRows (decode, short mixes) keep the fp32 kernels: a
// 64-row tile would be mostly padding.
inline constexpr int kAttentionPrefillTcMinRows = 16;
bool attention_prefill_tc_supported(const AttentionSeqDesc* seqs_host, int num_seqs, int num_heads, int num_kv_heads,
                                    int head_dim, const float* q, const float* out);
size_t attention_prefill_tc_workspace_bytes(const AttentionSeqDesc* seqs_host, int num_seqs, int num_kv_heads,
                                            int head_dim);
cudaError_t launch_attention_prefill_tc(const float* q, const AttentionSeqDesc* seqs_host,
                                        const AttentionSeqDesc* seqs_dev, int num_seqs, int num_heads, int num_kv_heads,
                                        int head_dim, float* out, void* workspace, cudaStream_t stream,
                                        bool kv_bf16 = false);

// Table-driven rotary embedding on a slice of each head (see Backend::RopeTable / RopeSpec).
cudaError_t launch_rope_table(float* x, const int32_t* positions, int64_t rows, int num_heads, int rot_dim,
                              int64_t row_stride, int head_stride, int offset, const float* inv_freq, float scale,
                              bool interleaved, cudaStream_t stream);

// Causal attention of one sequence with strided rows, qk_dim != v_dim, window and sinks (see
// Backend::AttentionEx): query rows q_row .. q_row + n_new are the last of n_total positions.
struct AttentionExShape {
  int num_heads, num_kv_heads, qk_dim, v_dim;
  int64_t q_stride, k_stride, v_stride, out_stride;
  float scale;
  int window;
  const float* sinks;
};
// blocks: null, or a paged cache's block table of 1 << block_shift rows per block (AttentionSeqDesc).
cudaError_t launch_attention_ex(const float* q, const float* k, const float* v, int64_t q_row, int n_new, int n_total,
                                const int32_t* blocks, int block_shift, const AttentionExShape& shape, float* out,
                                cudaStream_t stream);

// y[r, h, j] = sum_i x[r, h, i] * w[h * n + j, i] (see Backend::GemmPerHead); w [heads * n, k].
cudaError_t launch_gemm_per_head(const float* x, int64_t rows, int num_heads, int64_t x_stride, int x_head_stride,
                                 const void* w, DType wdt, int n, int64_t k, float* y, int64_t y_stride,
                                 int y_head_stride, cudaStream_t stream);

// GPT-OSS clamped SwiGLU: out = (clamp(up, +-limit) + 1) * g * sigmoid(alpha g), g = min(gate, limit).
cudaError_t launch_clamped_swiglu(const float* gate, const float* up, float* out, int64_t n, float alpha, float limit,
                                  cudaStream_t stream);

// out[i] = silu(gate[i]) * up[i]; out may alias gate or up.
cudaError_t launch_silu_mul(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream);
// gate[i] = silu(gate[i]) * up[i] on 16-bit values of type t (kBF16 or kF16), fp32 math.
cudaError_t launch_silu_mul_16(void* gate, const void* up, DType t, int64_t n, cudaStream_t stream);
// y[i] += x[i]
cudaError_t launch_add(float* y, const float* x, int64_t n, cudaStream_t stream);
// x[i] = clamp(x[i], -c, c)
cudaError_t launch_clamp(float* x, int64_t n, float c, cudaStream_t stream);
// dst[r, :] += sigmoid(gate_logit[r]) * src[r, :]
cudaError_t launch_add_sigmoid_gated(const float* src, const float* gate_logit, int64_t rows, int dim, float* dst,
                                     cudaStream_t stream);

// Softmax over each row of logits[rows, num_experts], top-k highest first (ties to the lower
// id), weights renormalised when `renormalize`.
cudaError_t launch_router_topk(const float* logits, int64_t rows, int num_experts, int k, bool renormalize,
                               int32_t* ids, float* weights, cudaStream_t stream);

// out[r] = the first index of the maximum of row r of x[rows, cols]; NaN never wins, a row without
// a number gives 0 (runtime::ArgMax).
cudaError_t launch_argmax_rows(const float* x, int64_t rows, int64_t cols, int32_t* out, cudaStream_t stream);
// out[r] = runtime::SampleRow(row r of x[rows, cols], params[r]) (params on the device).
cudaError_t launch_sample_rows(const float* x, int64_t rows, int64_t cols, const RowSampling* params, int32_t* out,
                               cudaStream_t stream);
// dst[i, :] = src[idx[i], :]; dst16 (or null, 8-byte aligned): dst rounded to bf16.
cudaError_t launch_gather_rows(const float* src, const int32_t* idx, int64_t n, int dim, float* dst, uint16_t* dst16,
                               cudaStream_t stream);
// dst[t, :] += scale[r] * src[r, :] for r = pos[t * k + j], j = 0 .. k - 1 in turn (Backend::CombineRows).
cudaError_t launch_combine_rows(const float* src, const int32_t* pos, const float* scale, int64_t tokens, int k,
                                int dim, float* dst, cudaStream_t stream);
// dst[idx[i], :] += scale[i] * src[i, :]   (idx distinct within one call)
cudaError_t launch_scatter_add_rows(const float* src, const int32_t* idx, const float* scale, int64_t n, int dim,
                                    float* dst, cudaStream_t stream);

// Skinny GEMM y[m, n] = x[m, k] . w[n, k]^T (+ y when accumulate) with fp32 activations and
// BF16/F16 weights, for decode-sized m (<= kGemvMaxRows; the kernel itself takes m <= 8).
// gemv_supported() says whether the shape and alignment qualify (k % 8 == 0, 16-byte aligned x
// and w). Each weight row is split over `warps_per_row` warps (1, 2, 4 or 8);
// gemv_warps_per_row() is the split that fills `num_sms` SMs for an [n, k] weight. The split
// fixes a row's summation order, and it never depends on m: for one split, row r of y is bitwise
// the same whatever the other rows of x are and however many there are.
inline constexpr int kGemvMaxRows =
    2;  // measured on H200: m = 1 streams 3.8 TB/s, m = 8 only 0.9 (cuBLAS 3.4 at m = 16)
inline constexpr int kGemvMaxWarpsPerRow = 8;
static_assert(kGemvMaxRows >= 1 && kGemvMaxRows <= 8, "the GEMV kernel is instantiated for m = 1..8");
bool gemv_supported(int64_t m, int64_t k, DType wdt, const void* x, const void* w);
int gemv_warps_per_row(int64_t n, int64_t k, int num_sms);
cudaError_t launch_gemv(const float* x, int64_t m, const void* w, DType wdt, int64_t n, int64_t k, float* y,
                        bool accumulate, int warps_per_row, cudaStream_t stream);
// y[m, n] = silu(x . gate^T) * (x . up^T) for two [n, k] weights of one dtype, each as launch_gemv
// sums it (same warps_per_row: bitwise the result of two GEMVs and SiluMul).
cudaError_t launch_gemv_gate_up(const float* x, int64_t m, const void* gate, const void* up, DType wdt, int64_t n,
                                int64_t k, float* y, int warps_per_row, cudaStream_t stream);

// Up to kGemvMaxGroups GEMVs y_i[m, n_i] = x[m, k] . w_i[n_i, k]^T of one input and dtype in one
// launch, each row split over warps_per_row warps (a single split for the launch).
inline constexpr int kGemvMaxGroups = 3;
struct GemvGroupItem {
  const void* w;
  int64_t n;
  float* y;
};
cudaError_t launch_gemv_group(const float* x, int64_t m, const GemvGroupItem* items, int num_items, DType wdt,
                              int64_t k, int warps_per_row, cudaStream_t stream);

// The routed experts of a MoE layer for `tokens` decode rows, with the routing left on the device
// (Backend::MoeRouted): per pair p = t * top_k + j, act[p] = silu(x[t] . gate[e]^T) * (x[t] .
// up[e]^T) and y[p] = act[p] . down[e]^T with e = ids[p] looked up in device pointer tables; then
// resid[t] += sum over t's pairs in increasing expert id of weights[p] * y[p]. act is
// [tokens * top_k, inter] and y [tokens * top_k, hidden] scratch (16-byte aligned).
inline constexpr int kMoeRoutedMaxTopK = 16;
struct MoeRoutedArgs {
  const float* x;  // [tokens, hidden]
  int64_t tokens;
  int top_k;
  const int32_t* ids;       // [tokens * top_k]
  const float* weights;     // [tokens * top_k]
  int num_experts;          // ids outside [0, num_experts) compute nothing and add nothing
  const void* const* gate;  // [num_experts] device pointers to [inter, hidden] weights
  const void* const* up;
  const void* const* down;  // [hidden, inter]
  DType dtype;              // kBF16 or kF16
  int64_t hidden, inter;
  int gate_up_split, down_split;  // warps per row (gemv_warps_per_row of each weight)
  float* act;
  float* y;
  float* resid;  // [tokens, hidden]
};
cudaError_t launch_moe_routed(const MoeRoutedArgs& args, cudaStream_t stream);

// The routed experts of a MoE layer for decode batches past the GEMV's rows, the routing on the
// device (Backend::MoeRouted, moe_grouped.cu): the pairs are grouped by expert on the device and
// each active expert's gate/up and down weights stream once for all its tokens through
// tensor-core products (x and the SwiGLU activation rounded to the weights' 16-bit type, as the
// cuBLAS GEMMs of the host-routed path round them; fp32 accumulation); then resid[t] += sum over
// t's pairs in increasing expert id of weights[p] * y[p]. Scratch (16-byte aligned): xb [tokens,
// hidden] and act [tokens * top_k, inter] of 16-bit values, y [tokens * top_k, hidden] fp32, meta
// moe_grouped_meta_ints() int32.
inline constexpr int kMoeGroupedMaxTokens = 64;
struct MoeGroupedArgs {
  const float* x;  // [tokens, hidden]
  int64_t tokens;
  int top_k;
  const int32_t* ids;    // [tokens * top_k]; outside [0, num_experts): adds nothing
  const float* weights;  // [tokens * top_k]
  int num_experts;
  const void* const* gate;  // [num_experts] device pointers to [inter, hidden] weights
  const void* const* up;
  const void* const* down;  // [hidden, inter]
  DType dtype;              // kBF16 or kF16
  int64_t hidden, inter;
  int num_sms;
  void* xb;
  void* act;
  float* y;
  int32_t* meta;
  float* resid;  // [tokens, hidden]
};
bool moe_grouped_supported(int64_t tokens, int top_k, int num_experts, DType dtype, int64_t hidden, int64_t inter);
size_t moe_grouped_meta_ints(int64_t tokens, int top_k, int num_experts);
cudaError_t launch_moe_grouped(const MoeGroupedArgs& args, cudaStream_t stream);

// Skinny GEMM on a quantized weight: y[m, n] = x[m, k] . dequant(w)[n, k]^T (+ y when
// accumulate), w a kQ8/kQ4 block of [n, k] (runtime/core/quant_format.h), fp32 activations and
// accumulation, the dequantization fused into the weight stream. gemv_quant_supported() says
// whether m <= kGemvQuantMaxRows, k is a multiple of the group and x and w are 16-byte aligned.
// warps_per_row as for launch_gemv (gemv_quant_warps_per_row: the same policy on the row's 16-byte
// loads); it never depends on m.
// 4: not yet measured. The GEMV does m FMAs per weight value it dequantizes, the dequantize +
// cuBLAS path writes and reads a bf16 copy (5 bytes a value for Q8G); kGemvMaxRows' bf16 numbers
// (m = 1: 3.8 TB/s, m = 8: 0.9) put the crossover near m = 4 for 1-byte weights.
inline constexpr int kGemvQuantMaxRows = 4;
bool gemv_quant_supported(int64_t m, int64_t k, DType wdt, const void* x, const void* w);
int gemv_quant_warps_per_row(int64_t n, int64_t k, DType wdt, int num_sms);
cudaError_t launch_gemv_quant(const float* x, int64_t m, const void* w, DType wdt, int64_t n, int64_t k, float* y,
                              bool accumulate, int warps_per_row, cudaStream_t stream);

// dst[r - row_begin, :] = bf16(dequant(w)[r, :]) for the rows [row_begin, row_begin + num_rows)
// of a kQ8/kQ4 block w of [rows, cols] (cols a multiple of the group; w and dst 16-byte aligned).
// The values before rounding equal the CPU's DequantizeRow.
cudaError_t launch_dequantize_bf16(const void* w, DType wdt, int64_t rows, int64_t cols, int64_t row_begin,
                                   int64_t num_rows, void* dst, cudaStream_t stream);

// The same two ops on block-scaled weights (kMxfp4, kFp8Block; runtime/core/block_scaled_format.h):
// a fused-dequantization GEMV for m <= kGemvQuantMaxRows (gemv_block_scaled_supported: k fits the
// format, w 16-byte aligned, x too except on the FP8 byte path for k not a multiple of 16;
// warps_per_row from gemv_block_scaled_warps_per_row, never from m), and the dequantization of a
// tile of rows to bf16 (any k the format takes: FP8 rows may end in partial blocks). Values before
// rounding equal the CPU's DequantizeBlockScaledRow.
bool gemv_block_scaled_supported(int64_t m, int64_t k, DType wdt, const void* x, const void* w);
int gemv_block_scaled_warps_per_row(int64_t n, int64_t k, DType wdt, int num_sms);
cudaError_t launch_gemv_block_scaled(const float* x, int64_t m, const void* w, DType wdt, int64_t n, int64_t k,
                                     float* y, bool accumulate, int warps_per_row, cudaStream_t stream);
cudaError_t launch_dequantize_block_scaled_bf16(const void* w, DType wdt, int64_t rows, int64_t cols, int64_t row_begin,
                                                int64_t num_rows, void* dst, cudaStream_t stream);

// The same two ops on lossless packed bf16 weights (kPbf16; runtime/core/packed_bf16_format.h): a
// GEMV decoding each value's bf16 bits in registers for m <= kGemvMaxRows, as the bf16 GEMV's rows
// (gemv_pbf16_supported: k a multiple of 128 up to 65536, x and w 16-byte aligned; warps_per_row
// from gemv_pbf16_warps_per_row, never from m), and the decoding of a tile of rows to bf16, bit for
// bit the weight that was packed.
bool gemv_pbf16_supported(int64_t m, int64_t k, DType wdt, const void* x, const void* w);
int gemv_pbf16_warps_per_row(int64_t n, int64_t k, int num_sms);
cudaError_t launch_gemv_pbf16(const float* x, int64_t m, const void* w, int64_t n, int64_t k, float* y, bool accumulate,
                              int warps_per_row, cudaStream_t stream);
cudaError_t launch_unpack_pbf16(const void* w, int64_t rows, int64_t cols, int64_t row_begin, int64_t num_rows,
                                void* dst, cudaStream_t stream);

// dst[0, bytes) = host_src[0, bytes) for bytes <= kParamCopyMaxBytes, by a kernel whose launch
// parameters carry the bytes (cheaper than a copy-engine operation between kernels); host_src may
// be reused as soon as the call returns. 4032: the payload and the other arguments stay within
// the classic 4 KiB of kernel parameters.
inline constexpr size_t kParamCopyMaxBytes = 4032;
static_assert(kParamCopyMaxBytes % 16 == 0 && kParamCopyMaxBytes + 64 <= 4096, "within 4 KiB of parameters");
cudaError_t launch_copy_from_params(void* dst, const void* host_src, size_t bytes, cudaStream_t stream);

// Copies items_host[i].bytes from .src to .dst (device memory, regions not overlapping) for every
// item, kCopyBatchMaxItems per launch (the items travel in its parameters: 128 x 24 bytes).
struct CopyBatchItem {
  void* dst;
  const void* src;
  size_t bytes;
};
inline constexpr int kCopyBatchMaxItems = 128;
cudaError_t launch_copy_batch(const CopyBatchItem* items_host, int num_items, cudaStream_t stream);
// The same, rounding fp32 to bf16 (nearest even): item i reads bytes / 4 floats from src and writes
// as many bf16 values to dst (Backend::CopyBatchToBf16).
cudaError_t launch_copy_batch_to_bf16(const CopyBatchItem* items_host, int num_items, cudaStream_t stream);

// dst[i] = (dst_dtype) src[i], round to nearest even (dst_dtype F16 or BF16).
cudaError_t launch_convert_f32(const float* src, void* dst, DType dst_dtype, int64_t n, cudaStream_t stream);
// Rows of a 16-bit matrix copied to fp32 rows elsewhere: segment i (of num_segments, the table on
// the device) copies rows [src_row, src_row + rows) of src to rows [dst_row, ...) of dst, dim
// values a row (dim % 8 == 0, src and dst 16-byte aligned). t: kBF16 or kF16. max_rows: the
// largest segment's rows (sizes the grid).
struct RowSegment {
  int64_t src_row;
  int64_t dst_row;
  int64_t rows;
};
cudaError_t launch_rows_16_to_f32(const void* src, DType t, float* dst, const RowSegment* segments, int num_segments,
                                  int64_t max_rows, int dim, cudaStream_t stream);
// y[r, :] += bias[:] over m rows of n columns.
cudaError_t launch_add_bias(float* y, int64_t m, int64_t n, const void* bias, DType bias_dtype, cudaStream_t stream);

// dst[i] = scale * u_i with u_i uniform in [-1, 1) from a counter-based hash of (seed, i);
// dst of dtype F32, F16 or BF16. For synthetic weights generated on the device.
cudaError_t launch_fill_random(void* dst, DType dtype, int64_t n, uint64_t seed, float scale, cudaStream_t stream);

}  // namespace ef::runtime::cuda
