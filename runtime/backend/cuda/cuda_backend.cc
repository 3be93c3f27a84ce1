#include "runtime/backend/cuda/cuda_backend.h"

#include <algorithm>
#include <cstring>

#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/core/logging.h"
#include "runtime/core/params.h"
#include "runtime/core/quant_format.h"
#include "runtime/core/sample_row.h"

EF_PARAM(CudaBf16Weights, bool, "EF_CUDA_BF16_WEIGHTS", false,
         "cuda backend: store F32 weight matrices as BF16 (bf16 GEMMs with fp32 accumulation)");
EF_PARAM(CudaMemoryBudgetMiB, int64_t, "EF_CUDA_MEMORY_BUDGET_MIB", 0,
         "cuda backend: device memory the backend may hold, MiB (0: free memory at start less 1 GiB)");
EF_PARAM(CudaExpertStreams, int64_t, "EF_CUDA_EXPERT_STREAMS", 4,
         "cuda backend: streams the experts of a prefill-sized MoE layer run on (0: one expert at a time, fp32 "
         "products)");
EF_PARAM(CudaGroupedExperts, int64_t, "EF_CUDA_GROUPED_EXPERTS", -1,
         "cuda backend: prefill experts' GEMMs as one grouped cuBLAS call per projection: -1 for small experts "
         "(fine-grained MoE), 1 for all past the GEMV's rows, 0 never (one cuBLASLt GEMM each)");
EF_PARAM(CudaPdl, bool, "EF_CUDA_PDL", true,
         "cuda backend: launch the decode path's kernels with programmatic dependent launch (Hopper and later)");
EF_PARAM(CudaDecodeBlocksPerSm, int64_t, "EF_CUDA_DECODE_BLOCKS_PER_SM", ef::runtime::cuda::kDecodeBlocksPerSmDefault,
         "cuda backend: decode attention splits each sequence's keys until this many blocks per SM run (0: no "
         "split; each split keeps at least one tile of keys)");
EF_PARAM(CudaBf16Twins, bool, "EF_CUDA_BF16_TWINS", true,
         "cuda backend: RMSNorm and the experts' row gather also write their rows rounded to bf16 for the bf16 "
         "GEMMs that read them (batches past the GEMV's rows), which then skip their own rounding pass; same "
         "results");
EF_PARAM(CudaSampleRows, bool, "EF_CUDA_SAMPLE_ROWS", true,
         "cuda backend: draw sampled tokens on the GPU (Backend::SampleRows: the host's draws, only ids come back); "
         "off: the logits of sampled rows come to the host, which draws the same tokens");

namespace ef::runtime {
namespace {
// log2 of a paged sequence's block size (AttentionSeq::block_size, a power of two); 0 when contiguous.
int BlockShift(const AttentionSeq& a) {
  int shift = 0;
  while (a.blocks && (1 << shift) < a.block_size) ++shift;
  return shift;
}

constexpr size_t kAlign = 256;
size_t Padded(size_t bytes) { return (std::max<size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign; }

std::string MiB(size_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }

// Bound on the bf16 scratch of a quantized GEMM past the GEMV's rows (a tile of weight rows).
constexpr int64_t kDequantTileBytes = int64_t{32} << 20;

cudaDataType_t CudaType(DType t) {
  switch (t) {
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF16:
      return CUDA_R_16F;
    default:
      return CUDA_R_32F;
  }
}

}  // namespace

CudaBackendOptions CudaBackendOptions::FromParams(int device) {
  CudaBackendOptions o;
  o.device = device;
  o.bf16_weights = params::CudaBf16Weights();
  o.memory_budget = static_cast<size_t>(std::max<int64_t>(0, params::CudaMemoryBudgetMiB())) << 20;
  o.expert_streams = static_cast<int>(std::clamp<int64_t>(params::CudaExpertStreams(), 0, 16));
  o.pdl = params::CudaPdl();
  o.grouped_experts = static_cast<int>(std::clamp<int64_t>(params::CudaGroupedExperts(), -1, 1));
  o.decode_blocks_per_sm = static_cast<int>(std::clamp<int64_t>(params::CudaDecodeBlocksPerSm(), 0, 64));
  o.bf16_twins = params::CudaBf16Twins();
  return o;
}

StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(const CudaBackendOptions& options) {
  std::unique_ptr<CudaBackend> b(new CudaBackend(options));
  EF_RETURN_IF_ERROR(b->Init());
  return b;
}

Status CudaBackend::Init() {
  int count = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess) {
    (void)cudaGetLastError();
    // No driver, or none that this CUDA runtime can use: no GPU to run on, which is what to say.
    return Unavailable(std::string("cuda backend: no usable NVIDIA GPU (") + cudaGetErrorString(e) +
                       "); run with --backend cpu (runtime.backend: cpu) on a machine without one");
  }
  if (options_.device < 0 || options_.device >= count)
    return InvalidArgument("cuda backend: device " + std::to_string(options_.device) + " requested, " +
                           std::to_string(count) + " visible");
  CUDA_CHECK(cudaSetDevice(options_.device));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, options_.device));
  num_sms_ = prop.multiProcessorCount;
  cuda::SetPdlEnabled(options_.pdl);
  name_ = "cuda:" + std::to_string(options_.device) + " (" + prop.name + ")";
  size_t free_b = 0, total_b = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  budget_ = options_.memory_budget > 0 ? options_.memory_budget
                                       : (free_b > (size_t{1} << 30) ? free_b - (size_t{1} << 30) : free_b / 2);

  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  // Freed blocks stay in the pool: steady-state allocation never returns memory to the driver
  // (which would synchronise).
  cudaMemPool_t pool;
  CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, options_.device));
  uint64_t threshold = UINT64_MAX;
  CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));

  CUBLAS_CHECK(cublasCreate(&cublas_));
  CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  // fp32 GEMMs stay fp32 (no TF32): the fp32 path must agree with the CPU reference.
  CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
  CUDA_CHECK(cudaMalloc(&cublas_ws_, options_.cublas_workspace_bytes));
  CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_ws_, options_.cublas_workspace_bytes));
  if (options_.lt_gemm) {
    // Optional: without it every 16-bit GEMM takes cublasGemmEx.
    auto lt = cuda::LtGemm::Create(cublas_ws_, options_.cublas_workspace_bytes);
    if (lt.ok())
      lt_ = std::move(lt).value();
    else
      EF_LOG(WARN, CUDA, "cuBLASLt unavailable (%s): 16-bit GEMMs use cublasGemmEx", lt.status().ToString().c_str());
  }

  void* staging = nullptr;
  CUDA_CHECK(cudaMallocHost(&staging, options_.staging_bytes));
  staging_ = static_cast<std::byte*>(staging);
  EF_LOG(INFO, CUDA, "cuda backend on %s: %d sms, budget %s, %s weights", name_.c_str(), num_sms_, MiB(budget_).c_str(),
         options_.bf16_weights ? "bf16" : "native");
  return Status::Ok();
}

CudaBackend::~CudaBackend() {
  // Destructors never throw; errors here are logged only.
  Status ignored;
  if (capturing_) {
    cudaGraph_t g = nullptr;
    if (cudaStreamEndCapture(stream_, &g) == cudaSuccess && g) cudaGraphDestroy(g);
    capturing_ = false;
  }
  if (stream_) CUDA_CHECK_LOG(cudaStreamSynchronize(stream_), &ignored);
  for (cudaGraphExec_t g : graphs_)
    if (g) CUDA_CHECK_LOG(cudaGraphExecDestroy(g), &ignored);
  graphs_.clear();
  for (auto& [p, bytes] : weights_) DeviceFree(p, bytes);
  weights_.clear();
  if (act_) DeviceFree(act_, act_cap_);
  if (attn_ws_) DeviceFree(attn_ws_, attn_ws_cap_);
  if (dequant_) DeviceFree(dequant_, dequant_cap_);
  if (attn_desc_) DeviceFree(attn_desc_, attn_desc_cap_);
  if (attn_counters_) DeviceFree(attn_counters_, attn_counters_cap_);
  if (moe_act_) DeviceFree(moe_act_, moe_act_cap_);
  if (moe_y_) DeviceFree(moe_y_, moe_y_cap_);
  if (moe_xb_) DeviceFree(moe_xb_, moe_xb_cap_);
  if (moe_meta_) DeviceFree(moe_meta_, moe_meta_cap_);
  if (step_desc_) DeviceFree(step_desc_, step_desc_cap_);
  if (mlp_x16_) DeviceFree(mlp_x16_, mlp_x16_cap_);
  if (mlp_gu_) DeviceFree(mlp_gu_, mlp_gu_cap_);
  if (mlp_small_) DeviceFree(mlp_small_, mlp_small_cap_);
  if (mlp_down16_) DeviceFree(mlp_down16_, mlp_down16_cap_);
  if (mlp_table_) DeviceFree(mlp_table_, mlp_table_cap_);
  for (SideStream& s : side_) {
    if (s.stream) CUDA_CHECK_LOG(cudaStreamSynchronize(s.stream), &ignored);
    if (s.workspace) DeviceFree(s.workspace, lt_ ? lt_->workspace_bytes() : 0);
    if (s.done) CUDA_CHECK_LOG(cudaEventDestroy(s.done), &ignored);
    if (s.stream) CUDA_CHECK_LOG(cudaStreamDestroy(s.stream), &ignored);
  }
  side_.clear();
  if (fork_) CUDA_CHECK_LOG(cudaEventDestroy(fork_), &ignored);
  if (stream_) CUDA_CHECK_LOG(cudaStreamSynchronize(stream_), &ignored);
  for (Pending& p : pending_) free_events_.push_back(p.done);
  pending_.clear();
  for (cudaEvent_t e : free_events_) CUDA_CHECK_LOG(cudaEventDestroy(e), &ignored);
  lt_.reset();
  if (cublas_) CUBLAS_CHECK_LOG(cublasDestroy(cublas_), &ignored);
  if (cublas_ws_) CUDA_CHECK_LOG(cudaFree(cublas_ws_), &ignored);
  if (staging_) CUDA_CHECK_LOG(cudaFreeHost(staging_), &ignored);
  if (stream_) CUDA_CHECK_LOG(cudaStreamDestroy(stream_), &ignored);
  if (bytes_in_use_.load() != 0)
    EF_LOG(WARN, CUDA, "cuda backend destroyed with %zu bytes still allocated", bytes_in_use_.load());
}

// --- memory ---

StatusOr<void*> CudaBackend::DeviceAlloc(size_t bytes) {
  if (RefuseCapture("an allocation")) return Unavailable("cuda backend: no allocation while a graph is recorded");
  const size_t padded = Padded(bytes);
  const size_t in_use = bytes_in_use_.load();
  if (in_use + padded > budget_)
    return ResourceExhausted("cuda backend: cannot allocate " + std::to_string(bytes) + " bytes on " + name_ + ": " +
                             std::to_string(in_use) + " of the budget of " + std::to_string(budget_) +
                             " bytes are in use");
  void* p = nullptr;
  cudaError_t e = cudaMallocAsync(&p, padded, stream_);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear the non-sticky allocation error
    return ResourceExhausted("cuda backend: cannot allocate " + std::to_string(bytes) + " bytes on " + name_ + " (" +
                             cudaGetErrorString(e) + "); " + std::to_string(in_use) + " of the budget of " +
                             std::to_string(budget_) + " bytes are in use");
  }
  bytes_in_use_ += padded;
  return p;
}

void CudaBackend::DeviceFree(void* p, size_t bytes) {
  if (!p) return;
  CUDA_CHECK_LOG(cudaFreeAsync(p, stream_), &error_);
  bytes_in_use_ -= Padded(bytes);
}

StatusOr<Buffer> CudaBackend::Allocate(size_t bytes) {
  EF_ASSIGN_OR_RETURN(void* p, DeviceAlloc(bytes));
  CUDA_CHECK(cudaMemsetAsync(p, 0, Padded(bytes), stream_));
  return Buffer(this, p, bytes);
}

void CudaBackend::Free(void* ptr, size_t bytes) { DeviceFree(ptr, bytes); }

void* CudaBackend::EnsureScratch(void** buf, size_t* cap, size_t bytes, bool required) {
  if (*cap >= bytes) return *buf;
  if (RefuseCapture("a scratch buffer that must grow")) return nullptr;
  ++layout_generation_;  // graphs recorded before may hold the old address
  if (*buf) DeviceFree(*buf, *cap);
  *buf = nullptr;
  *cap = 0;
  const size_t want = bytes + bytes / 2;
  auto p = DeviceAlloc(want);
  if (!p.ok() && !required) {
    EF_LOG(DEBUG, CUDA, "optional scratch of %zu bytes not allocated: %s", want, p.status().ToString().c_str());
    return nullptr;
  }
  if (!p.ok()) {
    EF_LOG(ERROR, CUDA, "%s", p.status().ToString().c_str());
    if (error_.ok()) error_ = p.status();
    return nullptr;
  }
  *buf = p.value();
  *cap = want;
  return *buf;
}

void CudaBackend::RetireFinishedCopies(bool all_done) {
  while (!pending_.empty()) {
    if (!all_done) {
      cudaError_t e = cudaEventQuery(pending_.front().done);
      if (e == cudaErrorNotReady) break;
      CUDA_CHECK_LOG(e, &error_);
    }
    free_events_.push_back(pending_.front().done);
    pending_.pop_front();
  }
}

// Copies through the pinned ring: memcpy into the ring, async DMA from it, an event marks when
// that part of the ring may be reused. The caller's buffer is free on return.
void CudaBackend::Stage(void* dst, const void* src, size_t bytes) {
  const size_t cap = options_.staging_bytes;
  const size_t max_chunk = cap / 2;
  auto* d = static_cast<std::byte*>(dst);
  const auto* s = static_cast<const std::byte*>(src);
  RetireFinishedCopies(false);
  while (bytes > 0) {
    const size_t n = std::min(bytes, max_chunk);
    if (staging_head_ + n > cap) staging_head_ = 0;
    const size_t begin = staging_head_, end = begin + n;
    // Wait (on that copy's event only) for in-flight copies still reading this part of the ring.
    while (std::any_of(pending_.begin(), pending_.end(),
                       [&](const Pending& p) { return p.begin < end && begin < p.end; })) {
      CUDA_CHECK_LOG(cudaEventSynchronize(pending_.front().done), &error_);
      free_events_.push_back(pending_.front().done);
      pending_.pop_front();
    }
    std::memcpy(staging_ + begin, s, n);
    CUDA_CHECK_LOG(cudaMemcpyAsync(d, staging_ + begin, n, cudaMemcpyHostToDevice, stream_), &error_);
    cudaEvent_t ev;
    if (free_events_.empty()) {
      if (!CUDA_CHECK_LOG(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), &error_)) return;
    } else {
      ev = free_events_.back();
      free_events_.pop_back();
    }
    CUDA_CHECK_LOG(cudaEventRecord(ev, stream_), &error_);
    pending_.push_back({begin, end, ev});
    staging_head_ = end;
    d += n;
    s += n;
    bytes -= n;
  }
}

void CudaBackend::CopyToDevice(void* dst, const void* host_src, size_t bytes) {
  if (bytes == 0 || RefuseCapture("a host-to-device copy")) return;
  // Decode's small uploads (expert permutations, attention descriptors) ride in a kernel's
  // parameters: no copy-engine hand-off between the kernels around them, no staging-ring slot.
  if (bytes <= cuda::kParamCopyMaxBytes) {
    CUDA_CHECK_LOG(cuda::launch_copy_from_params(dst, host_src, bytes, stream_), &error_);
    return;
  }
  Stage(dst, host_src, bytes);
}

void CudaBackend::CopyToHost(void* host_dst, const void* src, size_t bytes) {
  if (bytes == 0 || RefuseCapture("a device-to-host copy")) return;
  CUDA_CHECK_LOG(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_), &error_);
  CUDA_CHECK_LOG(cudaStreamSynchronize(stream_), &error_);
  RetireFinishedCopies(true);
}

void CudaBackend::CopyOnDevice(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  // On the copy engine even when small: measured on H200, 128 back-to-back 4 KB KV appends take
  // 1.9 us each this way and 2.2 us each as copy kernels.
  CUDA_CHECK_LOG(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), &error_);
}

bool CudaBackend::GateUpSilu(const float* x, int64_t m, const Weight& gate, const Weight& up, float* out) {
  if (m <= 0 || !options_.fused_gate_up || gate.dtype != up.dtype || gate.rows != up.rows || gate.cols != up.cols ||
      !cuda::gemv_supported(m, gate.cols, gate.dtype, x, gate.data) ||
      !cuda::gemv_supported(m, up.cols, up.dtype, x, up.data))
    return false;
  // The split Gemm would pick for each weight alone, so g and u are summed as it sums them.
  const int split = cuda::gemv_warps_per_row(gate.rows, gate.cols, num_sms_);
  CUDA_CHECK_LOG(
      cuda::launch_gemv_gate_up(x, m, gate.data, up.data, gate.dtype, gate.rows, gate.cols, out, split, stream_),
      &error_);
  return true;
}

bool CudaBackend::EnsureSideStreams(int count) {
  if (static_cast<int>(side_.size()) >= count) return true;
  if (!fork_ && cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming) != cudaSuccess) {
    (void)cudaGetLastError();
    fork_ = nullptr;
    return false;
  }
  while (static_cast<int>(side_.size()) < count) {
    SideStream s;
    auto ws = DeviceAlloc(lt_->workspace_bytes());
    if (!ws.ok()) {
      EF_LOG(DEBUG, CUDA, "no side stream for the expert GEMMs: %s", ws.status().ToString().c_str());
      return false;
    }
    s.workspace = ws.value();
    if (cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking) != cudaSuccess ||
        cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming) != cudaSuccess) {
      (void)cudaGetLastError();
      if (s.stream) cudaStreamDestroy(s.stream);
      DeviceFree(s.workspace, lt_->workspace_bytes());
      EF_LOG(WARN, CUDA, "cannot create a side stream: the expert GEMMs run one after another");
      return false;
    }
    side_.push_back(s);
  }
  return true;
}

cublasStatus_t CudaBackend::GroupedGemm16(DType t, int count, int64_t n, int64_t k, const int* rows,
                                          const void* const* w, const void* const* x, void* const* y) {
#if CUBLAS_VERSION >= 120500
  if (count < 1) return CUBLAS_STATUS_SUCCESS;
  const cudaDataType dt = t == DType::kBF16 ? CUDA_R_16BF : CUDA_R_16F;
  // Row-major y = x . w^T is column-major y^T = w^T(as stored: k x n, transposed) . x^T.
  const std::vector<cublasOperation_t> ta(count, CUBLAS_OP_T), tb(count, CUBLAS_OP_N);
  const std::vector<int> ns(count, static_cast<int>(n)), ks(count, static_cast<int>(k)), ones(count, 1);
  const std::vector<float> alpha(count, 1.f), beta(count, 0.f);
  return cublasGemmGroupedBatchedEx(cublas_, ta.data(), tb.data(), ns.data(), rows, ks.data(), alpha.data(), w, dt,
                                    ks.data(), x, dt, ks.data(), beta.data(), y, dt, ns.data(), count, ones.data(),
                                    CUBLAS_COMPUTE_32F);
#else
  (void)t, (void)count, (void)n, (void)k, (void)rows, (void)w, (void)x, (void)y;
  return CUBLAS_STATUS_NOT_SUPPORTED;
#endif
}

bool CudaBackend::ExpertMlps(const float* x, const uint16_t* twin, const ExpertMlpRows* ex, int count, float* y) {
  if (count < 1 || options_.expert_streams < 1 || !lt_) return false;
  const DType t = ex[0].gate->dtype;
  const int64_t H = ex[0].gate->cols, F = ex[0].gate->rows;
  if ((t != DType::kBF16 && t != DType::kF16) || H % 8 != 0 || F % 8 != 0) return false;
  int64_t n = 0;
  for (int i = 0; i < count; ++i) {
    const ExpertMlpRows& e = ex[i];
    if (!e.gate || !e.up || !e.down || e.begin < 0 || e.rows < 0) return false;
    for (const Weight* w : {e.gate, e.up})
      if (w->dtype != t || w->rows != F || w->cols != H) return false;
    if (e.down->dtype != t || e.down->rows != H || e.down->cols != F) return false;
    n = std::max(n, e.begin + e.rows);
  }
  // Decode-sized experts take the path GateUpSilu and Gemm take (the GEMV's bits, fp32 x); the
  // rest run on 16-bit operands, small ones in one grouped call per projection (16-bit down
  // products, widened into y), the others one cuBLASLt GEMM per projection on the side streams.
  // Which path an expert takes depends on its rows only.
#if CUBLAS_VERSION >= 120500
  // bf16 only: fp16 down products could overflow where the per-expert path writes fp32.
  const bool can_group = options_.grouped_experts != 0 && !grouped_failed_ && !capturing_ && t == DType::kBF16 &&
                         F <= INT32_MAX && H <= INT32_MAX && reinterpret_cast<uintptr_t>(y) % 16 == 0;
#else
  const bool can_group = false;
#endif
  std::vector<int> small, big, grouped;
  int64_t small_rows = 0, big_max = 0;
  for (int i = 0; i < count; ++i) {
    if (ex[i].rows == 0) continue;
    if (options_.fused_gate_up && cuda::gemv_supported(ex[i].rows, H, t, x + ex[i].begin * H, ex[i].gate->data) &&
        cuda::gemv_supported(ex[i].rows, H, t, x + ex[i].begin * H, ex[i].up->data)) {
      small.push_back(i);
      small_rows = std::max(small_rows, ex[i].rows);
      continue;
    }
    if (ex[i].rows > INT32_MAX) return false;
    big_max = std::max(big_max, ex[i].rows);
    if (can_group && (options_.grouped_experts == 1 || ex[i].rows * F * H <= CudaBackendOptions::kGroupedExpertMaxMacs))
      grouped.push_back(i);
    else
      big.push_back(i);
  }
  // Groups of experts whose products fit the scratch together (one expert alone always does).
  const int64_t cap_rows = std::max<int64_t>(
      big_max, static_cast<int64_t>(options_.expert_mlp_scratch_bytes / (2 * static_cast<size_t>(F) * 2)));
  int64_t scratch_rows = 0, grouped_rows = 0;
  size_t grouped_most = 0;  // experts in the largest group of grouped ones
  auto split = [&](const std::vector<int>& list) {
    std::vector<std::pair<size_t, size_t>> groups;  // [first, last) of list
    int64_t rows = 0;
    for (size_t j = 0; j < list.size(); ++j) {
      // A group's experts are at most a grid's y (the widening kernel's segments).
      if (groups.empty() || rows + ex[list[j]].rows > cap_rows || j - groups.back().first >= 65535) {
        groups.push_back({j, j});
        rows = 0;
      }
      groups.back().second = j + 1;
      rows += ex[list[j]].rows;
      scratch_rows = std::max(scratch_rows, rows);
    }
    return groups;
  };
  const auto big_groups = split(big);
  const auto grouped_groups = split(grouped);
  for (const auto& [first, last] : grouped_groups) {
    int64_t rows = 0;
    for (size_t j = first; j < last; ++j) rows += ex[grouped[j]].rows;
    grouped_rows = std::max(grouped_rows, rows);
    grouped_most = std::max(grouped_most, last - first);
  }
  const int streams = std::min<int>(options_.expert_streams, std::max<size_t>(1, big.size()));
  // x in 16 bits: the caller's bf16 twin, or rounded here once for all experts.
  const bool use_twin = TwinServes(twin, t);
  const void* x16 = use_twin ? twin : nullptr;
  void* rounded = nullptr;  // x16 when it is rounded here
  std::byte* gu = nullptr;
  void* down16 = nullptr;
  uint64_t* table = nullptr;
  if (!big.empty() || !grouped.empty()) {
    if (!use_twin) x16 = rounded = EnsureScratch(&mlp_x16_, &mlp_x16_cap_, static_cast<size_t>(n * H) * 2, false);
    gu = static_cast<std::byte*>(
        EnsureScratch(&mlp_gu_, &mlp_gu_cap_, static_cast<size_t>(2 * scratch_rows * F) * 2, false));
    if (!x16 || !gu || (!big.empty() && !EnsureSideStreams(streams))) return false;
  }
  if (!grouped.empty()) {
    down16 = EnsureScratch(&mlp_down16_, &mlp_down16_cap_, static_cast<size_t>(grouped_rows * H) * 2, false);
    table = static_cast<uint64_t*>(
        EnsureScratch(&mlp_table_, &mlp_table_cap_, grouped_most * 12 * sizeof(uint64_t), false));
    if (!down16 || !table) return false;
  }
  float* act = nullptr;
  if (!small.empty()) {
    act = static_cast<float*>(
        EnsureScratch(&mlp_small_, &mlp_small_cap_, static_cast<size_t>(small_rows * F) * sizeof(float), false));
    if (!act) return false;
  }
  // Every cuBLASLt GEMM's algorithm is known before anything is enqueued (the offsets set the
  // alignment); the grouped experts' too, for the case that cuBLAS refuses the grouped call.
  auto gate_out = [&](int64_t off) { return gu + static_cast<size_t>(off * F) * 2; };
  auto up_out = [&](int64_t off) { return gu + static_cast<size_t>((scratch_rows + off) * F) * 2; };
  auto x16_of = [&](const ExpertMlpRows& e) {
    return static_cast<const std::byte*>(x16) + static_cast<size_t>(e.begin * H) * 2;
  };
  for (const auto* list : {&big, &grouped})
    for (const auto& [first, last] : (list == &big ? big_groups : grouped_groups)) {
      int64_t off = 0;
      for (size_t j = first; j < last; ++j) {
        const ExpertMlpRows& e = ex[(*list)[j]];
        if (!lt_->Supports(t, e.gate->data, x16_of(e), gate_out(off), t, e.rows, F, H, F) ||
            !lt_->Supports(t, e.up->data, x16_of(e), up_out(off), t, e.rows, F, H, F) ||
            !lt_->Supports(t, e.down->data, gate_out(off), y + e.begin * H, DType::kF32, e.rows, H, F, H))
          return false;
        off += e.rows;
      }
    }

  if (rounded) CUDA_CHECK_LOG(cuda::launch_convert_f32(x, rounded, t, n * H, stream_), &error_);
  for (const auto& [first, last] : big_groups) {
    // The side streams start after what the compute stream holds (x16, the previous group's use
    // of the scratch) ...
    CUDA_CHECK_LOG(cudaEventRecord(fork_, stream_), &error_);
    for (int s = 0; s < streams; ++s) CUDA_CHECK_LOG(cudaStreamWaitEvent(side_[s].stream, fork_, 0), &error_);
    int64_t off = 0;
    for (size_t j = first; j < last; ++j) {
      const ExpertMlpRows& e = ex[big[j]];
      const SideStream& ss = side_[(j - first) % streams];
      void* g = gate_out(off);
      void* u = up_out(off);
      CUBLAS_CHECK_LOG(lt_->Run(t, e.gate->data, x16_of(e), g, t, e.rows, F, H, F, false, ss.stream, ss.workspace),
                       &error_);
      CUBLAS_CHECK_LOG(lt_->Run(t, e.up->data, x16_of(e), u, t, e.rows, F, H, F, false, ss.stream, ss.workspace),
                       &error_);
      CUDA_CHECK_LOG(cuda::launch_silu_mul_16(g, u, t, e.rows * F, ss.stream), &error_);
      CUBLAS_CHECK_LOG(
          lt_->Run(t, e.down->data, g, y + e.begin * H, DType::kF32, e.rows, H, F, H, false, ss.stream, ss.workspace),
          &error_);
      off += e.rows;
    }
    // ... and the compute stream goes on after all of them.
    for (int s = 0; s < streams; ++s) {
      CUDA_CHECK_LOG(cudaEventRecord(side_[s].done, side_[s].stream), &error_);
      CUDA_CHECK_LOG(cudaStreamWaitEvent(stream_, side_[s].done, 0), &error_);
    }
  }
  // The grouped experts, a group at a time on the compute stream (after the side streams' use of
  // the scratch): gate and up of every expert in one call, SiLU(gate) * up in one pass, down in
  // one call, its 16-bit products widened into each expert's rows of y.
  for (const auto& [first, last] : grouped_groups) {
    const int cnt = static_cast<int>(last - first);
    // The device table: gate/up [2 cnt] w, x, y pointers, down [cnt] w, x, y, the segments [cnt].
    std::vector<uint64_t> host(static_cast<size_t>(cnt) * 12);
    std::vector<int> rows2(2 * cnt);
    uint64_t* gu_w = host.data();
    uint64_t* gu_x = gu_w + 2 * cnt;
    uint64_t* gu_y = gu_x + 2 * cnt;
    uint64_t* dn_w = gu_y + 2 * cnt;
    uint64_t* dn_x = dn_w + cnt;
    uint64_t* dn_y = dn_x + cnt;
    auto* seg = reinterpret_cast<cuda::RowSegment*>(dn_y + cnt);
    static_assert(sizeof(cuda::RowSegment) == 3 * sizeof(uint64_t));
    auto addr = [](const void* p) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)); };
    int64_t off = 0, max_rows = 0;
    for (int j = 0; j < cnt; ++j) {
      const ExpertMlpRows& e = ex[grouped[first + j]];
      rows2[j] = rows2[cnt + j] = static_cast<int>(e.rows);
      gu_w[j] = addr(e.gate->data);
      gu_w[cnt + j] = addr(e.up->data);
      gu_x[j] = gu_x[cnt + j] = addr(x16_of(e));
      gu_y[j] = addr(gate_out(off));
      gu_y[cnt + j] = addr(up_out(off));
      dn_w[j] = addr(e.down->data);
      dn_x[j] = addr(gate_out(off));
      dn_y[j] = addr(static_cast<std::byte*>(down16) + static_cast<size_t>(off * H) * 2);
      seg[j] = {off, e.begin, e.rows};
      off += e.rows;
      max_rows = std::max(max_rows, e.rows);
    }
    auto dev = [&](const uint64_t* p) { return table + (p - host.data()); };
    // A refusal (logged once) sends this group's remaining GEMMs and every later one per expert.
    auto refused = [&](cublasStatus_t st) {
      if (st == CUBLAS_STATUS_SUCCESS) return false;
      if (!grouped_failed_)
        EF_LOG(WARN, CUDA, "grouped expert GEMMs refused (cuBLAS status %d): one GEMM per expert from now on",
               static_cast<int>(st));
      grouped_failed_ = true;
      return true;
    };
    if (!grouped_failed_) CopyToDevice(table, host.data(), host.size() * sizeof(uint64_t));
    const cublasStatus_t gs =
        grouped_failed_
            ? CUBLAS_STATUS_NOT_SUPPORTED
            : GroupedGemm16(t, 2 * cnt, F, H, rows2.data(), reinterpret_cast<const void* const*>(dev(gu_w)),
                            reinterpret_cast<const void* const*>(dev(gu_x)), reinterpret_cast<void* const*>(dev(gu_y)));
    refused(gs);
    int64_t o = 0;
    for (int j = 0; gs != CUBLAS_STATUS_SUCCESS && j < cnt; ++j) {
      const ExpertMlpRows& e = ex[grouped[first + j]];
      CUBLAS_CHECK_LOG(lt_->Run(t, e.gate->data, x16_of(e), gate_out(o), t, e.rows, F, H, F, false, stream_, nullptr),
                       &error_);
      CUBLAS_CHECK_LOG(lt_->Run(t, e.up->data, x16_of(e), up_out(o), t, e.rows, F, H, F, false, stream_, nullptr),
                       &error_);
      o += e.rows;
    }
    // The gate and up products of the group lie in two contiguous runs: one pass.
    CUDA_CHECK_LOG(cuda::launch_silu_mul_16(gate_out(0), up_out(0), t, off * F, stream_), &error_);
    const cublasStatus_t ds =
        gs != CUBLAS_STATUS_SUCCESS
            ? gs
            : GroupedGemm16(t, cnt, H, F, rows2.data(), reinterpret_cast<const void* const*>(dev(dn_w)),
                            reinterpret_cast<const void* const*>(dev(dn_x)), reinterpret_cast<void* const*>(dev(dn_y)));
    if (ds == CUBLAS_STATUS_SUCCESS) {
      CUDA_CHECK_LOG(
          cuda::launch_rows_16_to_f32(down16, t, y, reinterpret_cast<const cuda::RowSegment*>(dev(dn_y + cnt)), cnt,
                                      max_rows, static_cast<int>(H), stream_),
          &error_);
      continue;
    }
    refused(ds);
    o = 0;
    for (int j = 0; j < cnt; ++j) {
      const ExpertMlpRows& e = ex[grouped[first + j]];
      CUBLAS_CHECK_LOG(lt_->Run(t, e.down->data, gate_out(o), y + e.begin * H, DType::kF32, e.rows, H, F, H, false,
                                stream_, nullptr),
                       &error_);
      o += e.rows;
    }
  }
  for (int i : small) {  // on the compute stream, after the groups were enqueued
    const ExpertMlpRows& e = ex[i];
    GateUpSilu(x + e.begin * H, e.rows, *e.gate, *e.up, act);
    Gemm(act, e.rows, *e.down, nullptr, y + e.begin * H, false);
  }
  return true;
}

void CudaBackend::GemmGroup(const float* x, const uint16_t* twin, int64_t m, int count, const Weight* const* ws,
                            const Weight* const* biases, float* const* ys) {
  // Decode rows of one dtype and width: one launch for all (what three launches of a few
  // microseconds each cost at batch 1 is most of what q, k and v take to stream).
  bool one_launch = m > 0 && count >= 1 && count <= cuda::kGemvMaxGroups;
  int64_t rows = 0;
  for (int i = 0; one_launch && i < count; ++i) {
    one_launch = ws[i]->dtype == ws[0]->dtype && ws[i]->cols == ws[0]->cols &&
                 cuda::gemv_supported(m, ws[i]->cols, ws[i]->dtype, x, ws[i]->data);
    rows += ws[i]->rows;
  }
  if (!one_launch) return GemmGroup16(x, twin, m, count, ws, biases, ys);
  cuda::GemvGroupItem items[cuda::kGemvMaxGroups];
  for (int i = 0; i < count; ++i) items[i] = {ws[i]->data, ws[i]->rows, ys[i]};
  // The split for the launch's rows together (they share the SMs).
  const int split = cuda::gemv_warps_per_row(rows, ws[0]->cols, num_sms_);
  CUDA_CHECK_LOG(cuda::launch_gemv_group(x, m, items, count, ws[0]->dtype, ws[0]->cols, split, stream_), &error_);
  for (int i = 0; i < count; ++i)
    if (biases[i] && !biases[i]->empty())
      CUDA_CHECK_LOG(cuda::launch_add_bias(ys[i], m, ws[i]->rows, biases[i]->data, biases[i]->dtype, stream_), &error_);
}

void CudaBackend::GemmGroup16(const float* x, const uint16_t* twin, int64_t m, int count, const Weight* const* ws,
                              const Weight* const* biases, float* const* ys) {
  // Each weight as Gemm computes it, the 16-bit ones from one rounding of x (the caller's bf16
  // twin where it has one) instead of one per weight: the same operands, so the same bits.
  const void* x16 = nullptr;
  DType x16_type = DType::kF32;
  for (int i = 0; i < count; ++i) {
    const Weight& w = *ws[i];
    const int64_t n = w.rows, k = w.cols;
    if (IsPackedWeight(w.dtype) || w.dtype == DType::kF32 || GemvTakes(x, m, w)) {
      Gemm(x, m, w, biases[i], ys[i], false);
      if (x16 != twin) x16 = nullptr;  // Gemm may have reused (or moved) the scratch x16 was rounded into
      continue;
    }
    if (!x16 || x16_type != w.dtype) {
      x16_type = w.dtype;
      if (TwinServes(twin, w.dtype)) {
        x16 = twin;
      } else {
        void* xc = EnsureScratch(&act_, &act_cap_, static_cast<size_t>(m * k) * DTypeSize(w.dtype));
        if (!xc) return;
        CUDA_CHECK_LOG(cuda::launch_convert_f32(x, xc, w.dtype, m * k, stream_), &error_);
        x16 = xc;
      }
    }
    Gemm16(w.dtype, w.data, x16, ys[i], m, n, k, n, false);
    if (biases[i] && !biases[i]->empty())
      CUDA_CHECK_LOG(cuda::launch_add_bias(ys[i], m, n, biases[i]->data, biases[i]->dtype, stream_), &error_);
  }
}

bool CudaBackend::MoeRouted(const float* x, int64_t tokens, int top_k, const int32_t* ids, const float* weights,
                            const RoutedExpertTable& experts, float* resid) {
  if (tokens < 1 || tokens > MoeRoutedMaxTokens() || top_k < 1 || top_k > cuda::kMoeRoutedMaxTopK ||
      experts.num_experts < 1 || (experts.dtype != DType::kBF16 && experts.dtype != DType::kF16) || !experts.gate ||
      !experts.up || !experts.down || experts.hidden % 8 != 0 || experts.inter % 8 != 0 ||
      reinterpret_cast<uintptr_t>(x) % 16 != 0)
    return false;
  if (tokens > cuda::kGemvMaxRows) return MoeGrouped(x, tokens, top_k, ids, weights, experts, resid);
  const size_t pairs = static_cast<size_t>(tokens) * top_k;
  auto* act = static_cast<float*>(
      EnsureScratch(&moe_act_, &moe_act_cap_, pairs * static_cast<size_t>(experts.inter) * sizeof(float), false));
  auto* y = static_cast<float*>(
      EnsureScratch(&moe_y_, &moe_y_cap_, pairs * static_cast<size_t>(experts.hidden) * sizeof(float), false));
  if (!act || !y) return false;
  cuda::MoeRoutedArgs a{};
  a.x = x;
  a.tokens = tokens;
  a.top_k = top_k;
  a.ids = ids;
  a.weights = weights;
  a.num_experts = experts.num_experts;
  a.gate = experts.gate;
  a.up = experts.up;
  a.down = experts.down;
  a.dtype = experts.dtype;
  a.hidden = experts.hidden;
  a.inter = experts.inter;
  // The splits Gemm and GateUpSilu pick for these weights, so each pair sums as they do.
  a.gate_up_split = cuda::gemv_warps_per_row(experts.inter, experts.hidden, num_sms_);
  a.down_split = cuda::gemv_warps_per_row(experts.hidden, experts.inter, num_sms_);
  a.act = act;
  a.y = y;
  a.resid = resid;
  CUDA_CHECK_LOG(cuda::launch_moe_routed(a, stream_), &error_);
  return true;
}

bool CudaBackend::MoeGrouped(const float* x, int64_t tokens, int top_k, const int32_t* ids, const float* weights,
                             const RoutedExpertTable& experts, float* resid) {
  if (!cuda::moe_grouped_supported(tokens, top_k, experts.num_experts, experts.dtype, experts.hidden, experts.inter))
    return false;
  const size_t pairs = static_cast<size_t>(tokens) * top_k;
  void* xb = EnsureScratch(&moe_xb_, &moe_xb_cap_, static_cast<size_t>(tokens * experts.hidden) * 2, false);
  void* act = EnsureScratch(&moe_act_, &moe_act_cap_, pairs * static_cast<size_t>(experts.inter) * 2, false);
  auto* y = static_cast<float*>(
      EnsureScratch(&moe_y_, &moe_y_cap_, pairs * static_cast<size_t>(experts.hidden) * sizeof(float), false));
  auto* meta = static_cast<int32_t*>(
      EnsureScratch(&moe_meta_, &moe_meta_cap_,
                    cuda::moe_grouped_meta_ints(tokens, top_k, experts.num_experts) * sizeof(int32_t), false));
  if (!xb || !act || !y || !meta) return false;
  cuda::MoeGroupedArgs a{};
  a.x = x;
  a.tokens = tokens;
  a.top_k = top_k;
  a.ids = ids;
  a.weights = weights;
  a.num_experts = experts.num_experts;
  a.gate = experts.gate;
  a.up = experts.up;
  a.down = experts.down;
  a.dtype = experts.dtype;
  a.hidden = experts.hidden;
  a.inter = experts.inter;
  a.num_sms = num_sms_;
  a.xb = xb;
  a.act = act;
  a.y = y;
  a.meta = meta;
  a.resid = resid;
  CUDA_CHECK_LOG(cuda::launch_moe_grouped(a, stream_), &error_);
  return true;
}

void CudaBackend::CopyBatch(const CopyItem* items, int num_items) {
  // Small items in one kernel (a block each); large ones (prefill chunks) on the copy engine, which
  // moves them at full bandwidth where one block would not.
  constexpr size_t kKernelMaxBytes = 64 << 10;
  std::vector<cuda::CopyBatchItem> small;
  small.reserve(static_cast<size_t>(std::max(num_items, 0)));
  for (int i = 0; i < num_items; ++i) {
    if (items[i].bytes > kKernelMaxBytes)
      CopyOnDevice(items[i].dst, items[i].src, items[i].bytes);
    else if (items[i].bytes > 0)
      small.push_back({items[i].dst, items[i].src, items[i].bytes});
  }
  if (small.size() == 1) return CopyOnDevice(small[0].dst, small[0].src, small[0].bytes);
  if (!small.empty())
    CUDA_CHECK_LOG(cuda::launch_copy_batch(small.data(), static_cast<int>(small.size()), stream_), &error_);
}

void CudaBackend::CopyBatchToBf16(const CopyItem* items, int num_items) {
  std::vector<cuda::CopyBatchItem> todo;
  todo.reserve(static_cast<size_t>(std::max(num_items, 0)));
  for (int i = 0; i < num_items; ++i)
    if (items[i].bytes > 0) todo.push_back({items[i].dst, items[i].src, items[i].bytes});
  if (!todo.empty())
    CUDA_CHECK_LOG(cuda::launch_copy_batch_to_bf16(todo.data(), static_cast<int>(todo.size()), stream_), &error_);
}

void CudaBackend::SetZero(void* dst, size_t bytes) {
  if (bytes == 0) return;
  CUDA_CHECK_LOG(cudaMemsetAsync(dst, 0, bytes, stream_), &error_);
}

Status CudaBackend::BindToCallingThread() {
  const cudaError_t e = cudaSetDevice(options_.device);
  if (e != cudaSuccess)
    return Internal("cudaSetDevice(" + std::to_string(options_.device) + ") failed: " + cudaGetErrorString(e));
  return Status::Ok();
}

void CudaBackend::Synchronize() {
  if (RefuseCapture("a synchronisation")) return;
  CUDA_CHECK_LOG(cudaStreamSynchronize(stream_), &error_);
  RetireFinishedCopies(true);
}

StatusOr<Weight> CudaBackend::AllocateWeight(DType dtype, int64_t rows, int64_t cols) {
  EF_RETURN_IF_ERROR(CheckWeightType("cuda backend", dtype, cols));
  const size_t bytes = WeightBytes(dtype, rows, cols);
  EF_ASSIGN_OR_RETURN(void* p, DeviceAlloc(bytes));
  weights_.emplace_back(p, bytes);
  return Weight{dtype, p, rows, cols};
}

StatusOr<Weight> CudaBackend::UploadWeight(DType dtype, const void* host_data, int64_t rows, int64_t cols) {
  EF_RETURN_IF_ERROR(CheckWeightType("cuda backend", dtype, cols));
  const size_t n = static_cast<size_t>(rows * cols);
  const bool to_bf16 = options_.bf16_weights && dtype == DType::kF32 && rows > 1;
  const DType stored = to_bf16 ? DType::kBF16 : dtype;
  EF_ASSIGN_OR_RETURN(Weight w, AllocateWeight(stored, rows, cols));
  if (to_bf16) {
    // Round on the host chunk by chunk (F32ToBf16: nearest even), staged like any copy.
    std::vector<uint16_t> tmp(std::min<size_t>(n, size_t{1} << 20));
    const float* f = static_cast<const float*>(host_data);
    for (size_t off = 0; off < n; off += tmp.size()) {
      const size_t c = std::min(tmp.size(), n - off);
      for (size_t i = 0; i < c; ++i) tmp[i] = F32ToBf16(f[off + i]);
      Stage(static_cast<uint16_t*>(const_cast<void*>(w.data)) + off, tmp.data(), c * sizeof(uint16_t));
    }
  } else {
    Stage(const_cast<void*>(w.data), host_data, WeightBytes(dtype, rows, cols));
  }
  EF_RETURN_IF_ERROR(error_);
  return w;
}

// --- ops ---

void CudaBackend::Embed(const int32_t* ids, int n, const Weight& table, float* out) {
  CUDA_CHECK_LOG(cuda::launch_embed(ids, n, table.data, table.dtype, table.cols, out, stream_), &error_);
}

void CudaBackend::RmsNorm(const float* x, int64_t rows, int dim, const Weight& w, float eps, float* out) {
  CUDA_CHECK_LOG(cuda::launch_rms_norm(x, rows, dim, w.data, w.dtype, eps, out, nullptr, stream_), &error_);
}

void CudaBackend::AddRmsNorm(float* x, const float* add, int64_t rows, int dim, const Weight& w, float eps, float* out,
                             uint16_t* out16) {
  CUDA_CHECK_LOG(cuda::launch_add_rms_norm(x, add, rows, dim, w.data, w.dtype, eps, out, out16, stream_), &error_);
}

void CudaBackend::RmsNormTwin(const float* x, int64_t rows, int dim, const Weight& w, float eps, float* out,
                              uint16_t* out16) {
  CUDA_CHECK_LOG(cuda::launch_rms_norm(x, rows, dim, w.data, w.dtype, eps, out, out16, stream_), &error_);
}

void CudaBackend::Gemm(const float* x, int64_t m, const Weight& w, const Weight* bias, float* y, bool accumulate) {
  if (m <= 0) return;
  if (IsPackedWeight(w.dtype)) {
    GemmQuantized(x, m, w, y, accumulate);
    if (bias && !bias->empty())
      CUDA_CHECK_LOG(cuda::launch_add_bias(y, m, w.rows, bias->data, bias->dtype, stream_), &error_);
    return;
  }
  const int64_t n = w.rows, k = w.cols;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  if (GemvTakes(x, m, w)) {
    // Decode-sized m: stream the weights once with fp32 activations (no bf16 rounding of x).
    CUDA_CHECK_LOG(cuda::launch_gemv(x, m, w.data, w.dtype, n, k, y, accumulate,
                                     cuda::gemv_warps_per_row(n, k, num_sms_), stream_),
                   &error_);
    if (bias && !bias->empty())
      CUDA_CHECK_LOG(cuda::launch_add_bias(y, m, n, bias->data, bias->dtype, stream_), &error_);
    return;
  }
  const void* a = x;
  if (w.dtype != DType::kF32) {
    // cuBLAS wants A and B of one type: the activations meet the weights in bf16/f16.
    void* xc = EnsureScratch(&act_, &act_cap_, static_cast<size_t>(m * k) * DTypeSize(w.dtype));
    if (!xc) return;
    CUDA_CHECK_LOG(cuda::launch_convert_f32(x, xc, w.dtype, m * k, stream_), &error_);
    a = xc;
  }
  if (w.dtype != DType::kF32) {
    Gemm16(w.dtype, w.data, a, y, m, n, k, n, accumulate);
  } else {
    // Row-major y[m, n] = x[m, k] . w[n, k]^T is column-major y^T[n, m] = w^T . x^T: w is a
    // column-major [k, n] matrix used transposed, x a column-major [k, m] matrix.
    CUBLAS_CHECK_LOG(
        cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
                     &alpha, w.data, CUDA_R_32F, static_cast<int>(k), a, CUDA_R_32F, static_cast<int>(k), &beta, y,
                     CUDA_R_32F, static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        &error_);
  }
  if (bias && !bias->empty()) CUDA_CHECK_LOG(cuda::launch_add_bias(y, m, n, bias->data, bias->dtype, stream_), &error_);
}

bool CudaBackend::TwinServes(const uint16_t* twin, DType weights) {
  // cuBLASLt's algorithm depends on the operands' alignment (LtGemm plans per alignment class, up
  // to 256 bytes): the twin stands in for a scratch buffer that starts an allocation, so it must
  // start on 256 bytes too for the same algorithm, hence the same bits. Else x is rounded here.
  return twin && weights == DType::kBF16 && reinterpret_cast<uintptr_t>(twin) % 256 == 0;
}

bool CudaBackend::GemvTakes(const float* x, int64_t m, const Weight& w) const {
  return cuda::gemv_supported(m, w.cols, w.dtype, x, w.data) &&
         (w.cols * static_cast<int64_t>(sizeof(float))) % 16 == 0;
}

void CudaBackend::Gemm16(DType t, const void* w, const void* x, float* y, int64_t m, int64_t n, int64_t k, int64_t ldy,
                         bool accumulate) {
  if (lt_ && lt_->Run(t, w, x, y, m, n, k, ldy, accumulate, stream_) == CUBLAS_STATUS_SUCCESS) return;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  CUBLAS_CHECK_LOG(
      cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
                   &alpha, w, CudaType(t), static_cast<int>(k), x, CudaType(t), static_cast<int>(k), &beta, y,
                   CUDA_R_32F, static_cast<int>(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      &error_);
}

void CudaBackend::GemmQuantized(const float* x, int64_t m, const Weight& w, float* y, bool accumulate) {
  const int64_t n = w.rows, k = w.cols;
  if (cuda::gemv_quant_supported(m, k, w.dtype, x, w.data)) {
    CUDA_CHECK_LOG(cuda::launch_gemv_quant(x, m, w.data, w.dtype, n, k, y, accumulate,
                                           cuda::gemv_quant_warps_per_row(n, k, w.dtype, num_sms_), stream_),
                   &error_);
    return;
  }
  if (cuda::gemv_pbf16_supported(m, k, w.dtype, x, w.data)) {
    CUDA_CHECK_LOG(cuda::launch_gemv_pbf16(x, m, w.data, n, k, y, accumulate,
                                           cuda::gemv_pbf16_warps_per_row(n, k, num_sms_), stream_),
                   &error_);
    return;
  }
  if (cuda::gemv_block_scaled_supported(m, k, w.dtype, x, w.data)) {
    CUDA_CHECK_LOG(
        cuda::launch_gemv_block_scaled(x, m, w.data, w.dtype, n, k, y, accumulate,
                                       cuda::gemv_block_scaled_warps_per_row(n, k, w.dtype, num_sms_), stream_),
        &error_);
    return;
  }
  // Past the GEMV's rows: dequantize to bf16 (PBF16: decode, exactly) and use the bf16 cuBLAS
  // GEMM, a tile of weight rows (output columns) at a time so that the scratch stays at
  // kDequantTileBytes rather than a bf16 copy of the whole weight (the device memory the quantized
  // copy exists to save).
  auto* xc = static_cast<uint16_t*>(EnsureScratch(&act_, &act_cap_, static_cast<size_t>(m * k) * sizeof(uint16_t)));
  if (!xc) return;
  CUDA_CHECK_LOG(cuda::launch_convert_f32(x, xc, DType::kBF16, m * k, stream_), &error_);
  const int64_t tile_rows = std::min(n, std::max<int64_t>(64, kDequantTileBytes / (k * 2) / 64 * 64));
  void* wt = EnsureScratch(&dequant_, &dequant_cap_, static_cast<size_t>(tile_rows * k) * sizeof(uint16_t));
  if (!wt) return;
  for (int64_t r0 = 0; r0 < n; r0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, n - r0);
    // The previous tile's GEMM reads wt; both are in stream order, so rewriting it is safe.
    CUDA_CHECK_LOG(w.dtype == DType::kPbf16 ? cuda::launch_unpack_pbf16(w.data, n, k, r0, rows, wt, stream_)
                   : IsBlockScaled(w.dtype)
                       ? cuda::launch_dequantize_block_scaled_bf16(w.data, w.dtype, n, k, r0, rows, wt, stream_)
                       : cuda::launch_dequantize_bf16(w.data, w.dtype, n, k, r0, rows, wt, stream_),
                   &error_);
    // Column-major y^T[n, m] restricted to rows r0.. of the tile: y + r0, leading dimension n.
    Gemm16(DType::kBF16, wt, xc, y + r0, m, rows, k, n, accumulate);
  }
}

void CudaBackend::Rope(float* x, const int32_t* positions, int64_t rows, int num_heads, int head_dim, float theta) {
  CUDA_CHECK_LOG(cuda::launch_rope(x, positions, rows, num_heads, head_dim, theta, stream_), &error_);
}

void CudaBackend::RopeQK(float* q, float* k, const int32_t* positions, int64_t rows, int num_heads, int num_kv_heads,
                         int head_dim, float theta) {
  CUDA_CHECK_LOG(cuda::launch_rope_qk(q, k, positions, rows, num_heads, num_kv_heads, head_dim, theta, stream_),
                 &error_);
}

void CudaBackend::Attention(const float* q, int n_new, const float* k, const float* v, int n_total, int num_heads,
                            int num_kv_heads, int head_dim, float* out) {
  // One sequence is a batch of one: a single kernel family serves prefill, decode and batches.
  const AttentionSeq seq{k, v, /*q_row=*/0, n_new, n_total};
  AttentionSeqs(q, &seq, 1, num_heads, num_kv_heads, head_dim, out, /*kv_bf16=*/false);
}

void CudaBackend::AttentionBatch(const float* q, const AttentionSeq* seqs_host, int num_seqs, int num_heads,
                                 int num_kv_heads, int head_dim, float* out) {
  AttentionSeqs(q, seqs_host, num_seqs, num_heads, num_kv_heads, head_dim, out, kv_bf16_);
}

void CudaBackend::AttentionSeqs(const float* q, const AttentionSeq* seqs_host, int num_seqs, int num_heads,
                                int num_kv_heads, int head_dim, float* out, bool kv_bf16) {
  if (num_seqs <= 0) return;
  std::vector<cuda::AttentionSeqDesc> desc(static_cast<size_t>(num_seqs));
  for (int s = 0; s < num_seqs; ++s) {
    const AttentionSeq& a = seqs_host[s];
    desc[s] = cuda::AttentionSeqDesc{a.k, a.v, a.q_row, a.n_new, a.n_total, a.blocks, BlockShift(a)};
  }
  if (reduced_precision_attention_) {
    // Per sequence, so that a sequence's numbers do not depend on what it is batched with (their
    // output rows are disjoint): prefill chunks of at least kAttentionPrefillTcMinRows rows on the
    // tensor-core prefill kernel, decode rows over a bf16 cache on the tensor-core decode kernel
    // (where it serves the shapes), short chunks on the fp32 kernels. Should the tensor-core
    // prefill not apply (shapes, alignment, workspace memory), its chunks join the short ones.
    std::vector<cuda::AttentionSeqDesc> tc, decode, rest;
    for (const cuda::AttentionSeqDesc& d : desc)
      (d.n_new >= cuda::kAttentionPrefillTcMinRows ? tc : kv_bf16 && d.n_new == 1 ? decode : rest).push_back(d);
    if (!tc.empty() && !AttentionPrefillTc(q, tc, num_heads, num_kv_heads, head_dim, out, kv_bf16))
      rest.insert(rest.end(), tc.begin(), tc.end());
    if (!decode.empty()) AttentionSplit(q, decode, num_heads, num_kv_heads, head_dim, out, kv_bf16, /*decode_tc=*/true);
    if (!rest.empty()) AttentionSplit(q, rest, num_heads, num_kv_heads, head_dim, out, kv_bf16, /*decode_tc=*/false);
    return;
  }
  AttentionSplit(q, desc, num_heads, num_kv_heads, head_dim, out, kv_bf16, /*decode_tc=*/false);
}

StatusOr<uint64_t> CudaBackend::UploadStepSeqs(const AttentionSeq* seqs_host, int num_seqs, int num_heads,
                                               int num_kv_heads, int head_dim) {
  if (capturing_) return FailedPrecondition("cuda backend: step sequences are uploaded before a graph is recorded");
  if (num_seqs <= 0) return InvalidArgument("cuda backend: a step needs sequences");
  step_host_.resize(static_cast<size_t>(num_seqs));
  step_max_new_ = 0;
  for (int s = 0; s < num_seqs; ++s) {
    const AttentionSeq& a = seqs_host[s];
    // k and v are the layer's pools, given to each step op (null here: the plan's alignment test
    // sees the pools' allocator alignment).
    step_host_[s] = cuda::AttentionSeqDesc{nullptr, nullptr, a.q_row, a.n_new, a.n_total, a.blocks, BlockShift(a)};
    step_max_new_ = std::max(step_max_new_, a.n_new);
  }
  step_heads_ = num_heads;
  step_kv_heads_ = num_kv_heads;
  step_head_dim_ = head_dim;
  step_plan_ = cuda::plan_attention_batch(step_host_.data(), num_seqs, num_heads, num_kv_heads, head_dim, num_sms_,
                                          kv_bf16_, options_.decode_blocks_per_sm, reduced_precision_attention_);
  const size_t bytes = step_host_.size() * sizeof(cuda::AttentionSeqDesc);
  if (!EnsureScratch(&step_desc_, &step_desc_cap_, bytes)) return error_;
  CopyToDevice(step_desc_, step_host_.data(), bytes);
  // What the step ops decide on the host: the attention plan and the append's grid.
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
  const cuda::AttentionBatchPlan& p = step_plan_;
  for (uint64_t v :
       {uint64_t(p.num_splits), uint64_t(p.max_n_new), uint64_t(p.num_rows), uint64_t(p.workspace_floats),
        uint64_t(p.decode), uint64_t(p.decode_tile), uint64_t(p.decode_tc), uint64_t(p.num_counters),
        uint64_t(step_max_new_), uint64_t(num_heads), uint64_t(num_kv_heads), uint64_t(head_dim), uint64_t(num_seqs)})
    mix(v);
  return h;
}

void CudaBackend::AppendKvStep(void* k_pool, void* v_pool, const float* k, const float* v, int64_t k_width,
                               int64_t v_width) {
  CUDA_CHECK_LOG(cuda::launch_kv_append_step(static_cast<const cuda::AttentionSeqDesc*>(step_desc_),
                                             static_cast<int>(step_host_.size()), step_max_new_, k_pool, v_pool, k, v,
                                             k_width, v_width, kv_bf16_, stream_),
                 &error_);
}

bool CudaBackend::RopeQKAppendStep(float* q, float* k, const float* v, const int32_t* positions, int num_heads,
                                   int num_kv_heads, int head_dim, float theta, void* k_pool, void* v_pool) {
  if (step_host_.empty() || !v || !v_pool || head_dim % 2 != 0 || head_dim > cuda::kRopeAppendMaxHeadDim) return false;
  CUDA_CHECK_LOG(
      cuda::launch_rope_append_step(static_cast<const cuda::AttentionSeqDesc*>(step_desc_),
                                    static_cast<int>(step_host_.size()), step_max_new_, q, k, v, positions, num_heads,
                                    num_kv_heads, head_dim, theta, k_pool, v_pool, kv_bf16_, stream_),
      &error_);
  return true;
}

void CudaBackend::AttentionStep(const float* q, const void* k_pool, const void* v_pool, float* out) {
  const cuda::AttentionBatchPlan& plan = step_plan_;
  if (plan.max_n_new <= 0) return;
  if (plan.decode && (reinterpret_cast<uintptr_t>(k_pool) % 16 != 0 || reinterpret_cast<uintptr_t>(v_pool) % 16 != 0)) {
    if (error_.ok()) error_ = Internal("cuda backend: a step's KV pools must be 16-byte aligned");
    return;
  }
  float* ws = nullptr;
  unsigned* counters = nullptr;
  if (!AttentionScratch(plan, &ws, &counters)) return;  // a recording refuses to grow them
  CUDA_CHECK_LOG(cuda::launch_attention_step(q, static_cast<const cuda::AttentionSeqDesc*>(step_desc_),
                                             static_cast<int>(step_host_.size()), plan, k_pool, v_pool, step_heads_,
                                             step_kv_heads_, step_head_dim_, out, ws, counters, stream_, kv_bf16_),
                 &error_);
}

bool CudaBackend::RefuseCapture(const char* why) {
  if (!capturing_) return false;
  if (!capture_refused_) {
    capture_refused_ = true;
    capture_refusal_ = why;
  }
  return true;
}

Status CudaBackend::BeginGraph() {
  if (capturing_) return FailedPrecondition("cuda backend: a graph is being recorded already");
  EF_RETURN_IF_ERROR(error_);
  capture_refused_ = false;
  capture_refusal_.clear();
  // Relaxed: cuBLAS and the launch helpers may query attributes while the stream records.
  if (cudaError_t e = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed); e != cudaSuccess) {
    (void)cudaGetLastError();
    return Unavailable(std::string("cuda backend: cannot record a graph: ") + cudaGetErrorString(e));
  }
  capturing_ = true;
  return Status::Ok();
}

StatusOr<int> CudaBackend::EndGraph() {
  if (!capturing_) return FailedPrecondition("cuda backend: no graph is being recorded");
  cudaGraph_t graph = nullptr;
  const cudaError_t e = cudaStreamEndCapture(stream_, &graph);
  capturing_ = false;
  // An error while recording belongs to the recording: nothing ran, the backend stays healthy.
  std::string why = capture_refused_ ? capture_refusal_ : std::string();
  if (!error_.ok()) {
    if (why.empty()) why = error_.message();
    error_ = Status::Ok();
  }
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    if (why.empty()) why = cudaGetErrorString(e);
  }
  if (!why.empty()) {
    if (graph) cudaGraphDestroy(graph);
    return Unavailable("cuda backend: graph not recorded (" + why + ")");
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t ie = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (ie != cudaSuccess) {
    (void)cudaGetLastError();
    return Unavailable(std::string("cuda backend: graph not instantiated: ") + cudaGetErrorString(ie));
  }
  graphs_.push_back(exec);
  return static_cast<int>(graphs_.size()) - 1;
}

Status CudaBackend::LaunchGraph(int graph) {
  if (capturing_) return FailedPrecondition("cuda backend: a graph is launched while another is recorded");
  if (graph < 0 || graph >= static_cast<int>(graphs_.size()) || !graphs_[graph])
    return InvalidArgument("cuda backend: no graph " + std::to_string(graph));
  CUDA_CHECK_LOG(cudaGraphLaunch(graphs_[graph], stream_), &error_);
  return error_;
}

void CudaBackend::DropGraphs() {
  if (graphs_.empty() || capturing_) return;
  CUDA_CHECK_LOG(cudaStreamSynchronize(stream_), &error_);  // none may be running when it is freed
  for (cudaGraphExec_t g : graphs_)
    if (g) CUDA_CHECK_LOG(cudaGraphExecDestroy(g), &error_);
  graphs_.clear();
}

const cuda::AttentionSeqDesc* CudaBackend::DeviceDescriptors(const std::vector<cuda::AttentionSeqDesc>& desc) {
  if (static_cast<int>(desc.size()) <= cuda::kAttentionInlineSeqs) return nullptr;
  // Too many to pass in the launch: a device copy. Kernels enqueued before read this buffer; the
  // copy is ordered after them on the stream.
  const size_t desc_bytes = desc.size() * sizeof(cuda::AttentionSeqDesc);
  auto* d = static_cast<cuda::AttentionSeqDesc*>(EnsureScratch(&attn_desc_, &attn_desc_cap_, desc_bytes));
  if (!d) return nullptr;
  CopyToDevice(d, desc.data(), desc_bytes);
  return d;
}

bool CudaBackend::AttentionPrefillTc(const float* q, const std::vector<cuda::AttentionSeqDesc>& desc, int num_heads,
                                     int num_kv_heads, int head_dim, float* out, bool kv_bf16) {
  const int n = static_cast<int>(desc.size());
  if (!cuda::attention_prefill_tc_supported(desc.data(), n, num_heads, num_kv_heads, head_dim, q, out)) return false;
  // The bf16 keys and values of these sequences live in the attention workspace; without the
  // memory for them the fp32 path (no workspace) serves, and the backend stays healthy.
  const size_t ws_bytes = cuda::attention_prefill_tc_workspace_bytes(desc.data(), n, num_kv_heads, head_dim);
  void* ws = EnsureScratch(&attn_ws_, &attn_ws_cap_, ws_bytes, /*required=*/false);
  if (!ws) return false;
  const cuda::AttentionSeqDesc* desc_dev = DeviceDescriptors(desc);
  if (n > cuda::kAttentionInlineSeqs && !desc_dev) return true;  // the error is recorded
  CUDA_CHECK_LOG(cuda::launch_attention_prefill_tc(q, desc.data(), desc_dev, n, num_heads, num_kv_heads, head_dim, out,
                                                   ws, stream_, kv_bf16),
                 &error_);
  return true;
}

bool CudaBackend::AttentionScratch(const cuda::AttentionBatchPlan& plan, float** ws, unsigned** counters) {
  if (plan.num_splits > 1) {
    *ws = static_cast<float*>(EnsureScratch(&attn_ws_, &attn_ws_cap_, plan.workspace_floats * sizeof(float)));
    if (!*ws) return false;
  }
  if (plan.num_counters > 0) {
    // Zeroed when (re)allocated; the kernel leaves them zeroed after each launch.
    const size_t need = static_cast<size_t>(plan.num_counters) * sizeof(unsigned);
    if (attn_counters_cap_ < need) {
      if (!EnsureScratch(&attn_counters_, &attn_counters_cap_, need)) return false;
      SetZero(attn_counters_, attn_counters_cap_);
    }
    *counters = static_cast<unsigned*>(attn_counters_);
  }
  return true;
}

void CudaBackend::AttentionSplit(const float* q, const std::vector<cuda::AttentionSeqDesc>& desc, int num_heads,
                                 int num_kv_heads, int head_dim, float* out, bool kv_bf16, bool decode_tc) {
  const int n = static_cast<int>(desc.size());
  const cuda::AttentionBatchPlan plan = cuda::plan_attention_batch(
      desc.data(), n, num_heads, num_kv_heads, head_dim, num_sms_, kv_bf16, options_.decode_blocks_per_sm, decode_tc);
  if (plan.max_n_new <= 0) return;
  const cuda::AttentionSeqDesc* desc_dev = DeviceDescriptors(desc);
  if (n > cuda::kAttentionInlineSeqs && !desc_dev) return;
  float* ws = nullptr;
  unsigned* counters = nullptr;
  if (!AttentionScratch(plan, &ws, &counters)) return;
  CUDA_CHECK_LOG(cuda::launch_attention_batch(q, desc.data(), desc_dev, n, plan, num_heads, num_kv_heads, head_dim, out,
                                              ws, counters, stream_, kv_bf16),
                 &error_);
}

void CudaBackend::RopeTable(float* x, const int32_t* positions, int64_t rows, int num_heads, const RopeSpec& spec) {
  CUDA_CHECK_LOG(cuda::launch_rope_table(x, positions, rows, num_heads, spec.rot_dim, spec.row_stride, spec.head_stride,
                                         spec.offset, spec.inv_freq, spec.scale, spec.interleaved, stream_),
                 &error_);
}

void CudaBackend::AttentionEx(const float* q, const AttentionSeq* seqs_host, int num_seqs, const AttentionSpec& spec,
                              float* out) {
  const cuda::AttentionExShape shape{spec.num_heads, spec.num_kv_heads, spec.qk_dim,   spec.v_dim,
                                     spec.q_stride,  spec.k_stride,     spec.v_stride, spec.out_stride,
                                     spec.scale,     spec.window,       spec.sinks};
  for (int s = 0; s < num_seqs; ++s) {
    const AttentionSeq& a = seqs_host[s];
    // AttentionEx reads fp32 K/V whatever SetKvCacheDType says (the engine keeps such models in fp32).
    CUDA_CHECK_LOG(cuda::launch_attention_ex(q, static_cast<const float*>(a.k), static_cast<const float*>(a.v), a.q_row,
                                             a.n_new, a.n_total, a.blocks, BlockShift(a), shape, out, stream_),
                   &error_);
  }
}

void CudaBackend::GemmPerHead(const float* x, int64_t rows, int num_heads, int64_t x_stride, int x_head_stride,
                              const Weight& w, int n, float* y, int64_t y_stride, int y_head_stride) {
  CUDA_CHECK_LOG(cuda::launch_gemm_per_head(x, rows, num_heads, x_stride, x_head_stride, w.data, w.dtype, n, w.cols, y,
                                            y_stride, y_head_stride, stream_),
                 &error_);
}

void CudaBackend::Copy2D(float* dst, int64_t dst_pitch, const float* src, int64_t src_pitch, int64_t width,
                         int64_t rows) {
  if (rows <= 0 || width <= 0) return;
  CUDA_CHECK_LOG(cudaMemcpy2DAsync(dst, dst_pitch * sizeof(float), src, src_pitch * sizeof(float),
                                   width * sizeof(float), rows, cudaMemcpyDeviceToDevice, stream_),
                 &error_);
}

void CudaBackend::ClampedSwiGlu(const float* gate, const float* up, float* out, int64_t n, float alpha, float limit) {
  CUDA_CHECK_LOG(cuda::launch_clamped_swiglu(gate, up, out, n, alpha, limit, stream_), &error_);
}

void CudaBackend::SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  CUDA_CHECK_LOG(cuda::launch_silu_mul(gate, up, out, n, stream_), &error_);
}

void CudaBackend::Add(float* y, const float* x, int64_t n) {
  CUDA_CHECK_LOG(cuda::launch_add(y, x, n, stream_), &error_);
}

void CudaBackend::Clamp(float* x, int64_t n, float c) { CUDA_CHECK_LOG(cuda::launch_clamp(x, n, c, stream_), &error_); }

void CudaBackend::RouterTopK(const float* logits, int64_t rows, int num_experts, int k, bool renormalize, int32_t* ids,
                             float* weights) {
  CUDA_CHECK_LOG(cuda::launch_router_topk(logits, rows, num_experts, k, renormalize, ids, weights, stream_), &error_);
}

void CudaBackend::GatherRows(const float* src, const int32_t* idx, int64_t n, int dim, float* dst) {
  CUDA_CHECK_LOG(cuda::launch_gather_rows(src, idx, n, dim, dst, nullptr, stream_), &error_);
}

void CudaBackend::GatherRowsTwin(const float* src, const int32_t* idx, int64_t n, int dim, float* dst,
                                 uint16_t* dst16) {
  CUDA_CHECK_LOG(cuda::launch_gather_rows(src, idx, n, dim, dst, dst16, stream_), &error_);
}

void CudaBackend::ArgMaxRows(const float* x, int64_t rows, int64_t cols, int32_t* out) {
  CUDA_CHECK_LOG(cuda::launch_argmax_rows(x, rows, cols, out, stream_), &error_);
}

bool CudaBackend::SamplesRows() const { return params::CudaSampleRows(); }

void CudaBackend::SampleRows(const float* x, int64_t rows, int64_t cols, const RowSampling* params, int32_t* out) {
  CUDA_CHECK_LOG(cuda::launch_sample_rows(x, rows, cols, params, out, stream_), &error_);
}

void CudaBackend::ScatterAddRows(const float* src, const int32_t* idx, const float* scale, int64_t n, int dim,
                                 float* dst) {
  CUDA_CHECK_LOG(cuda::launch_scatter_add_rows(src, idx, scale, n, dim, dst, stream_), &error_);
}

void CudaBackend::CombineRows(const float* src, const int32_t* pos, const float* scale, int64_t tokens, int k, int dim,
                              float* dst) {
  CUDA_CHECK_LOG(cuda::launch_combine_rows(src, pos, scale, tokens, k, dim, dst, stream_), &error_);
}

void CudaBackend::AddSigmoidGated(const float* src, const float* gate_logit, int64_t rows, int dim, float* dst) {
  CUDA_CHECK_LOG(cuda::launch_add_sigmoid_gated(src, gate_logit, rows, dim, dst, stream_), &error_);
}

// --- factory hooks of backend.cc ---

StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device) {
  EF_ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> b, CudaBackend::Create(CudaBackendOptions::FromParams(device)));
  return std::unique_ptr<Backend>(std::move(b));
}

bool CudaDeviceAvailable() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

}  // namespace ef::runtime
