// ef_offload_bench: decode of a Mixtral-8x7B-shaped model whose experts do not all fit in GPU
// memory, with the expert cache on the CUDA device (CudaExpertSource: ExpertStore policies over
// device slots, a pinned host tier, copy streams and per-slot events), driven by the real Mixtral
// routing trace.
//
// Model: hidden 4096, 8 experts x FFN 14336, top-2, 32 heads / 8 kv heads x 128, bf16 weights made
// on the GPU (synthetic); attention and router weights resident; every expert (352 MB) in pinned
// host memory. 32 layers when the host can pin 32 x 8 experts (90 GB) with 16 GiB to spare, else
// 16 (said in the header). Each decode step (batch 1, fixed context) runs the engine's layer order
// through the Backend ops (as ef_decode_bench does): RMSNorm, q/k/v GEMMs, RoPE, KV append,
// attention, o GEMM, residual, RMSNorm, router GEMM + top-k copied to the host, then the routing
// of the trace's token replaces the router's (ids and weights), and LocalMoeExecutor::Run computes
// the experts through the cache.
//
// Modes, at budgets of 25/50/75/100% of the experts (2/4/6/8 slots per layer):
//   lru      on demand: LRU per layer, a miss loads when its layer's routing is known (hits
//            compute first while misses load) - what Mixtral-offloading does;
//   oracle   expertflow policy + prefetch of the next layer's experts, both from the trace's
//            true future routing (an oracle, not a predictor): at layer l the experts of layer l+1
//            are prefetched; the policy's forecast is the current and the next token's routing.
// Timed: `steps` tokens after `warmup` tokens (cache warm). Reported per token: wall time, the
// compute stream's time blocked on copies (cudaEvents around each wait), hits/misses of the store,
// bytes copied host->device, and the PCIe bound = misses x expert bytes / 55 GB/s (6.35 ms per
// expert, ACCELERATOR.md).
//
//   ef_offload_bench [--layers 0 (auto) | 16 | 32] [--steps 48] [--warmup 16] [--budgets 25,50,75,100]
//                    [--modes lru,oracle] [--prefetch-layers 1] [--context 256] [--trace FILE]
//                    [--pcie-gbps 55] [--json FILE]
#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cache/cuda/cuda_expert_source.h"
#include "placement/routing_forecast.h"
#include "placement/routing_trace.h"
#include "runtime/backend/cuda/cuda_backend.h"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/core/build_info.h"
#include "runtime/engine/moe_executor.h"
#include "tests/perf/device_info.h"

namespace ef::cache {
namespace {

using runtime::Buffer;
using runtime::CudaBackend;
using runtime::Weight;

struct Args {
  int layers = 0;
  int steps = 48;
  int warmup = 16;
  std::vector<int> budgets = {25, 50, 75, 100};
  std::vector<std::string> modes = {"lru", "oracle"};
  int prefetch_layers = 1;
  int context = 256;
  std::string trace = std::string(EF_SHARED_DIR) + "/traces/mixtral8x7b_gsm8k_decode.jsonl";
  double pcie_gbps = 55;
  std::string json;
  int hidden = 4096, inter = 14336, experts = 8, top_k = 2, heads = 32, kv_heads = 8, head_dim = 128;
};

[[noreturn]] void Die(const std::string& msg) {
  std::fprintf(stderr, "ef_offload_bench: %s\n", msg.c_str());
  std::exit(1);
}

template <typename T>
T OrDie(StatusOr<T> s, const char* what) {
  if (!s.ok()) Die(std::string(what) + ": " + s.status().ToString());
  return std::move(s).value();
}

void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) Die(std::string(what) + ": " + cudaGetErrorString(e));
}

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string t; std::getline(ss, t, ',');) out.push_back(t);
  return out;
}

Args ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) Die("missing value after " + k);
      return argv[++i];
    };
    if (k == "--layers") {
      a.layers = std::stoi(next());
    } else if (k == "--steps") {
      a.steps = std::stoi(next());
    } else if (k == "--warmup") {
      a.warmup = std::stoi(next());
    } else if (k == "--budgets") {
      a.budgets.clear();
      for (auto& t : Split(next())) a.budgets.push_back(std::stoi(t));
    } else if (k == "--modes") {
      a.modes = Split(next());
    } else if (k == "--prefetch-layers") {
      a.prefetch_layers = std::stoi(next());
    } else if (k == "--context") {
      a.context = std::stoi(next());
    } else if (k == "--trace") {
      a.trace = next();
    } else if (k == "--pcie-gbps") {
      a.pcie_gbps = std::stod(next());
    } else if (k == "--json") {
      a.json = next();
    } else if (k == "-h" || k == "--help") {
      std::printf(
          "ef_offload_bench [--layers 0|16|32] [--steps N] [--warmup N] [--budgets 25,50,75,100] "
          "[--modes lru,oracle] [--prefetch-layers N] [--context N] [--trace FILE] [--pcie-gbps X] [--json FILE]\n");
      std::exit(0);
    } else {
      Die("unknown argument " + k);
    }
  }
  for (auto& m : a.modes)
    if (m != "lru" && m != "oracle") Die("unknown mode " + m + " (lru, oracle)");
  return a;
}

double MemAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  double kb = 0;
  while (in >> key) {
    if (key == "MemAvailable:") {
      in >> kb;
      return kb * 1024;
    }
    in.ignore(1 << 10, '\n');
  }
  return 0;
}

struct AttnLayer {
  Weight input_norm, post_norm, q, k, v, o, router;
};

ExpertCounters Minus(const ExpertCounters& a, const ExpertCounters& b) {
  ExpertCounters c = a;
  c.hits -= b.hits;
  c.misses -= b.misses;
  c.prefetch_issued -= b.prefetch_issued;
  c.prefetch_used -= b.prefetch_used;
  c.prefetch_wasted -= b.prefetch_wasted;
  c.bytes_from_host -= b.bytes_from_host;
  c.stall_ns -= b.stall_ns;
  return c;
}

class Bench {
 public:
  Bench(const Args& a, const placement::RoutingTrace& trace) : a_(a), trace_(trace) {
    backend_ = OrDie(CudaBackend::Create(runtime::CudaBackendOptions{}), "cuda backend");
    b_ = backend_.get();
  }
  ~Bench() {
    kv_.clear();
    scratch_.clear();
  }

  void Build() {
    uint64_t seed = 1;
    auto rand_weight = [&](int64_t rows, int64_t cols, float scale) {
      Weight w = OrDie(b_->AllocateWeight(DType::kBF16, rows, cols), "weight");
      Check(runtime::cuda::launch_fill_random(const_cast<void*>(w.data), DType::kBF16, rows * cols, seed++, scale,
                                              b_->stream()),
            "fill");
      return w;
    };
    std::vector<float> ones(a_.hidden, 1.0f);
    const float sh = 1.7f / std::sqrt(static_cast<float>(a_.hidden));
    const float si = 1.7f / std::sqrt(static_cast<float>(a_.inter));
    const int qd = a_.heads * a_.head_dim, kvd = a_.kv_heads * a_.head_dim;
    for (int l = 0; l < a_.layers; ++l) {
      AttnLayer L;
      L.input_norm = OrDie(b_->UploadWeight(DType::kF32, ones.data(), 1, a_.hidden), "norm");
      L.post_norm = OrDie(b_->UploadWeight(DType::kF32, ones.data(), 1, a_.hidden), "norm");
      L.q = rand_weight(qd, a_.hidden, sh);
      L.k = rand_weight(kvd, a_.hidden, sh);
      L.v = rand_weight(kvd, a_.hidden, sh);
      L.o = rand_weight(a_.hidden, qd, 1.7f / std::sqrt(static_cast<float>(qd)));
      L.router = rand_weight(a_.experts, a_.hidden, 4 * sh);
      layers_.push_back(L);
    }
    // Experts: generated on the device one at a time, copied into the pinned host tier.
    layout_.num_layers = a_.layers;
    layout_.num_experts = a_.experts;
    layout_.top_k = a_.top_k;
    layout_.moe_layer.assign(a_.layers, true);
    layout_.gate = Weight{DType::kBF16, nullptr, a_.inter, a_.hidden};
    layout_.up = Weight{DType::kBF16, nullptr, a_.inter, a_.hidden};
    layout_.down = Weight{DType::kBF16, nullptr, a_.hidden, a_.inter};
    auto t0 = std::chrono::steady_clock::now();
    tier_ = OrDie(PinnedHostTier::Create(a_.layers, a_.experts, layout_.bytes(), layout_.moe_layer), "pinned tier");
    const double t_pin = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    {
      Buffer tmp = OrDie(b_->Allocate(layout_.bytes()), "expert scratch");
      auto* base = static_cast<std::byte*>(tmp.data());
      for (int l = 0; l < a_.layers; ++l)
        for (int e = 0; e < a_.experts; ++e) {
          const int64_t n = int64_t{a_.inter} * a_.hidden;
          Check(runtime::cuda::launch_fill_random(base + layout_.gate_offset(), DType::kBF16, n, seed++, sh,
                                                  b_->stream()),
                "fill");
          Check(
              runtime::cuda::launch_fill_random(base + layout_.up_offset(), DType::kBF16, n, seed++, sh, b_->stream()),
              "fill");
          Check(runtime::cuda::launch_fill_random(base + layout_.down_offset(), DType::kBF16, n, seed++, si,
                                                  b_->stream()),
                "fill");
          Check(cudaMemcpyAsync(tier_->data(l, e), base, layout_.bytes(), cudaMemcpyDeviceToHost, b_->stream()), "d2h");
        }
      b_->Synchronize();
    }
    std::printf("# host tier: %.1f GB pinned in %.1f s; attention+router %.1f MB per layer resident\n",
                tier_->total_bytes() / 1e9, t_pin,
                (layers_[0].q.nbytes() + layers_[0].k.nbytes() + layers_[0].v.nbytes() + layers_[0].o.nbytes() +
                 layers_[0].router.nbytes()) /
                    1e6);
    const size_t kv_bytes = static_cast<size_t>(a_.context + 1) * kvd * sizeof(float);
    for (int l = 0; l < 2 * a_.layers; ++l) kv_.push_back(OrDie(b_->Allocate(kv_bytes), "kv"));
    Sync();
  }

  struct Result {
    ExpertCounters c;
    CudaCopyStats copies;
    double seconds = 0;
  };

  Result Run(int slots, const std::string& mode) {
    CudaExpertSourceOptions o;
    o.slots_per_layer = slots;
    o.policy = mode == "oracle" ? "expertflow" : "lru";
    o.prefetch_layers = mode == "oracle" ? a_.prefetch_layers : 0;
    auto src = OrDie(CudaExpertSource::Create(layout_, tier_, b_, o), "expert cache");
    runtime::LocalMoeExecutor moe(b_, a_.hidden, a_.experts);
    moe.set_expert_source(src.get());
    const bool oracle = mode == "oracle";
    const int total = a_.warmup + a_.steps;
    if (oracle)
      for (int l = 0; l < a_.layers; ++l) src->SetUpcoming(l, Experts(0, l));
    Result r;
    ExpertCounters c0;
    CudaCopyStats s0;
    std::chrono::steady_clock::time_point t0;
    for (int i = 0; i < total; ++i) {
      if (i == a_.warmup) {
        Sync();
        src->arena().HarvestStall();
        c0 = src->stats().total;
        s0 = src->arena().copy_stats();
        t0 = std::chrono::steady_clock::now();
      }
      if (oracle) src->store().SetForecast(Forecast(i));
      Step(i, moe, oracle ? src.get() : nullptr);
    }
    Sync();
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    src->arena().HarvestStall();
    r.c = Minus(src->stats().total, c0);
    r.copies = src->arena().copy_stats();
    r.copies.urgent_loads -= s0.urgent_loads;
    r.copies.prefetch_loads -= s0.prefetch_loads;
    r.copies.bytes_h2d -= s0.bytes_h2d;
    r.copies.stalled_waits -= s0.stalled_waits;
    r.copies.stall_ms -= s0.stall_ms;
    return r;
  }

  size_t expert_bytes() const { return layout_.bytes(); }
  CudaBackend* backend() { return b_; }

 private:
  std::vector<int32_t> Experts(int token, int layer) const {
    std::vector<int32_t> v;
    const size_t t = static_cast<size_t>(token) % trace_.tokens.size();
    for (int j = 0; j < a_.top_k; ++j) v.push_back(trace_.expert(t, layer, j));
    return v;
  }

  // Oracle forecast: the running token's and the next token's true routing.
  placement::RoutingForecast Forecast(int token) const {
    placement::RoutingForecast f(2, a_.layers, a_.experts);
    for (int t = 0; t < 2; ++t)
      for (int l = 0; l < a_.layers; ++l)
        for (int32_t e : Experts(token + t, l)) f.row(t, l)[e] = 1.f;
    return f;
  }

  void Step(int token, runtime::LocalMoeExecutor& moe, CudaExpertSource* oracle) {
    const int H = a_.hidden, qd = a_.heads * a_.head_dim, kvd = a_.kv_heads * a_.head_dim, T = 1;
    float* x = Scratch(0, H);
    float* h = Scratch(1, H);
    float* q = Scratch(2, qd);
    float* k = Scratch(3, kvd);
    float* v = Scratch(4, kvd);
    float* attn = Scratch(5, qd);
    float* tmp = Scratch(6, H);
    float* out = Scratch(7, H);
    float* logits = Scratch(8, a_.experts);
    auto* ids_dev = reinterpret_cast<int32_t*>(Scratch(9, a_.top_k));
    float* w_dev = Scratch(10, a_.top_k);
    auto* pos_dev = reinterpret_cast<int32_t*>(Scratch(11, 1));
    const int32_t pos = a_.context;
    b_->CopyToDevice(pos_dev, &pos, sizeof pos);
    Check(runtime::cuda::launch_fill_random(x, DType::kF32, H, 1000 + token, 1.0f, b_->stream()), "input");
    std::vector<int32_t> ids(a_.top_k);
    std::vector<float> wts(a_.top_k);
    std::vector<float> zeros(H, 0.f);
    const size_t t = static_cast<size_t>(token) % trace_.tokens.size();
    for (int l = 0; l < a_.layers; ++l) {
      const AttnLayer& L = layers_[l];
      b_->RmsNorm(x, T, H, L.input_norm, 1e-5f, h);
      b_->Gemm(h, T, L.q, nullptr, q, false);
      b_->Gemm(h, T, L.k, nullptr, k, false);
      b_->Gemm(h, T, L.v, nullptr, v, false);
      b_->Rope(q, pos_dev, T, a_.heads, a_.head_dim, 1e6f);
      b_->Rope(k, pos_dev, T, a_.kv_heads, a_.head_dim, 1e6f);
      b_->CopyOnDevice(kv_[2 * l].f32() + static_cast<size_t>(a_.context) * kvd, k, sizeof(float) * kvd);
      b_->CopyOnDevice(kv_[2 * l + 1].f32() + static_cast<size_t>(a_.context) * kvd, v, sizeof(float) * kvd);
      b_->Attention(q, 1, kv_[2 * l].f32(), kv_[2 * l + 1].f32(), a_.context + 1, a_.heads, a_.kv_heads, a_.head_dim,
                    attn);
      b_->Gemm(attn, T, L.o, nullptr, tmp, false);
      b_->Add(x, tmp, H);
      b_->RmsNorm(x, T, H, L.post_norm, 1e-5f, h);
      b_->CopyToDevice(out, zeros.data(), sizeof(float) * H);
      b_->Gemm(h, T, L.router, nullptr, logits, false);
      b_->RouterTopK(logits, T, a_.experts, a_.top_k, true, ids_dev, w_dev);
      b_->CopyToHost(ids.data(), ids_dev, ids.size() * sizeof(int32_t));  // the engine's sync point
      b_->CopyToHost(wts.data(), w_dev, wts.size() * sizeof(float));
      // Routing override: the trace's token decides.
      for (int j = 0; j < a_.top_k; ++j) {
        ids[j] = trace_.expert(t, l, j);
        const auto& tw = trace_.tokens[t].weights;
        wts[j] = tw.empty() ? 1.f / a_.top_k : tw[static_cast<size_t>(l) * a_.top_k + j];
      }
      Status st = moe.Run(l, T, a_.top_k, h, ids, wts, out);
      if (!st.ok()) Die("moe: " + st.ToString());
      b_->Add(x, out, H);
      // The next time layer l runs is the next token's: the oracle forecast for it.
      if (oracle) oracle->SetUpcoming(l, Experts(token + 1, l));
    }
  }

  void Sync() {
    b_->Synchronize();
    if (!b_->status().ok()) Die(b_->status().ToString());
  }

  float* Scratch(int slot, int64_t floats) {
    if (scratch_.size() <= static_cast<size_t>(slot)) scratch_.resize(slot + 1);
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(floats, 1)) * sizeof(float);
    if (scratch_[slot].bytes() < bytes) scratch_[slot] = OrDie(b_->Allocate(bytes), "scratch");
    return scratch_[slot].f32();
  }

  Args a_;
  const placement::RoutingTrace& trace_;
  std::unique_ptr<CudaBackend> backend_;
  CudaBackend* b_ = nullptr;
  std::vector<AttnLayer> layers_;
  ExpertLayout layout_;
  std::shared_ptr<PinnedHostTier> tier_;
  std::vector<Buffer> kv_;
  std::vector<Buffer> scratch_;
};

int Main(int argc, char** argv) {
  Args a = ParseArgs(argc, argv);
  perf::DeviceInfo info;
  if (!perf::QueryDeviceInfo(&info)) Die("no CUDA device");
  const cudaDeviceProp& prop = info.prop;
  const char* cuda_v = info.cuda_runtime.c_str();
  const char* drv_v = info.driver.c_str();
  const char* cublas_v = info.cublas.c_str();

  placement::RoutingTrace trace = OrDie(placement::ReadRoutingTrace(a.trace), "trace");
  trace.SortBySeqPos();
  if (trace.num_experts() != a.experts || trace.top_k() != a.top_k)
    Die("trace " + a.trace + " has " + std::to_string(trace.num_experts()) + " experts top-" +
        std::to_string(trace.top_k()) + ", the model 8 top-2");

  const size_t expert_bytes = 3 * size_t{2} * a.hidden * a.inter;  // bf16 gate, up, down
  const double mem = MemAvailableBytes();
  std::string layers_note;
  if (a.layers == 0) {
    const double need32 = 32.0 * a.experts * expert_bytes + 16.0 * (1 << 30);
    a.layers = mem >= need32 ? 32 : 16;
    layers_note = a.layers == 32 ? "32 layers (auto: host memory holds them)"
                                 : "16 layers, NOT 32 (auto: " + std::to_string(mem / (1 << 30)) +
                                       " GiB available cannot pin 32 x 8 experts + 16 GiB)";
  } else {
    layers_note = std::to_string(a.layers) + " layers (--layers)";
  }
  if (a.layers > trace.num_layers()) Die("the trace has only " + std::to_string(trace.num_layers()) + " layers");
  if (a.warmup + a.steps + 1 > static_cast<int>(trace.tokens.size()))
    Die("the trace has " + std::to_string(trace.tokens.size()) + " tokens, fewer than warmup + steps + 1");

  std::printf(
      "# ef_offload_bench: Mixtral-8x7B-shaped decode (hidden %d, %d experts x ffn %d, top-%d, bf16 synthetic "
      "weights), batch 1, routing from %s (%zu tokens, (seq,pos) order)\n",
      a.hidden, a.experts, a.inter, a.top_k, a.trace.c_str(), trace.tokens.size());
  std::printf("# git %s, build %s, device %s (%.0f GiB), CUDA runtime %s, driver %s, cuBLAS %s, host %.0f GiB free\n",
              EF_GIT_SHA, EF_BUILD_TYPE, prop.name, prop.totalGlobalMem / double(1 << 30), cuda_v, drv_v, cublas_v,
              mem / (1 << 30));
  std::printf(
      "# %s; %d warm-up + %d timed tokens, context %d; lru = on demand, oracle = expertflow + prefetch %d layer(s) "
      "ahead from the trace's true routing; pcie bound = misses x %.2f ms (%.0f MB / %.0f GB/s)\n",
      layers_note.c_str(), a.warmup, a.steps, a.context, a.prefetch_layers, expert_bytes / (a.pcie_gbps * 1e6),
      expert_bytes / 1e6, a.pcie_gbps);
  if (std::string(EF_BUILD_TYPE) == "Debug") std::printf("# WARNING: debug build, timings are not representative\n");

  Bench bench(a, trace);
  bench.Build();

  nlohmann::json records = nlohmann::json::array();
  std::printf("\n%6s %5s %-7s %9s %9s %7s %10s %9s %8s %8s %11s %11s\n", "budget", "slots", "mode", "tok/s", "ms/tok",
              "hit%", "stall_ms/t", "GB_h2d", "misses", "prefetch", "pcie_ms/t", "bytes_ms/t");
  for (int pct : a.budgets) {
    const int slots = std::max(a.top_k, (a.experts * pct + 99) / 100);
    for (const std::string& mode : a.modes) {
      const Bench::Result r = bench.Run(slots, mode);
      const double n = a.steps;
      const int64_t acc = r.c.hits + r.c.misses;
      const double hit = acc ? double(r.c.hits) / acc : 0;
      const double ms_tok = 1e3 * r.seconds / n;
      const double pcie_ms = r.c.misses * (expert_bytes / (a.pcie_gbps * 1e9)) * 1e3 / n;
      const double bytes_ms = r.copies.bytes_h2d / (a.pcie_gbps * 1e9) * 1e3 / n;
      std::printf("%5d%% %5d %-7s %9.2f %9.1f %6.1f%% %10.1f %9.1f %8lld %8lld %11.1f %11.1f\n", pct, slots,
                  mode.c_str(), n / r.seconds, ms_tok, 100 * hit, r.copies.stall_ms / n, r.copies.bytes_h2d / 1e9,
                  static_cast<long long>(r.c.misses), static_cast<long long>(r.copies.prefetch_loads), pcie_ms,
                  bytes_ms);
      std::fflush(stdout);
      records.push_back({{"budget_pct", pct},
                         {"slots_per_layer", slots},
                         {"mode", mode},
                         {"policy", mode == "oracle" ? "expertflow" : "lru"},
                         {"prefetch", mode == "oracle" ? "oracle (trace's next-layer routing)" : "none (on demand)"},
                         {"tokens", a.steps},
                         {"tokens_per_s", n / r.seconds},
                         {"ms_per_token", ms_tok},
                         {"hit_rate", hit},
                         {"hits", r.c.hits},
                         {"misses", r.c.misses},
                         {"prefetch_loads", r.copies.prefetch_loads},
                         {"prefetch_used", r.c.prefetch_used},
                         {"prefetch_wasted", r.c.prefetch_wasted},
                         {"stall_ms_per_token", r.copies.stall_ms / n},
                         {"stalled_waits", r.copies.stalled_waits},
                         {"bytes_h2d", r.copies.bytes_h2d},
                         {"pcie_bound_ms_per_token", pcie_ms},
                         {"bytes_bound_ms_per_token", bytes_ms}});
    }
  }
  std::printf(
      "# stall = compute-stream time blocked on expert copies (cudaEvents); pcie bound counts misses only, "
      "bytes bound every byte moved (misses + prefetches) at %.0f GB/s\n",
      a.pcie_gbps);
  if (!a.json.empty()) {
    nlohmann::json doc = {{"bench", "ef_offload_bench"},
                          {"git", EF_GIT_SHA},
                          {"build_type", EF_BUILD_TYPE},
                          {"device", prop.name},
                          {"cuda_runtime", cuda_v},
                          {"driver", drv_v},
                          {"cublas", cublas_v},
                          {"layers", a.layers},
                          {"layers_note", layers_note},
                          {"trace", a.trace},
                          {"warmup_tokens", a.warmup},
                          {"timed_tokens", a.steps},
                          {"context", a.context},
                          {"prefetch_layers", a.prefetch_layers},
                          {"expert_bytes", expert_bytes},
                          {"pcie_gbps", a.pcie_gbps},
                          {"shape",
                           {{"hidden", a.hidden},
                            {"experts", a.experts},
                            {"ffn", a.inter},
                            {"top_k", a.top_k},
                            {"heads", a.heads},
                            {"kv_heads", a.kv_heads},
                            {"head_dim", a.head_dim}}},
                          {"records", records}};
    std::ofstream(a.json) << doc.dump(2) << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace ef::cache

int main(int argc, char** argv) { return ef::cache::Main(argc, argv); }
