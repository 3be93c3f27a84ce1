// ef_decode_bench: decode and prefill time of MoE decoder layers on the CUDA backend, against the
// HBM bound: Mixtral-8x7B-shaped by default, Qwen3-30B-A3B-shaped with --shape qwen3-30b-a3b.
//
// The layers are synthetic: bf16 weights generated on the GPU (launch_fill_random), all experts
// resident. Each step calls the Backend ops in the engine's order (Engine::Forward/Attention/
// MoeBlock: RMSNorm, q/k/v GEMMs (one GemmGroup), RoPE, KV append, one batched attention call, o
// GEMM accumulated into the residual, RMSNorm, router GEMM, router top-k, then for decode batches MoeRouted serves the
// routed experts on the device into the residual (Backend::MoeRouted; the step's routing comes to
// the host once, at its end), otherwise zeroing the MoE output, the routing (ids and weights side
// by side) copied to the host in one copy, LocalMoeExecutor::Run and the residual), so what is
// timed is the engine's real path minus the embedding and LM head.
//
// Bound (documented formula): bytes of active weights streamed per layer / HBM bandwidth, with
// active weights = attention (q, k, v, o) + router + the distinct experts the router chose in
// that step (measured), each counted once; KV-cache reads are reported apart. Default bandwidth
// 3.6 TB/s (what a decode-shaped bf16 GEMM streams at on the H200, ACCELERATOR.md).
//
// The breakdown times single ops in device time: each measurement is queued behind a long GEMM so
// that the host's launch rate does not set it. --sweep adds the GEMV at every K split for the
// layer's decode shapes.
//
//   ef_decode_bench [--shape mixtral-8x7b] [--layers 4] [--batches 1,16,64] [--context 512]
//                   [--prefill 2048] [--iters 20] [--hbm-tbps 3.6] [--sweep] [--profile] [--json FILE]
//                   [--step | --graphs]   decode steps as the engine runs them (step ops; CUDA graphs)
#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "runtime/backend/cuda/cuda_backend.h"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/core/build_info.h"
#include "runtime/engine/moe_executor.h"
#include "tests/perf/device_info.h"

namespace ef::runtime {
namespace {

struct Args {
  int layers = 4;
  std::vector<int> batches = {1, 16, 64};
  int context = 512;
  int prefill = 2048;
  int iters = 20;
  double hbm_tbps = 3.6;
  bool hbm_given = false;  // --hbm-tbps given (else the H200's rate, whatever the device)
  bool sweep = false;
  bool profile = false;
  bool lt_gemm = true;
  bool fp32_attention = false;
  bool fused_gate_up = true;
  int expert_streams = 4;  // --expert-streams: ExpertMlps' streams (0: one Gemm path per expert)
  int prefill_iters = 5;
  bool pdl = true;            // --no-pdl
  bool host_routing = false;  // --host-routing: every MoE layer's routing to the host (the path past MoeRouted's rows)
  bool separate_qkv = false;  // --separate-qkv: q, k and v as three Gemm calls
  bool twins = true;          // --no-twins: no bf16 twins of the normalised rows (each GEMM rounds x)
  // --kv-bf16 / --kv-fp32: the KV cache's dtype; default: the engine's kv_cache_dtype auto for these
  // bf16 weights (bf16, fp32 beside --fp32-attention).
  bool kv_bf16 = true;
  bool kv_given = false;
  int kv_block = 0;  // --kv-block-size: the steps' KV cache paged in blocks of this many tokens
  bool kv_block_given = false;
  // --step: decode steps as the engine's step pass runs them (Engine::StepPass): the step's
  // sequences uploaded once (UploadStepSeqs), RoPE and the KV appends in one op
  // (RopeQKAppendStep), attention over the uploaded sequences (AttentionStep). --graphs: and each
  // decode batch recorded once as a CUDA graph and replayed (EngineOptions::cuda_graphs). Both
  // need a paged KV cache (the engine's default block of 16 tokens unless --kv-block-size says).
  bool step = false;
  bool graphs = false;
  bool breakdown = true;  // --no-breakdown: the step timings only (e.g. under a profiler)
  std::string json;
  // The layer shape (--shape): Mixtral-8x7B by default.
  std::string shape = "mixtral-8x7b";
  int hidden = 4096, inter = 14336, experts = 8, top_k = 2, heads = 32, kv_heads = 8, head_dim = 128;
  bool qk_norm = false;  // RMSNorm of each q and k head before RoPE (Qwen3's q_norm / k_norm)
};

[[noreturn]] void Die(const std::string& msg) {
  std::fprintf(stderr, "ef_decode_bench: %s\n", msg.c_str());
  std::exit(1);
}

Args ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) Die("missing value after " + k);
      return argv[++i];
    };
    if (k == "--layers")
      a.layers = std::stoi(next());
    else if (k == "--shape") {
      a.shape = next();
      if (a.shape == "qwen3-30b-a3b") {  // 128 fine-grained experts, top-8
        a.hidden = 2048, a.inter = 768, a.experts = 128, a.top_k = 8, a.heads = 32, a.kv_heads = 4, a.head_dim = 128;
        a.qk_norm = true;
      } else if (a.shape != "mixtral-8x7b") {
        Die("unknown --shape " + a.shape + " (mixtral-8x7b, qwen3-30b-a3b)");
      }
    } else if (k == "--context")
      a.context = std::stoi(next());
    else if (k == "--prefill")
      a.prefill = std::stoi(next());
    else if (k == "--iters")
      a.iters = std::stoi(next());
    else if (k == "--hbm-tbps") {
      a.hbm_tbps = std::stod(next());
      a.hbm_given = true;
    } else if (k == "--json")
      a.json = next();
    else if (k == "--sweep")
      a.sweep = true;
    else if (k == "--profile")
      a.profile = true;
    else if (k == "--no-lt")
      a.lt_gemm = false;
    else if (k == "--fp32-attention")
      a.fp32_attention = true;
    else if (k == "--unfused-gate-up")
      a.fused_gate_up = false;
    else if (k == "--expert-streams")
      a.expert_streams = std::stoi(next());
    else if (k == "--no-pdl")
      a.pdl = false;
    else if (k == "--prefill-iters")
      a.prefill_iters = std::max(1, std::stoi(next()));
    else if (k == "--host-routing")
      a.host_routing = true;
    else if (k == "--separate-qkv")
      a.separate_qkv = true;
    else if (k == "--no-twins")
      a.twins = false;
    else if (k == "--kv-bf16" || k == "--kv-fp32") {
      a.kv_bf16 = k == "--kv-bf16";
      a.kv_given = true;
    } else if (k == "--kv-block-size") {
      a.kv_block = std::stoi(next());
      if (a.kv_block < 0 || a.kv_block > 1024 || (a.kv_block & (a.kv_block - 1)) != 0)
        Die("--kv-block-size must be 0 or a power of two up to 1024");
      a.kv_block_given = true;
    } else if (k == "--step")
      a.step = true;
    else if (k == "--graphs")
      a.step = a.graphs = true;
    else if (k == "--no-breakdown")
      a.breakdown = false;
    else if (k == "--batches") {
      a.batches.clear();
      std::stringstream ss(next());
      for (std::string t; std::getline(ss, t, ',');) a.batches.push_back(std::stoi(t));
    } else if (k == "-h" || k == "--help") {
      std::printf(
          "ef_decode_bench [--layers N] [--batches 1,16,64 (\"\": none)] [--context N] [--prefill N] [--iters N] "
          "[--hbm-tbps X] [--sweep] [--profile] [--no-lt] [--shape NAME] [--step | --graphs] [--json FILE]\n"
          "  --shape    mixtral-8x7b (default) or qwen3-30b-a3b (hidden 2048, 128 experts x ffn 768, top-8,\n"
          "             32 / 4 heads x 128, q and k normed per head)\n"
          "  --no-lt    16-bit GEMMs through cublasGemmEx instead of the planned cuBLASLt path\n"
          "  --fp32-attention  the steps' attention on the exact fp32 kernels (default: tensor cores with\n"
          "             bf16 operands, what the engine picks for a bf16 model)\n"
          "  --unfused-gate-up  decode experts as Gemm, Gemm, SiluMul instead of the fused gate/up GEMV\n"
          "  --host-routing  every MoE layer copies its routing to the host and waits, at every batch size\n"
          "             (default: decode batches MoeRouted serves keep it on the device, as the engine does)\n"
          "  --separate-qkv  q, k and v as three Gemm calls instead of one GemmGroup\n"
          "  --no-twins      no bf16 twins (CudaBackendOptions::bf16_twins): each GEMM past the GEMV rounds\n"
          "                  its rows to bf16 itself\n"
          "  --kv-bf16, --kv-fp32  keys and values cached in bf16 (appended by CopyBatchToBf16) or fp32;\n"
          "             default: what EngineOptions::kv_cache_dtype auto picks for bf16 weights (bf16;\n"
          "             fp32 with --fp32-attention)\n"
          "  --kv-block-size N  the steps' KV cache paged (EngineOptions::kv_block_size): one pool per\n"
          "             layer, each sequence's blocks strided over it (0: contiguous per sequence)\n"
          "  --step     decode steps as the engine's step pass: sequences uploaded once per step, RoPE and\n"
          "             the KV appends in one op, attention over the uploaded sequences (paged KV cache,\n"
          "             blocks of 16 tokens unless --kv-block-size says; prefill then runs on it too)\n"
          "  --graphs   --step, and each decode batch recorded once as a CUDA graph and replayed, as the\n"
          "             engine runs decode steps by default (EngineOptions::cuda_graphs)\n"
          "  --expert-streams N  prefill experts through Backend::ExpertMlps on N streams with 16-bit products\n"
          "             (default 4; 0: each expert as GateUpSilu or Gemm, Gemm, SiluMul, Gemm in fp32 products)\n"
          "  --no-pdl   launch the decode path's kernels without programmatic dependent launch\n"
          "  --prefill-iters N  timed prefill steps, the median reported (default 5)\n"
          "  --no-breakdown  skip the per-op breakdown (the step timings only, e.g. under a profiler)\n"
          "  --profile  one more prefill step with a cudaEvent after every op: device time per op kind\n");
      std::exit(0);
    } else {
      Die("unknown argument " + k);
    }
  }
  if (!a.kv_given) a.kv_bf16 = !a.fp32_attention;
  if (a.step && a.kv_block == 0) {
    if (a.kv_block_given) Die("--step and --graphs run on a paged KV cache: --kv-block-size must be > 0");
    a.kv_block = 16;  // EngineOptions::kv_block_size
  }
  return a;
}

template <typename T>
T OrDie(StatusOr<T> s, const char* what) {
  if (!s.ok()) Die(std::string(what) + ": " + s.status().ToString());
  return std::move(s).value();
}

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct Layer {
  Weight input_norm, post_norm, q, k, v, o, router;
  Weight q_norm, k_norm;  // per head, with Args::qk_norm
  std::vector<ExpertWeights> experts;
  RoutedExpertTable table;  // the experts' device pointer tables (MoeRouted)
};

class SyntheticExperts final : public ExpertSource {
 public:
  explicit SyntheticExperts(const std::vector<Layer>* layers) : layers_(layers) {}
  StatusOr<ExpertWeights> Acquire(int layer, int expert) override {
    if (on_expert) on_expert(true, layer, expert);
    return (*layers_)[layer].experts[expert];
  }
  void Release(int layer, int expert) override {
    if (on_expert) on_expert(false, layer, expert);
  }
  int MaxAcquired() const override { return static_cast<int>((*layers_)[0].experts.size()); }
  // --profile: told before (true) and after (false) each expert's MLP is enqueued.
  std::function<void(bool, int, int)> on_expert;

 private:
  const std::vector<Layer>* layers_;
};

// Untimed steps first: at least 3 and 0.3 s of them. A GPU that sat idle runs its first tens of
// milliseconds at a low clock (an H100 read 345 MHz before the bench, 1980 MHz under load), which
// a handful of 17 ms prefill steps would time.
template <typename Step, typename Sync>
void WarmUp(Step step, Sync sync) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 3 || Seconds(t0, std::chrono::steady_clock::now()) < 0.3; ++i) {
    step();
    sync();
  }
}

class Bench {
 public:
  explicit Bench(const Args& a) : a_(a) {
    // The EF_CUDA_* parameters first (as the engine reads them), then this bench's flags.
    CudaBackendOptions o = CudaBackendOptions::FromParams(0);
    o.lt_gemm = a.lt_gemm;
    o.fused_gate_up = a.fused_gate_up;
    o.expert_streams = a.expert_streams;
    o.bf16_twins = o.bf16_twins && a.twins;
    o.pdl = a.pdl;
    o.reduced_precision_attention = !a.fp32_attention;  // as the engine's "auto" for bf16 weights
    backend_ = OrDie(CudaBackend::Create(o), "cuda backend");
    b_ = backend_.get();
    if (a.kv_bf16 && !b_->SetKvCacheDType(DType::kBF16)) Die("no bf16 kv cache on this backend");
    if (cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, b_->device()) != cudaSuccess)
      Die("cannot read the SM count");
  }

  void BuildLayers() {
    uint64_t seed = 1;
    auto rand_weight = [&](int64_t rows, int64_t cols, float scale) {
      Weight w = OrDie(b_->AllocateWeight(DType::kBF16, rows, cols), "weight");
      Check(
          cuda::launch_fill_random(const_cast<void*>(w.data), DType::kBF16, rows * cols, seed++, scale, b_->stream()));
      return w;
    };
    std::vector<float> ones(a_.hidden, 1.0f);
    const float sh = 1.7f / std::sqrt(static_cast<float>(a_.hidden));  // uniform with unit-ish output variance
    const float si = 1.7f / std::sqrt(static_cast<float>(a_.inter));
    const int qd = a_.heads * a_.head_dim, kvd = a_.kv_heads * a_.head_dim;
    for (int l = 0; l < a_.layers; ++l) {
      Layer L;
      L.input_norm = OrDie(b_->UploadWeight(DType::kF32, ones.data(), 1, a_.hidden), "norm");
      L.post_norm = OrDie(b_->UploadWeight(DType::kF32, ones.data(), 1, a_.hidden), "norm");
      if (a_.qk_norm) {
        L.q_norm = OrDie(b_->UploadWeight(DType::kF32, ones.data(), 1, a_.head_dim), "q norm");
        L.k_norm = OrDie(b_->UploadWeight(DType::kF32, ones.data(), 1, a_.head_dim), "k norm");
      }
      L.q = rand_weight(qd, a_.hidden, sh);
      L.k = rand_weight(kvd, a_.hidden, sh);
      L.v = rand_weight(kvd, a_.hidden, sh);
      L.o = rand_weight(a_.hidden, qd, 1.7f / std::sqrt(static_cast<float>(qd)));
      L.router = rand_weight(a_.experts, a_.hidden, 4 * sh);
      std::vector<const void*> ptrs(3 * a_.experts);
      for (int e = 0; e < a_.experts; ++e) {
        ExpertWeights w;
        w.gate = rand_weight(a_.inter, a_.hidden, sh);
        w.up = rand_weight(a_.inter, a_.hidden, sh);
        w.down = rand_weight(a_.hidden, a_.inter, si);
        ptrs[e] = w.gate.data;
        ptrs[a_.experts + e] = w.up.data;
        ptrs[2 * a_.experts + e] = w.down.data;
        L.experts.push_back(w);
      }
      tables_.push_back(OrDie(b_->Allocate(ptrs.size() * sizeof(void*)), "expert table"));
      b_->CopyToDevice(tables_.back().data(), ptrs.data(), ptrs.size() * sizeof(void*));
      const auto* t = static_cast<const void* const*>(tables_.back().data());
      L.table = RoutedExpertTable{t, t + a_.experts, t + 2 * a_.experts, DType::kBF16, a_.experts, a_.hidden, a_.inter};
      layers_.push_back(std::move(L));
    }
    b_->Synchronize();
    attn_bytes_ = layers_[0].q.nbytes() + layers_[0].k.nbytes() + layers_[0].v.nbytes() + layers_[0].o.nbytes() +
                  layers_[0].router.nbytes();
    expert_bytes_ = layers_[0].experts[0].nbytes();
    source_ = std::make_unique<SyntheticExperts>(&layers_);
    moe_ = std::make_unique<LocalMoeExecutor>(b_, a_.hidden, a_.experts);
    moe_->set_expert_source(source_.get());
  }

  size_t KvElem() const { return a_.kv_bf16 ? sizeof(uint16_t) : sizeof(float); }
  void* KvAt(const Buffer& b, int64_t values) const { return static_cast<std::byte*>(b.data()) + values * KvElem(); }

  // Sequences: `num` of them, each a KV cache of `cap` positions per layer, `len` filled.
  void MakeSequences(int num, int cap) {
    kv_.clear();
    kv_cap_ = cap;
    const size_t bytes = static_cast<size_t>(cap) * a_.kv_heads * a_.head_dim * KvElem();
    for (int s = 0; s < num; ++s) {
      std::vector<Buffer> per;
      for (int l = 0; l < 2 * a_.layers; ++l) per.push_back(OrDie(b_->Allocate(bytes), "kv cache"));
      kv_.push_back(std::move(per));
    }
    if (a_.kv_block <= 0) return;
    // Paged: sequence s owns blocks s, s + num, s + 2 num, ... of every layer's pool (interleaved,
    // as sequences that grow together get them from a shared pool).
    const int bs = a_.kv_block;
    nblk_ = (cap + bs - 1) / bs;
    const size_t pool_bytes = static_cast<size_t>(num) * nblk_ * bs * a_.kv_heads * a_.head_dim * KvElem();
    pool_.clear();
    ++layout_generation_;
    for (int l = 0; l < 2 * a_.layers; ++l) pool_.push_back(OrDie(b_->Allocate(pool_bytes), "kv pool"));
    tables_host_.assign(static_cast<size_t>(num) * nblk_, 0);
    for (int sq = 0; sq < num; ++sq)
      for (int j = 0; j < nblk_; ++j) tables_host_[static_cast<size_t>(sq) * nblk_ + j] = j * num + sq;
    tables_dev_ = OrDie(b_->Allocate(tables_host_.size() * sizeof(int32_t)), "block tables");
    b_->CopyToDevice(tables_dev_.data(), tables_host_.data(), tables_host_.size() * sizeof(int32_t));
  }

  // One forward over all layers: chunk i appends n_new[i] tokens at position len[i] to sequence i.
  // Returns the distinct experts per layer.
  std::vector<int> Forward(const std::vector<int>& n_new, const std::vector<int>& len) {
    int64_t T = 0;
    std::vector<int32_t> pos;
    for (size_t i = 0; i < n_new.size(); ++i) {
      for (int j = 0; j < n_new[i]; ++j) pos.push_back(len[i] + j);
      T += n_new[i];
    }
    const int H = a_.hidden, qd = a_.heads * a_.head_dim, kvd = a_.kv_heads * a_.head_dim;
    float* x = Scratch(0, T * H);
    float* h = Scratch(1, T * H);
    float* q = Scratch(2, T * qd);
    float* k = Scratch(3, T * kvd);
    float* v = Scratch(4, T * kvd);
    float* attn = Scratch(5, T * qd);
    float* out = Scratch(7, T * H);
    float* logits = Scratch(8, T * a_.experts);
    // ids and weights side by side: one device-to-host copy (one sync) brings both, as in the engine.
    // Decode rows MoeRouted serves keep every layer's routing on the device: one slice per layer,
    // copied to the host once at the end of the step.
    const bool device_routing = !a_.host_routing && T <= b_->MoeRoutedMaxTokens();
    const int64_t per_layer = 2 * T * a_.top_k;
    float* routing_all = Scratch(9, (device_routing ? a_.layers : 1) * per_layer);
    auto* pos_dev = reinterpret_cast<int32_t*>(Scratch(11, T));
    // The normalised rows' bf16 twin for the GEMMs that read them, as the engine makes it.
    const bool twins = b_->Bf16Twins(T, DType::kBF16);
    auto* h16 = twins ? reinterpret_cast<uint16_t*>(Scratch(18, (T * H + 1) / 2)) : nullptr;
    b_->CopyToDevice(pos_dev, pos.data(), pos.size() * sizeof(int32_t));
    // --step: a decode step's sequences go to the device once, for every layer (Engine::Forward).
    const bool step =
        a_.step && a_.kv_block > 0 && std::all_of(n_new.begin(), n_new.end(), [](int n) { return n == 1; });
    uint64_t plan = 0;
    if (step) {
      std::vector<AttentionSeq> seqs;
      for (size_t s = 0; s < n_new.size(); ++s)
        seqs.push_back(AttentionSeq{nullptr, nullptr, static_cast<int64_t>(s), 1, len[s] + 1,
                                    tables_dev_.i32() + s * nblk_, a_.kv_block});
      plan = OrDie(b_->UploadStepSeqs(seqs.data(), static_cast<int>(seqs.size()), a_.heads, a_.kv_heads, a_.head_dim),
                   "step sequences");
    }
    std::vector<int32_t> ids(T * a_.top_k);
    std::vector<float> wts(T * a_.top_k);
    std::vector<float> routing(2 * T * a_.top_k);
    std::vector<int> distinct;
    auto layers = [&] {
      bool normed = false;  // this layer's input norm ran with the previous layer's residual add
      for (int l = 0; l < a_.layers; ++l) {
        const Layer& L = layers_[l];
        if (!normed) {
          if (h16)
            b_->RmsNormTwin(x, T, H, L.input_norm, 1e-5f, h, h16);
          else
            b_->RmsNorm(x, T, H, L.input_norm, 1e-5f, h);
          Mark("rms norm");
        }
        normed = false;
        if (a_.separate_qkv) {
          b_->Gemm(h, T, L.q, nullptr, q, false);
          b_->Gemm(h, T, L.k, nullptr, k, false);
          b_->Gemm(h, T, L.v, nullptr, v, false);
        } else {
          const Weight* ws[] = {&L.q, &L.k, &L.v};
          const Weight* bs[] = {nullptr, nullptr, nullptr};
          float* ys[] = {q, k, v};
          b_->GemmGroup(h, h16, T, 3, ws, bs, ys);
        }
        Mark("q, k, v gemms");
        if (a_.qk_norm) {  // as Engine::Attention runs QkNorm::kPerHead
          b_->RmsNorm(q, T * a_.heads, a_.head_dim, L.q_norm, 1e-6f, q);
          b_->RmsNorm(k, T * a_.kv_heads, a_.head_dim, L.k_norm, 1e-6f, k);
          Mark("q, k norms");
        }
        if (step) {  // as Engine::Attention runs a step pass
          void* kp = pool_[2 * l].data();
          void* vp = pool_[2 * l + 1].data();
          if (!b_->RopeQKAppendStep(q, k, v, pos_dev, a_.heads, a_.kv_heads, a_.head_dim, 1e6f, kp, vp)) {
            b_->RopeQK(q, k, pos_dev, T, a_.heads, a_.kv_heads, a_.head_dim, 1e6f);
            b_->AppendKvStep(kp, vp, k, v, kvd, kvd);
          }
          b_->AttentionStep(q, kp, vp, attn);
          Mark("rope + kv append + attention (step ops)");
        } else {
          b_->RopeQK(q, k, pos_dev, T, a_.heads, a_.kv_heads, a_.head_dim, 1e6f);
          Mark("rope q, k");
          AttentionOps(l, n_new, len, T, q, k, v, attn);
        }
        b_->Gemm(attn, T, L.o, nullptr, x, /*accumulate=*/true);  // the residual, as the engine adds it
        Mark("o gemm");
        if (h16)
          b_->RmsNormTwin(x, T, H, L.post_norm, 1e-5f, h, h16);
        else
          b_->RmsNorm(x, T, H, L.post_norm, 1e-5f, h);
        Mark("rms norm");
        float* routing_dev = routing_all + (device_routing ? l * per_layer : 0);
        auto* ids_dev = reinterpret_cast<int32_t*>(routing_dev);
        float* w_dev = routing_dev + T * a_.top_k;
        if (h16) {
          const Weight* ws[] = {&L.router};
          const Weight* bs[] = {nullptr};
          b_->GemmGroup(h, h16, T, 1, ws, bs, &logits);
        } else {
          b_->Gemm(h, T, L.router, nullptr, logits, false);
        }
        b_->RouterTopK(logits, T, a_.experts, a_.top_k, true, ids_dev, w_dev);
        Mark("router gemm + top-k");
        if (device_routing) {
          if (!b_->MoeRouted(h, T, a_.top_k, ids_dev, w_dev, L.table, x)) Die("MoeRouted declined a decode batch");
          Mark("moe: routed experts on the device");
          continue;
        }
        b_->SetZero(out, sizeof(float) * T * H);
        b_->CopyToHost(routing.data(), routing_dev, routing.size() * sizeof(float));
        std::memcpy(ids.data(), routing.data(), ids.size() * sizeof(int32_t));
        std::memcpy(wts.data(), routing.data() + T * a_.top_k, wts.size() * sizeof(float));
        Mark("routing to host (sync)");
        if (profiling_) {
          expert_rows_.assign(a_.experts, 0);
          for (int32_t e : ids) ++expert_rows_[e];
        }
        Status st = moe_->Run(l, T, a_.top_k, h, ids, wts, out);
        if (!st.ok()) Die("moe: " + st.ToString());
        Mark("moe: scatter-add");
        if (l + 1 < a_.layers) {  // the residual add and the next layer's input norm, as the engine runs them
          b_->AddRmsNorm(x, out, T, H, layers_[l + 1].input_norm, 1e-5f, h, h16);
          normed = true;
          Mark("add + rms norm");
        } else {
          b_->Add(x, out, T * H);
          Mark("add");
        }
        distinct.push_back(static_cast<int>(std::set<int32_t>(ids.begin(), ids.end()).size()));
      }
    };
    // --graphs: decode steps on the device recorded and replayed, as Engine::RunGraphed does.
    last_graphed_ = false;
    if (step && a_.graphs && device_routing && !profiling_)
      RunGraphed(T, plan, layers);
    else
      layers();
    if (device_routing) {  // the step's routing, once
      std::vector<float> all(a_.layers * per_layer);
      b_->CopyToHost(all.data(), routing_all, all.size() * sizeof(float));
      for (int l = 0; l < a_.layers; ++l) {
        std::memcpy(ids.data(), all.data() + l * per_layer, ids.size() * sizeof(int32_t));
        distinct.push_back(static_cast<int>(std::set<int32_t>(ids.begin(), ids.end()).size()));
      }
    }
    return distinct;
  }

  // The KV appends and attention of a layer the usual way: each sequence's new rows copied to its
  // cache rows, then one AttentionBatch call for the batch.
  void AttentionOps(int l, const std::vector<int>& n_new, const std::vector<int>& len, int64_t T, const float* q,
                    const float* k, const float* v, float* attn) {
    const int kvd = a_.kv_heads * a_.head_dim;
    int64_t row = 0;
    std::vector<AttentionSeq> attn_seqs;
    std::vector<Backend::CopyItem> appends;
    for (size_t s = 0; s < n_new.size() && a_.kv_block > 0; ++s) {
      const int bs = a_.kv_block;
      const int32_t* table = tables_host_.data() + s * nblk_;
      for (int t = 0; t < n_new[s];) {
        const int p = len[s] + t, piece = std::min(n_new[s] - t, bs - p % bs);
        const int64_t r = static_cast<int64_t>(table[p / bs]) * bs + p % bs;
        appends.push_back({KvAt(pool_[2 * l], r * kvd), k + (row + t) * kvd, sizeof(float) * piece * kvd});
        appends.push_back({KvAt(pool_[2 * l + 1], r * kvd), v + (row + t) * kvd, sizeof(float) * piece * kvd});
        t += piece;
      }
      attn_seqs.push_back(AttentionSeq{pool_[2 * l].data(), pool_[2 * l + 1].data(), row, n_new[s], len[s] + n_new[s],
                                       tables_dev_.i32() + s * nblk_, bs});
      row += n_new[s];
    }
    for (size_t s = 0; s < n_new.size() && a_.kv_block <= 0; ++s) {
      void* kc = KvAt(kv_[s][2 * l], static_cast<int64_t>(len[s]) * kvd);
      void* vc = KvAt(kv_[s][2 * l + 1], static_cast<int64_t>(len[s]) * kvd);
      appends.push_back({kc, k + row * kvd, sizeof(float) * n_new[s] * kvd});
      appends.push_back({vc, v + row * kvd, sizeof(float) * n_new[s] * kvd});
      attn_seqs.push_back(
          AttentionSeq{kv_[s][2 * l].data(), kv_[s][2 * l + 1].data(), row, n_new[s], len[s] + n_new[s]});
      row += n_new[s];
    }
    if (a_.kv_bf16) {
      b_->CopyBatchToBf16(appends.data(), static_cast<int>(appends.size()));
    } else {
      b_->CopyBatch(appends.data(), static_cast<int>(appends.size()));
    }
    b_->AttentionBatch(q, attn_seqs.data(), static_cast<int>(attn_seqs.size()), a_.heads, a_.kv_heads, a_.head_dim,
                       attn);
    Mark("kv append + attention");
  }

  // --profile: an event after each op of Forward (Mark), summed per op kind by Profile.
  void Mark(const char* name) {
    if (!profiling_) return;
    cudaEvent_t e;
    cudaEventCreate(&e);
    cudaEventRecord(e, b_->stream());
    marks_.emplace_back(name, e);
  }
  // Runs one Forward with marks; returns (op, device ms) in first-seen order.
  std::vector<std::pair<std::string, double>> Profile(const std::vector<int>& n_new, const std::vector<int>& len) {
    Synchronize();
    profiling_ = true;
    marks_.clear();
    std::vector<std::tuple<int, int, int64_t, size_t>> experts;  // layer, expert, rows, index of its end mark
    source_->on_expert = [&](bool begin, int layer, int e) {
      Mark(begin ? "moe: gather, host work" : "moe: expert mlps");
      if (!begin) experts.emplace_back(layer, e, expert_rows_[e], marks_.size() - 1);
    };
    Mark("start");
    const auto t0 = std::chrono::steady_clock::now();
    Forward(n_new, len);
    profiling_ = false;
    source_->on_expert = nullptr;
    Synchronize();
    std::printf("# profiled step: %.3f ms wall (host clock, enqueue to sync)\n",
                Seconds(t0, std::chrono::steady_clock::now()) * 1e3);
    std::printf("# per expert (layer 0 and the last): rows, ms, TFLOP/s\n");
    for (const auto& [layer, e, rows, end] : experts) {
      if (layer != 0 && layer != a_.layers - 1) continue;
      float ms = 0;
      cudaEventElapsedTime(&ms, marks_[end - 1].second, marks_[end].second);
      const double flop = 2.0 * 3 * rows * a_.hidden * a_.inter;
      std::printf("#   layer %d expert %d: %6lld rows %8.3f ms %8.1f TFLOP/s\n", layer, e, static_cast<long long>(rows),
                  ms, flop / (ms * 1e-3) / 1e12);
    }
    std::vector<std::pair<std::string, double>> out;
    for (size_t i = 1; i < marks_.size(); ++i) {
      float ms = 0;
      cudaEventElapsedTime(&ms, marks_[i - 1].second, marks_[i].second);
      auto it = std::find_if(out.begin(), out.end(), [&](const auto& p) { return p.first == marks_[i].first; });
      if (it == out.end())
        out.emplace_back(marks_[i].first, ms);
      else
        it->second += ms;
    }
    for (auto& m : marks_) cudaEventDestroy(m.second);
    marks_.clear();
    return out;
  }

  // A decode step from a graph (Engine::RunGraphed): the first step of a shape runs op by op (the
  // buffers reach their sizes), the second is recorded and every later one replayed. A step that
  // cannot be recorded ends the bench: its rows would not time what --graphs says.
  void RunGraphed(int64_t T, uint64_t plan, const std::function<void()>& layers) {
    // Graphs hold the addresses of the buffers they were recorded with: a buffer moved drops them.
    const std::pair<uint64_t, uint64_t> layout = {layout_generation_, b_->layout_generation()};
    if (layout != graph_layout_) {
      b_->DropGraphs();
      graphs_.clear();
      graph_layout_ = layout;
    }
    GraphEntry& g = graphs_[{T, plan}];
    if (g.id < 0 && g.steps++ == 0) {
      layers();
      return;
    }
    if (g.id < 0) {
      if (Status s = b_->BeginGraph(); !s.ok()) Die("--graphs: " + s.ToString());
      layers();
      g.id = OrDie(b_->EndGraph(), "--graphs: a decode step");
      ++graphs_recorded_;
    }
    if (Status s = b_->LaunchGraph(g.id); !s.ok()) Die("--graphs: " + s.ToString());
    ++graphs_replayed_;
    last_graphed_ = true;
  }
  int64_t graphs_recorded() const { return graphs_recorded_; }
  bool last_graphed() const { return last_graphed_; }  // the last Forward replayed a graph
  int64_t graphs_replayed() const { return graphs_replayed_; }

  // Sets the residual stream to random activations of unit scale (as after an embedding), new ones
  // at each call (so the routing varies from step to step).
  void RandomInput(int64_t T) {
    float* x = Scratch(0, T * a_.hidden);
    Check(cuda::launch_fill_random(x, DType::kF32, T * a_.hidden, 777 + inputs_++, 1.0f, b_->stream()));
  }

  void Synchronize() {
    b_->Synchronize();
    if (!b_->status().ok()) Die(b_->status().ToString());
  }

  // Per-op timings (device time per call, cudaEvents on the compute stream) that explain the
  // layer times. The calls are queued behind ~4 ms of GEMMs so that they are all on the stream
  // before the device reaches them (small ops are timed by the device, not by the host's launch
  // rate), and each call runs after a read of 128 MB (a GEMV over a weight kept for it, whatever the
  // layer shape) has evicted the L2 (60 MB on the H200), as in a decode step, where a layer's weights and KV cache
  // were evicted by the other layers' since. (A memset would leave dirty lines whose write-back
  // the timed call would pay.)
  void Breakdown(int context, int max_batch, int prefill, bool sweep, nlohmann::json* out, nlohmann::json* sweep_out) {
    const int H = a_.hidden, kvd = a_.kv_heads * a_.head_dim;
    const int64_t maxT = std::max<int64_t>({prefill, max_batch, 512});  // 512: the queue-filling GEMMs' rows
    float* x = Scratch(12, maxT * std::max(H, a_.inter));
    float* y = Scratch(13, maxT * std::max(H, a_.inter));
    float* y2 = Scratch(14, maxT * a_.inter);
    // The flush weight: [kFlushRows, H] bf16 of at least 128 MB; also the queue-filling GEMMs' weight.
    const int64_t flush_rows = std::max<int64_t>(1, (int64_t{128} << 20) / (2 * int64_t{H}));
    const Weight flush = OrDie(b_->AllocateWeight(DType::kBF16, flush_rows, H), "flush weight");
    Check(
        cuda::launch_fill_random(const_cast<void*>(flush.data), DType::kBF16, flush_rows * H, 99, 0.01f, b_->stream()));
    float* filler_out = Scratch(15, 512 * std::max<int64_t>(a_.inter, flush_rows));
    Check(cuda::launch_fill_random(x, DType::kF32, maxT * std::max(H, a_.inter), 5, 1.0f, b_->stream()));
    const ExpertWeights& ew = layers_[0].experts[0];
    const Layer& L0 = layers_[0];
    constexpr int kMaxReps = 20;
    std::vector<cudaEvent_t> ev(2 * kMaxReps);
    for (cudaEvent_t& e : ev) cudaEventCreate(&e);
    auto time_us = [&](int reps, const std::function<void()>& f) {
      reps = std::min(reps, kMaxReps);
      f();
      for (int i = 0; i < 40; ++i) b_->Gemm(x, 512, flush, nullptr, filler_out, false);
      for (int r = 0; r < reps; ++r) {
        b_->Gemm(x, 1, flush, nullptr, filler_out, false);
        cudaEventRecord(ev[2 * r], b_->stream());
        f();
        cudaEventRecord(ev[2 * r + 1], b_->stream());
      }
      cudaEventSynchronize(ev[2 * reps - 1]);
      double total_ms = 0;
      for (int r = 0; r < reps; ++r) {
        float ms = 0;
        cudaEventElapsedTime(&ms, ev[2 * r], ev[2 * r + 1]);
        total_ms += ms;
      }
      return 1e3 * total_ms / reps;
    };
    std::printf("\n# breakdown (device time per call, cold L2, cudaEvents)\n%-60s %12s %12s\n", "op", "us", "GB/s");
    auto row = [&](const std::string& name, double us, double bytes) {
      std::printf("%-60s %12.1f %12.0f\n", name.c_str(), us, bytes > 0 ? bytes / (us * 1e3) : 0.0);
      out->push_back({{"op", name}, {"us", us}, {"gbps", bytes > 0 ? bytes / (us * 1e3) : 0.0}});
    };
    for (int m : {1, 8, 16, 64, 512}) {
      row("gemm gate " + std::to_string(a_.inter) + "x" + std::to_string(H) + " bf16 m=" + std::to_string(m),
          time_us(20, [&] { b_->Gemm(x, m, ew.gate, nullptr, y, false); }), ew.gate.nbytes());
      row("expert mlp (gate, up, silu, down) m=" + std::to_string(m),
          time_us(10,
                  [&] {
                    b_->Gemm(x, m, ew.gate, nullptr, y, false);
                    b_->Gemm(x, m, ew.up, nullptr, y2, false);
                    b_->SiluMul(y, y2, y, m * a_.inter);
                    b_->Gemm(y, m, ew.down, nullptr, y2, false);
                  }),
          ew.nbytes());
      if (m <= cuda::kGemvMaxRows)
        row("expert mlp (fused gate-up-silu, down) m=" + std::to_string(m),
            time_us(10,
                    [&] {
                      if (!b_->GateUpSilu(x, m, ew.gate, ew.up, y)) Die("fused gate/up refused a decode shape");
                      b_->Gemm(y, m, ew.down, nullptr, y2, false);
                    }),
            ew.nbytes());
    }
    row("attention q,k,v,o gemms m=1",
        time_us(20,
                [&] {
                  b_->Gemm(x, 1, L0.q, nullptr, y, false);
                  b_->Gemm(x, 1, L0.k, nullptr, y, false);
                  b_->Gemm(x, 1, L0.v, nullptr, y, false);
                  b_->Gemm(x, 1, L0.o, nullptr, y, false);
                }),
        attn_bytes_ - L0.router.nbytes());
    row("gemm k " + std::to_string(kvd) + "x" + std::to_string(H) + " bf16 m=1",
        time_us(20, [&] { b_->Gemm(x, 1, L0.k, nullptr, y, false); }), L0.k.nbytes());
    row("router gemm " + std::to_string(a_.experts) + "x" + std::to_string(H) + " + top-k m=1",
        time_us(20,
                [&] {
                  b_->Gemm(x, 1, L0.router, nullptr, y, false);
                  b_->RouterTopK(y, 1, a_.experts, a_.top_k, true, reinterpret_cast<int32_t*>(y2), y2 + a_.top_k);
                }),
        L0.router.nbytes());
    // The small ops of one batch-1 layer besides the GEMMs, attention and copies: 2 RMSNorms, 2 RoPEs,
    // 2 residual adds, the MoE output memset, the expert input gather, 2 SiLU-muls, 2 scatter-adds.
    {
      auto* idx = reinterpret_cast<int32_t*>(Scratch(16, 16));
      float* scale = Scratch(17, 2);
      row("small ops of a batch-1 layer (12 launches)",
          time_us(10,
                  [&] {
                    b_->RmsNorm(x, 1, H, L0.input_norm, 1e-5f, y);
                    b_->Rope(y, idx, 1, a_.heads, a_.head_dim, 1e6f);
                    b_->Rope(y2, idx, 1, a_.kv_heads, a_.head_dim, 1e6f);
                    b_->Add(y, x, H);
                    b_->RmsNorm(x, 1, H, L0.post_norm, 1e-5f, y);
                    b_->SetZero(y2, sizeof(float) * H);
                    b_->GatherRows(x, idx, 2, H, y);
                    b_->SiluMul(y, x, y, a_.inter);
                    b_->SiluMul(y, x, y, a_.inter);
                    b_->ScatterAddRows(x, idx, scale, 1, H, y2);
                    b_->ScatterAddRows(x, idx + 1, scale, 1, H, y2);
                    b_->Add(y, x, H);
                  }),
          0);
      row("  rms norm 1x" + std::to_string(H), time_us(20, [&] { b_->RmsNorm(x, 1, H, L0.input_norm, 1e-5f, y); }), 0);
      row("  rope q 1x32x128", time_us(20, [&] { b_->Rope(y, idx, 1, a_.heads, a_.head_dim, 1e6f); }), 0);
      row("  rope q and k, one launch",
          time_us(20, [&] { b_->RopeQK(y, y2, idx, 1, a_.heads, a_.kv_heads, a_.head_dim, 1e6f); }), 0);
      row("  add " + std::to_string(H), time_us(20, [&] { b_->Add(y, x, H); }), 0);
      row("  silu-mul " + std::to_string(a_.inter), time_us(20, [&] { b_->SiluMul(y, x, y, a_.inter); }), 0);
      row("  scatter-add 1x" + std::to_string(H), time_us(20, [&] { b_->ScatterAddRows(x, idx, scale, 1, H, y2); }), 0);
      row("  set-zero 16 KB", time_us(20, [&] { b_->SetZero(y2, sizeof(float) * H); }), 0);
      row("  add 1 float (launch cost)", time_us(20, [&] { b_->Add(y, x, 1); }), 0);
      std::vector<int32_t> host_idx(16, 0);
      row("CopyToDevice 64 B", time_us(20, [&] { b_->CopyToDevice(idx, host_idx.data(), 64); }), 0);
      void* pinned_src = nullptr;
      if (cudaMallocHost(&pinned_src, 64) == cudaSuccess) {
        row("  vs cudaMemcpyAsync 64 B from pinned (copy engine)",
            time_us(20, [&] { cudaMemcpyAsync(idx, pinned_src, 64, cudaMemcpyHostToDevice, b_->stream()); }), 0);
      }
      row("CopyOnDevice 4 KB (kv append of one sequence, k or v)",
          time_us(20, [&] { b_->CopyOnDevice(y, x, sizeof(float) * kvd); }), 0);
      row("  vs cudaMemcpyAsync 4 KB device to device (copy engine)",
          time_us(20, [&] { cudaMemcpyAsync(y, x, sizeof(float) * kvd, cudaMemcpyDeviceToDevice, b_->stream()); }), 0);
      {
        std::vector<Backend::CopyItem> items;
        for (int i = 0; i < 128; ++i) items.push_back({y + i * kvd, x + i * kvd, sizeof(float) * kvd});
        row("CopyBatch of 128 x 4 KB (kv appends of 64 sequences, one launch)",
            time_us(5, [&] { b_->CopyBatch(items.data(), 128); }), 128.0 * sizeof(float) * kvd);
      }
      row("128 x CopyOnDevice 4 KB (kv appends of 64 sequences)",
          time_us(5,
                  [&] {
                    for (int i = 0; i < 128; ++i) b_->CopyOnDevice(y + i * kvd, x + i * kvd, sizeof(float) * kvd);
                  }),
          0);
      row("  vs 128 x cudaMemcpyAsync 4 KB device to device",
          time_us(5,
                  [&] {
                    for (int i = 0; i < 128; ++i)
                      cudaMemcpyAsync(y + i * kvd, x + i * kvd, sizeof(float) * kvd, cudaMemcpyDeviceToDevice,
                                      b_->stream());
                  }),
          0);
      if (pinned_src) cudaFreeHost(pinned_src);
    }
    // The routing round trip (host time, idle device): the engine's CopyToHost of ids and weights
    // into pageable memory against the same bytes into pinned memory.
    {
      auto host_us = [&](const std::function<void()>& f) {
        for (int i = 0; i < 10; ++i) f();
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < 100; ++i) f();
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e4;
      };
      std::vector<float> pageable(4);
      row("CopyToHost 16 B + sync (pageable host memory, host time)",
          host_us([&] { b_->CopyToHost(pageable.data(), y, sizeof(float) * 4); }), 0);
      void* pinned = nullptr;
      if (cudaMallocHost(&pinned, 64) == cudaSuccess) {
        row("cudaMemcpyAsync 16 B to pinned + sync (host time)", host_us([&] {
              cudaMemcpyAsync(pinned, y, sizeof(float) * 4, cudaMemcpyDeviceToHost, b_->stream());
              cudaStreamSynchronize(b_->stream());
            }),
            0);
        cudaFreeHost(pinned);
      }
    }
    // As the engine does it: append each sequence's new k/v, then one batched attention call.
    std::vector<int> batches = {1};
    if (max_batch >= 16) batches.push_back(16);
    if (max_batch > 16) batches.push_back(max_batch);
    for (int B : batches) {
      std::vector<AttentionSeq> seqs;
      for (int s = 0; s < B; ++s) seqs.push_back(AttentionSeq{kv_[s][0].data(), kv_[s][1].data(), s, 1, context + 1});
      std::vector<Backend::CopyItem> appends;
      for (int s = 0; s < B; ++s) {
        appends.push_back({KvAt(kv_[s][0], static_cast<int64_t>(context) * kvd), x, sizeof(float) * kvd});
        appends.push_back({KvAt(kv_[s][1], static_cast<int64_t>(context) * kvd), x, sizeof(float) * kvd});
      }
      const double kv_bytes = 2.0 * B * (context + 1) * kvd * KvElem();
      row("attention decode ctx " + std::to_string(context) + " x " + std::to_string(B) +
              " seqs (kv append + AttentionBatch)",
          time_us(5,
                  [&] {
                    if (a_.kv_bf16) {
                      b_->CopyBatchToBf16(appends.data(), static_cast<int>(appends.size()));
                    } else {
                      b_->CopyBatch(appends.data(), static_cast<int>(appends.size()));
                    }
                    b_->AttentionBatch(x, seqs.data(), B, a_.heads, a_.kv_heads, a_.head_dim, y);
                  }),
          kv_bytes);
      row("  of which AttentionBatch x " + std::to_string(B) + " seqs",
          time_us(5, [&] { b_->AttentionBatch(x, seqs.data(), B, a_.heads, a_.kv_heads, a_.head_dim, y); }), kv_bytes);
    }
    // Attention (one sequence) reads fp32 K/V: rows over the fp32 cache only.
    if (!a_.kv_bf16) {
      b_->SetReducedPrecisionAttention(false);
      row("attention prefill " + std::to_string(prefill),
          time_us(2,
                  [&] {
                    b_->Attention(x, prefill, kv_[0][0].f32(), kv_[0][1].f32(), prefill, a_.heads, a_.kv_heads,
                                  a_.head_dim, y);
                  }),
          0);
      // The same call on tensor cores (bf16 operands).
      b_->SetReducedPrecisionAttention(true);
      row("attention prefill " + std::to_string(prefill) + " (tensor cores, bf16)",
          time_us(5,
                  [&] {
                    b_->Attention(x, prefill, kv_[0][0].f32(), kv_[0][1].f32(), prefill, a_.heads, a_.kv_heads,
                                  a_.head_dim, y);
                  }),
          0);
      b_->SetReducedPrecisionAttention(!a_.fp32_attention);
    }
    row("SetZero " + std::to_string(prefill) + "x" + std::to_string(H) + " f32",
        time_us(2, [&] { b_->SetZero(y, sizeof(float) * prefill * H); }), sizeof(float) * prefill * H);

    // Host time to enqueue a prefill-sized GEMM (the device is kept busy ahead of it): the same m
    // each call, against a different m each call (as the rows per expert of prefill batches are).
    for (bool vary : {false, true}) {
      b_->Synchronize();
      for (int i = 0; i < 60; ++i) b_->Gemm(x, 512, ew.gate, nullptr, filler_out, false);
      const int calls = 16;
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < calls; ++i) b_->Gemm(x, vary ? 300 + 7 * i + (rand() % 5) : 300, ew.gate, nullptr, y, false);
      const double host_us = Seconds(t0, std::chrono::steady_clock::now()) * 1e6 / calls;
      b_->Synchronize();
      row(std::string("host enqueue of gemm gate m~300, ") + (vary ? "a new m each call" : "the same m"), host_us, 0);
    }

    if (sweep) {
      // The GEMV at every K split (device time), for the decode shapes of a layer.
      struct Shape {
        const char* name;
        const Weight* w;
      };
      const Shape shapes[] = {{"q", &L0.q},           {"k", &L0.k},       {"o", &L0.o},
                              {"router", &L0.router}, {"gate", &ew.gate}, {"down", &ew.down}};
      std::printf(
          "\n# gemv sweep (device time per call; * = the split the backend picks)\n%-10s %14s %3s %6s %10s %10s\n",
          "weight", "n x k", "m", "split", "us", "GB/s");
      for (const Shape& sh : shapes) {
        const int picked = cuda::gemv_warps_per_row(sh.w->rows, sh.w->cols, num_sms_);
        for (int m = 1; m <= cuda::kGemvMaxRows; ++m) {
          for (int split = 1; split <= cuda::kGemvMaxWarpsPerRow; split *= 2) {
            const double us = time_us(20, [&] {
              Check(cuda::launch_gemv(x, m, sh.w->data, sh.w->dtype, sh.w->rows, sh.w->cols, y, false, split,
                                      b_->stream()));
            });
            const double gbps = sh.w->nbytes() / (us * 1e3);
            const std::string dims = std::to_string(sh.w->rows) + "x" + std::to_string(sh.w->cols);
            std::printf("%-10s %14s %3d %5d%s %10.1f %10.0f\n", sh.name, dims.c_str(), m, split,
                        split == picked ? "*" : " ", us, gbps);
            sweep_out->push_back({{"weight", sh.name},
                                  {"n", sh.w->rows},
                                  {"k", sh.w->cols},
                                  {"m", m},
                                  {"warps_per_row", split},
                                  {"picked", split == picked},
                                  {"us", us},
                                  {"gbps", gbps}});
          }
        }
      }
    }
    for (cudaEvent_t e : ev) cudaEventDestroy(e);
    Synchronize();
  }

  CudaBackend* backend() { return b_; }
  size_t attn_bytes() const { return attn_bytes_; }
  size_t expert_bytes() const { return expert_bytes_; }

 private:
  void Check(cudaError_t e) {
    if (e != cudaSuccess) Die(std::string("kernel launch: ") + cudaGetErrorString(e));
  }
  float* Scratch(int slot, int64_t floats) {
    if (scratch_.size() <= static_cast<size_t>(slot)) scratch_.resize(slot + 1);
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(floats, 1)) * sizeof(float);
    if (scratch_[slot].bytes() < bytes) {
      scratch_[slot] = OrDie(b_->Allocate(bytes), "scratch");
      ++layout_generation_;  // recorded graphs read the old address
    }
    return scratch_[slot].f32();
  }

  Args a_;
  std::unique_ptr<CudaBackend> backend_;
  CudaBackend* b_ = nullptr;
  std::vector<Layer> layers_;
  std::vector<Buffer> tables_;  // the layers' expert pointer tables
  std::unique_ptr<SyntheticExperts> source_;
  std::vector<int64_t> expert_rows_;
  bool profiling_ = false;
  std::vector<std::pair<std::string, cudaEvent_t>> marks_;
  std::unique_ptr<LocalMoeExecutor> moe_;
  std::vector<std::vector<Buffer>> kv_;
  int kv_cap_ = 0;
  struct GraphEntry {
    int id = -1;
    int steps = 0;
  };
  std::map<std::pair<int64_t, uint64_t>, GraphEntry> graphs_;  // (rows, step plan): --graphs
  int64_t graphs_recorded_ = 0, graphs_replayed_ = 0;
  bool last_graphed_ = false;
  uint64_t inputs_ = 0;             // RandomInput's calls (its seeds)
  uint64_t layout_generation_ = 0;  // bumped when this bench's scratch or KV pools move
  std::pair<uint64_t, uint64_t> graph_layout_ = {~0ull, ~0ull};
  std::vector<Buffer> pool_;  // --kv-block-size: per layer keys, values
  std::vector<int32_t> tables_host_;
  Buffer tables_dev_;
  int nblk_ = 0;  // blocks per sequence
  int num_sms_ = 0;
  std::vector<Buffer> scratch_;
  size_t attn_bytes_ = 0, expert_bytes_ = 0;

 public:
  ~Bench() {
    // Buffers free through the backend: release them before it goes.
    kv_.clear();
    pool_.clear();
    tables_dev_ = Buffer();
    scratch_.clear();
    tables_.clear();
    moe_.reset();
  }
};

int Main(int argc, char** argv) {
  Args a = ParseArgs(argc, argv);
  perf::DeviceInfo info;
  if (!perf::QueryDeviceInfo(&info)) Die("no CUDA device");
  const cudaDeviceProp& prop = info.prop;
  const char* cuda_v = info.cuda_runtime.c_str();
  const char* drv_v = info.driver.c_str();
  const char* cublas_v = info.cublas.c_str();

  std::printf(
      "# ef_decode_bench: synthetic %s layers (hidden %d, %d experts x ffn %d, top-%d, %d heads / "
      "%d kv heads x %d), bf16 weights made on the GPU, fp32 activations\n",
      a.shape.c_str(), a.hidden, a.experts, a.inter, a.top_k, a.heads, a.kv_heads, a.head_dim);
  std::printf("# git %s, build %s, device %s (%d SMs, %.0f GiB), CUDA runtime %s, driver %s, cuBLAS %s\n", EF_GIT_SHA,
              EF_BUILD_TYPE, prop.name, prop.multiProcessorCount, prop.totalGlobalMem / double(1 << 30), cuda_v, drv_v,
              cublas_v);
  std::printf(
      "# layers %d, decode context %d tokens per sequence, %d timed steps, prefill %d tokens, bound = active "
      "weight bytes / %.2f TB/s\n",
      a.layers, a.context, a.iters, a.prefill, a.hbm_tbps);
  if (!a.hbm_given && std::strstr(prop.name, "H200") == nullptr)
    std::printf(
        "# note: %.2f TB/s is what an H200 streams, not this %s: the ratio column is not against its own "
        "memory (--hbm-tbps)\n",
        a.hbm_tbps, prop.name);
  std::printf("# attention: %s; 16-bit GEMMs past the GEMV: %s\n",
              a.fp32_attention ? "fp32 kernels" : "tensor cores, bf16 operands (prefill; decode over a bf16 cache)",
              a.lt_gemm ? "cuBLASLt, planned" : "cublasGemmEx");
  std::printf("# programmatic dependent launch: %s; kv cache: %s\n", a.pdl ? "on" : "off",
              (std::string(a.kv_bf16 ? "bf16" : "fp32") +
               (a.kv_block > 0 ? ", paged in blocks of " + std::to_string(a.kv_block) + " tokens" : ""))
                  .c_str());
  std::printf("# experts past the GEMV's rows: %s\n",
              a.expert_streams > 0 ? ("ExpertMlps on " + std::to_string(a.expert_streams) + " streams").c_str()
                                   : "one expert at a time, fp32 products");
  std::printf("# decode routing: %s; q, k, v: %s; bf16 twins: %s\n",
              a.host_routing ? "to the host at every MoE layer"
                             : "on the device up to the rows MoeRouted serves (to the host past them)",
              a.separate_qkv ? "three Gemm calls" : "one GemmGroup", a.twins ? "on" : "off");
  std::printf("# decode steps: %s\n",
              a.graphs ? "the engine's step ops, recorded once per batch as a CUDA graph and replayed"
              : a.step ? "the engine's step ops (sequences uploaded once), op by op"
                       : "op by op, KV appends by copy, AttentionBatch");
  if (std::string(EF_BUILD_TYPE) == "Debug") std::printf("# WARNING: debug build, timings are not representative\n");

  Bench bench(a);
  bench.BuildLayers();
  std::printf("# weights: attention+router %.1f MB per layer, one expert %.1f MB, %.2f GiB on the device in all\n",
              bench.attn_bytes() / 1e6, bench.expert_bytes() / 1e6, bench.backend()->bytes_in_use() / double(1 << 30));

  nlohmann::json records = nlohmann::json::array();
  std::printf("\n%-8s %6s %8s %12s %12s %12s %10s %12s %10s\n", "phase", "batch", "tokens", "step_ms", "layer_us",
              "bound_us", "ratio", "act_experts", "tok/s");
  const int max_batch = a.batches.empty() ? 0 : *std::max_element(a.batches.begin(), a.batches.end());
  bench.MakeSequences(std::max(max_batch, 1), std::max(a.context + 1, a.prefill));
  for (int B : a.batches) {
    std::vector<int> n_new(B, 1), len(B, a.context);
    bench.RandomInput(B);
    WarmUp([&] { bench.Forward(n_new, len); }, [&] { bench.Synchronize(); });
    double experts_sum = 0;
    auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < a.iters; ++it) {
      bench.RandomInput(B);  // fresh activations each step so routing varies as in real decoding
      for (int d : bench.Forward(n_new, len)) experts_sum += d;
    }
    bench.Synchronize();
    const double step = Seconds(t0, std::chrono::steady_clock::now()) / a.iters;
    const double layer = step / a.layers;
    const double act = experts_sum / (a.iters * a.layers);
    const double bound = (bench.attn_bytes() + act * bench.expert_bytes()) / (a.hbm_tbps * 1e12);
    std::printf("%-8s %6d %8d %12.3f %12.1f %12.1f %10.2f %12.2f %10.0f\n", "decode", B, B, step * 1e3, layer * 1e6,
                bound * 1e6, layer / bound, act, B / step);
    records.push_back({{"phase", "decode"},
                       {"batch", B},
                       {"context", a.context},
                       {"layers", a.layers},
                       {"step_ms", step * 1e3},
                       {"layer_us", layer * 1e6},
                       {"bound_us", bound * 1e6},
                       {"ratio_to_bound", layer / bound},
                       {"active_experts_per_layer", act},
                       {"tokens_per_s", B / step},
                       {"graphed", bench.last_graphed()}});
    if (a.graphs && !bench.last_graphed())
      std::printf("# decode batch %d ran op by op: its routing goes to the host (%s)\n", B,
                  a.host_routing ? "--host-routing" : "more rows than MoeRouted serves");
  }
  if (a.prefill > 0) {  // --prefill 0: decode only
    std::vector<int> n_new(1, a.prefill), len(1, 0);
    bench.RandomInput(a.prefill);
    WarmUp([&] { bench.Forward(n_new, len); }, [&] { bench.Synchronize(); });
    // The median of synchronised steps (a prefill step waits for the host at every layer anyway).
    const int reps = a.prefill_iters;
    double experts_sum = 0;
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      for (int d : bench.Forward(n_new, len)) experts_sum += d;
      bench.Synchronize();
      times.push_back(Seconds(t0, std::chrono::steady_clock::now()));
    }
    std::sort(times.begin(), times.end());
    const double step = times[times.size() / 2];
    std::printf("# prefill steps: min %.3f, median %.3f, max %.3f ms\n", times.front() * 1e3, step * 1e3,
                times.back() * 1e3);
    const double layer = step / a.layers;
    const double act = experts_sum / (reps * a.layers);
    const double bound = (bench.attn_bytes() + act * bench.expert_bytes()) / (a.hbm_tbps * 1e12);
    std::printf("%-8s %6d %8d %12.3f %12.1f %12.1f %10.2f %12.2f %10.0f\n", "prefill", 1, a.prefill, step * 1e3,
                layer * 1e6, bound * 1e6, layer / bound, act, a.prefill / step);
    std::printf("# prefill: %.0f tokens/s through %d layers (%.0f tokens/s projected for 32 layers)\n",
                a.prefill / step, a.layers, a.prefill / (layer * 32));
    records.push_back({{"phase", "prefill"},
                       {"batch", 1},
                       {"tokens", a.prefill},
                       {"layers", a.layers},
                       {"step_ms", step * 1e3},
                       {"layer_us", layer * 1e6},
                       {"bound_us", bound * 1e6},
                       {"ratio_to_bound", layer / bound},
                       {"active_experts_per_layer", act},
                       {"tokens_per_s", a.prefill / step},
                       {"tokens_per_s_32_layers", a.prefill / (layer * 32)}});
    if (a.profile) {
      std::printf(
          "\n# prefill %d tokens, device time per op kind over %d layers (event after each op)\n%-40s %10s %8s\n",
          a.prefill, a.layers, "op", "ms/layer", "share");
      const auto prof = bench.Profile(n_new, len);
      double total = 0;
      for (const auto& p : prof) total += p.second;
      nlohmann::json pj = nlohmann::json::array();
      for (const auto& p : prof) {
        std::printf("%-40s %10.3f %7.1f%%\n", p.first.c_str(), p.second / a.layers, 100 * p.second / total);
        pj.push_back({{"op", p.first}, {"ms_per_layer", p.second / a.layers}});
      }
      std::printf("%-40s %10.3f\n", "total", total / a.layers);
      records.back()["profile"] = pj;
    }
  }
  nlohmann::json breakdown = nlohmann::json::array(), sweep = nlohmann::json::array();
  if (a.breakdown) bench.Breakdown(a.context, max_batch, a.prefill, a.sweep, &breakdown, &sweep);
  std::printf("# bytes in use at the end: %.2f GiB\n", bench.backend()->bytes_in_use() / double(1 << 30));
  if (!a.json.empty()) {
    nlohmann::json doc = perf::DeviceJson("ef_decode_bench", info);
    doc.update(
        {{"hbm_tbps", a.hbm_tbps},
         {"host_routing", a.host_routing},
         {"separate_qkv", a.separate_qkv},
         {"bf16_twins", a.twins},
         {"pdl", a.pdl},
         {"kv_bf16", a.kv_bf16},
         {"kv_block_size", a.kv_block},
         {"step_ops", a.step},
         {"graphs", {{"on", a.graphs}, {"recorded", bench.graphs_recorded()}, {"replayed", bench.graphs_replayed()}}},
         {"shape",
          {{"name", a.shape},
           {"hidden", a.hidden},
           {"experts", a.experts},
           {"ffn", a.inter},
           {"top_k", a.top_k},
           {"heads", a.heads},
           {"kv_heads", a.kv_heads},
           {"head_dim", a.head_dim},
           {"qk_norm", a.qk_norm}}},
         {"records", records},
         {"breakdown", breakdown}});
    if (a.sweep) doc["gemv_sweep"] = sweep;
    std::ofstream(a.json) << doc.dump(2) << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace ef::runtime

int main(int argc, char** argv) { return ef::runtime::Main(argc, argv); }
