// ef_offload_bench: decode of a Mixtral-8x7B-shaped model whose experts do not all fit in GPU
// memory, with the expert cache on the CUDA device (CachedExpertSource over the CUDA parts:
// ExpertStore policies over device slots, a pinned host tier, copy streams and per-slot events), driven by the real
// Mixtral routing trace.
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
//   lru        on demand: LRU per layer, a miss loads when its layer's routing is known (hits
//              compute first while misses load) - what Mixtral-offloading does;
//   oracle     expertflow policy + prefetch of the next layer's experts, both from the trace's
//              true future routing (an oracle, not a predictor): at layer l the experts of layer
//              l+1 are prefetched; the policy's forecast is the current and the next token's routing;
//   lookahead  expertflow policy + prefetch of the next `--prefetch-layers` layers' experts from
//              the lookahead predictor (placement/lookahead_predictor.h: the next layers' routers
//              on layer l's router input), as the engine's expert cache does. A predictor can only
//              forecast the model's own routers, and these are synthetic: this mode (and
//              `lru-own`, its on-demand baseline) routes with the model's routers, not the trace -
//              compare lookahead with lru-own, oracle with lru;
//   path       expertflow policy + prefetch of the next `--prefetch-layers` layers' experts from a
//              path predictor file (`--predictor FILE`, `expertflow train-predictor --kind path` on
//              the trace): routes with the trace like lru and oracle; before a token's layer 0 the
//              a-priori forecast, after each layer the forecast corrected by the experts observed so
//              far (PathPredictor::PredictGiven), as the engine's expert cache does. Train it on
//              sequences the bench does not decode (it decodes the first tokens in (seq,pos) order;
//              a warning says when they overlap). Compare with lru.
// --min-probs (a list, forecast modes: lookahead, path): an expert is prefetched only when its
// forecast probability is at least this (PredictorPrefetcherOptions::min_prob; 0: every forecast
// top-k expert). A wrong prefetch moves a whole expert over PCIe; gating trades recall for bytes.
// --forecast-policies (a list, forecast modes): the eviction policy beside the prefetch, expertflow
// (the default: it evicts what the forecast does not need, the least used, then least recent,
// first) or lru.
// Copy queue (--copy-queues, a list): pieces of --chunk-mb fed to the copy engine by the arena's
// copy thread, at most N unfinished (0, the default: every load enqueued whole; cuda_slot_arena.h).
// --compute-ops (a list): how the step zeroes the MoE output and appends K/V each layer on the
// compute stream: `engine` (the default and what the engine does: SetZero, CopyOnDevice),
// `copies` (zeros by a host->device CopyToDevice, CopyOnDevice: how this benchmark did it before),
// `kernels` (both as kernels), `kv-kernel` (CopyToDevice zeros, K/V by a kernel). The host->device
// copy is served after the queued expert copies, so with it the compute stream blocks there,
// untimed, and the stall column reads ~0 although the run is copy-bound (cuda_slot_arena.h).
// Timed: `steps` tokens after `warmup` tokens (cache warm). Reported per token: wall time, the
// compute stream's time blocked on copies (cudaEvents around each wait), hits/misses of the store,
// bytes copied host->device, and the PCIe bound = misses x expert bytes / 55 GB/s (6.35 ms per
// expert, ACCELERATOR.md).
//
//   ef_offload_bench [--layers 0 (auto) | 16 | 32] [--steps 48] [--warmup 16] [--budgets 25,50,75,100]
//                    [--modes lru,oracle,lru-own,lookahead[,path]] [--predictor FILE] [--prefetch-layers 1]
//                    [--min-probs 0,0.5] [--forecast-policies expertflow,lru] [--copy-queues 3]
//                    [--chunk-mb 8] [--context 256] [--trace FILE] [--pcie-gbps 55] [--json FILE]
#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "cache/cuda/cuda_cache_source.h"
#include "placement/conditional_predictor.h"
#include "placement/lookahead_predictor.h"
#include "placement/predictor_file.h"
#include "placement/routing_forecast.h"
#include "placement/routing_trace.h"
#include "placement/trace_inputs.h"
#include "runtime/backend/cuda/cuda_backend.h"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/core/build_info.h"
#include "runtime/core/dtype.h"
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
  std::vector<std::string> modes = {"lru", "oracle", "lru-own", "lookahead"};
  int prefetch_layers = 1;
  std::vector<int> copy_queues = {0};
  std::vector<double> min_probs = {0};  // forecast modes: prefetch only experts at least this probable
  std::vector<std::string> forecast_policies = {"expertflow"};  // forecast modes: eviction policy
  int chunk_mb = 8;
  std::vector<std::string> compute_ops_list = {"engine"};
  std::string compute_ops = "engine";  // the one running
  int context = 256;
  std::string trace = std::string(EF_TEST_DATA) + "/traces/mixtral8x7b_gsm8k_decode.jsonl";
  double pcie_gbps = 55;
  std::string json;
  std::string predictor;  // path mode: a path (or hybrid) predictor file
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
    } else if (k == "--copy-queues") {
      a.copy_queues.clear();
      for (auto& t : Split(next())) a.copy_queues.push_back(std::stoi(t));
    } else if (k == "--min-probs") {
      a.min_probs.clear();
      for (auto& t : Split(next())) a.min_probs.push_back(std::stod(t));
    } else if (k == "--forecast-policies") {
      a.forecast_policies = Split(next());
    } else if (k == "--chunk-mb") {
      a.chunk_mb = std::stoi(next());
    } else if (k == "--compute-ops") {
      a.compute_ops_list = Split(next());
    } else if (k == "--context") {
      a.context = std::stoi(next());
    } else if (k == "--trace") {
      a.trace = next();
    } else if (k == "--pcie-gbps") {
      a.pcie_gbps = std::stod(next());
    } else if (k == "--json") {
      a.json = next();
    } else if (k == "--predictor") {
      a.predictor = next();
    } else if (k == "-h" || k == "--help") {
      std::printf(
          "ef_offload_bench [--layers 0|16|32] [--steps N] [--warmup N] [--budgets 25,50,75,100] "
          "[--modes lru,oracle,lru-own,lookahead,path] [--predictor FILE (path mode)] [--prefetch-layers N] "
          "[--min-probs 0[,0.5]] [--forecast-policies expertflow[,lru]] "
          "[--copy-queues 3[,0]] [--chunk-mb 8] [--context N] [--trace FILE] [--pcie-gbps X] [--json FILE]\n");
      std::exit(0);
    } else {
      Die("unknown argument " + k);
    }
  }
  bool path_mode = false;
  for (auto& m : a.modes) {
    if (m != "lru" && m != "oracle" && m != "lru-own" && m != "lookahead" && m != "path")
      Die("unknown mode " + m + " (lru, oracle, lru-own, lookahead, path)");
    path_mode |= m == "path";
  }
  if (path_mode && a.predictor.empty())
    Die("mode path needs --predictor FILE (expertflow train-predictor --kind path)");
  if (a.prefetch_layers < 1) Die("--prefetch-layers must be >= 1");
  for (const auto& p : a.forecast_policies)
    if (p != "expertflow" && p != "lru") Die("unknown --forecast-policies " + p + " (expertflow, lru)");
  for (double p : a.min_probs)
    if (!(p >= 0 && p <= 1)) Die("--min-probs takes probabilities in [0, 1]");
  for (int q : a.copy_queues)
    if (q < 0) Die("--copy-queues takes counts >= 0");
  for (const auto& o : a.compute_ops_list)
    if (o != "engine" && o != "copies" && o != "kernels" && o != "kv-kernel")
      Die("unknown --compute-ops " + o + " (engine, copies, kernels, kv-kernel)");
  if (a.chunk_mb < 1) Die("--chunk-mb must be >= 1");
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

// The routing a mode runs with: the trace's (lru, oracle) or the synthetic model's own routers
// (lru-own, lookahead: a predictor forecasts the model's routers, not the trace's).
bool OwnRouting(const std::string& mode) { return mode == "lru-own" || mode == "lookahead"; }
const char* Policy(const std::string& mode) { return mode == "lru" || mode == "lru-own" ? "lru" : "expertflow"; }

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
  Bench(const Args& a, const placement::RoutingTrace& trace, const placement::ConditionalPredictor* path)
      : a_(a), trace_(trace), path_(path) {
    // The EF_CUDA_* parameters apply, as in the engine.
    backend_ = OrDie(CudaBackend::Create(runtime::CudaBackendOptions::FromParams(0)), "cuda backend");
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
    // The lookahead predictor's F32 copies of the routers (norm weights are ones here).
    {
      std::vector<std::vector<float>> routers;
      std::vector<uint16_t> raw(static_cast<size_t>(a_.experts) * a_.hidden);
      for (int l = 0; l < a_.layers; ++l) {
        b_->CopyToHost(raw.data(), layers_[l].router.data, raw.size() * sizeof(uint16_t));
        std::vector<float> r(raw.size());
        for (size_t i = 0; i < raw.size(); ++i) r[i] = Bf16ToF32(raw[i]);
        routers.push_back(std::move(r));
      }
      lookahead_ =
          OrDie(placement::LookaheadPredictor::Create(a_.hidden, a_.experts, a_.top_k, std::move(routers), {}, 1e-5f),
                "lookahead predictor");
    }
    // Experts: generated on the device one at a time, copied into the pinned host tier.
    config_.num_layers = a_.layers;
    config_.num_experts = a_.experts;
    config_.top_k = a_.top_k;
    shape_.gate = Weight{DType::kBF16, nullptr, a_.inter, a_.hidden};
    shape_.up = Weight{DType::kBF16, nullptr, a_.inter, a_.hidden};
    shape_.down = Weight{DType::kBF16, nullptr, a_.hidden, a_.inter};
    const SlotLayout layout = CudaSlotLayout(shape_);
    const std::vector<size_t> offset = layout.Offsets(shape_);  // gate, up, down
    expert_bytes_ = layout.Bytes(shape_);
    auto t0 = std::chrono::steady_clock::now();
    tier_ = OrDie(PinnedHostTier::Create(a_.layers, a_.experts, expert_bytes_, std::vector<bool>(a_.layers, true)),
                  "pinned tier");
    const double t_pin = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    {
      Buffer tmp = OrDie(b_->Allocate(expert_bytes_), "expert scratch");
      auto* base = static_cast<std::byte*>(tmp.data());
      for (int l = 0; l < a_.layers; ++l)
        for (int e = 0; e < a_.experts; ++e) {
          const int64_t n = int64_t{a_.inter} * a_.hidden;
          Check(runtime::cuda::launch_fill_random(base + offset[0], DType::kBF16, n, seed++, sh, b_->stream()), "fill");
          Check(runtime::cuda::launch_fill_random(base + offset[1], DType::kBF16, n, seed++, sh, b_->stream()), "fill");
          Check(runtime::cuda::launch_fill_random(base + offset[2], DType::kBF16, n, seed++, si, b_->stream()), "fill");
          Check(cudaMemcpyAsync(tier_->data(l, e), base, expert_bytes_, cudaMemcpyDeviceToHost, b_->stream()), "d2h");
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
    int64_t forecast_hits = 0, forecast_chosen = 0;  // lookahead: forecast experts the router chose
  };

  Result Run(int slots, const std::string& mode, int copy_queue, const std::string& compute_ops, double min_prob,
             const std::string& policy) {
    a_.compute_ops = compute_ops;
    min_prob_ = min_prob;
    CachedExpertSourceOptions o;
    o.slots_per_layer = slots;
    o.policy = policy;
    o.prefetch_layers = mode == "oracle" || mode == "lookahead" || mode == "path" ? a_.prefetch_layers : 0;
    CudaCacheOptions co;
    co.max_queued_chunks = copy_queue;
    co.copy_chunk_bytes = static_cast<size_t>(a_.chunk_mb) << 20;
    auto src = OrDie(CreateCudaCacheSource(config_, shape_, tier_, b_, o, co), "expert cache");
    CudaSlotArena& arena = CudaArenaOf(*src);
    runtime::LocalMoeExecutor moe(b_, a_.hidden, a_.experts);
    moe.set_expert_source(src.get());
    const bool oracle = mode == "oracle";
    mode_ = mode;
    forecast_hits_ = forecast_chosen_ = 0;
    for (auto& v : predicted_) v.clear();
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
        arena.HarvestStall();
        c0 = src->stats().total;
        s0 = arena.copy_stats();
        t0 = std::chrono::steady_clock::now();
        forecast_hits_ = forecast_chosen_ = 0;
      }
      if (oracle) src->store().SetForecast(Forecast(i));
      Step(i, moe, src.get());
    }
    Sync();
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.forecast_hits = forecast_hits_;
    r.forecast_chosen = forecast_chosen_;
    arena.HarvestStall();
    r.c = Minus(src->stats().total, c0);
    r.copies = arena.copy_stats();
    r.copies.urgent_loads -= s0.urgent_loads;
    r.copies.prefetch_loads -= s0.prefetch_loads;
    r.copies.bytes_h2d -= s0.bytes_h2d;
    r.copies.stalled_waits -= s0.stalled_waits;
    r.copies.stall_ms -= s0.stall_ms;
    return r;
  }

  size_t expert_bytes() const { return expert_bytes_; }
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

  // Lookahead at layer l (router input h_host): the next layers' forecast experts (each the top-k
  // of the predictor's probabilities) as the cache's upcoming lists, and the expertflow forecast
  // (this layer's true experts, the predicted ones), as cache::PredictorPrefetcher does.
  void Lookahead(int l, const std::vector<float>& h_host, const std::vector<int32_t>& ids, CachedExpertSource* src) {
    const int E = a_.experts, K = a_.top_k;
    if (l == 0) step_forecast_ = placement::RoutingForecast(1, a_.layers, E);
    if (l > 0 && !predicted_[l].empty()) {
      forecast_chosen_ += K;
      for (int32_t e : ids)
        if (std::find(predicted_[l].begin(), predicted_[l].end(), e) != predicted_[l].end()) ++forecast_hits_;
    }
    float* now = step_forecast_.row(0, l);
    std::fill(now, now + E, 0.f);
    for (int32_t e : ids) now[e] = 1.f;
    std::vector<float> p(E);
    for (int n = l + 1; n < a_.layers && n <= l + a_.prefetch_layers; ++n) {
      Status st = lookahead_->LayerProbs(h_host, l, n, p.data());
      if (!st.ok()) Die("lookahead: " + st.ToString());
      std::vector<int32_t> order(E);
      for (int e = 0; e < E; ++e) order[e] = e;
      std::partial_sort(order.begin(), order.begin() + K, order.end(),
                        [&](int32_t x, int32_t y) { return p[x] != p[y] ? p[x] > p[y] : x < y; });
      order.resize(K);
      float* row = step_forecast_.row(0, n);
      std::fill(row, row + E, 0.f);
      for (int32_t e : order) row[e] = 1.f;  // protected from eviction, prefetched only when sure
      std::erase_if(order, [&](int32_t e) { return p[e] < min_prob_; });
      predicted_[n] = order;
      src->SetUpcoming(n, std::move(order));
    }
    src->store().SetForecast(step_forecast_);
  }

  // Path predictor for trace token t: with l = -1 (before layer 0) the a-priori forecast, else the
  // forecast corrected by the experts of layers 0..l (ids: layer l's); the next prefetch_layers
  // layers' top-k become the cache's upcoming lists, and the whole forecast (observed layers
  // exact) the expertflow policy's, as cache::PredictorPrefetcher does.
  void PathForecast(size_t t, int l, const std::vector<int32_t>& ids, CachedExpertSource* src) {
    const int E = a_.experts, K = a_.top_k;
    if (l < 0) {
      observed_.clear();
    } else {
      if (!predicted_[l].empty()) {
        forecast_chosen_ += K;
        for (int32_t e : ids)
          if (std::find(predicted_[l].begin(), predicted_[l].end(), e) != predicted_[l].end()) ++forecast_hits_;
      }
      for (int32_t e : ids) observed_.push_back(static_cast<int16_t>(e));
    }
    // The inputs training saw: the token, its position and its sequence's earlier tokens.
    const placement::PredictorInput& in = inputs_.inputs()[t];
    placement::ObservedRouting obs;
    obs.num_layers_done = l + 1;
    obs.experts = observed_;
    obs.top_k = K;
    auto f = l < 0 ? path_->Predict({&in, 1}) : path_->PredictGiven({&in, 1}, {&obs, 1});
    if (!f.ok()) Die("path predictor: " + f.status().ToString());
    step_forecast_ = placement::RoutingForecast(1, a_.layers, E);
    for (int n = 0; n < a_.layers; ++n) {
      float* row = step_forecast_.row(0, n);
      if (n <= l) {
        for (int j = 0; j < K; ++j) row[observed_[static_cast<size_t>(n) * K + j]] = 1.f;
      } else {
        for (int e : f->TopK(0, n, K)) row[e] = 1.f;  // as the engine's prefetcher: top-k protected
      }
    }
    for (int n = l + 1; n < a_.layers && n <= l + a_.prefetch_layers; ++n) {
      std::vector<int32_t> order;
      for (int e : f->TopK(0, n, K))
        if (f->row(0, n)[e] >= min_prob_) order.push_back(e);
      predicted_[n] = order;
      src->SetUpcoming(n, std::move(order));
    }
    // Prefetching wraps past the last layer to the next token's first layers: their a-priori
    // forecast.
    if (l >= 0 && l + a_.prefetch_layers >= a_.layers) {
      const placement::PredictorInput& nin = inputs_.inputs()[(t + 1) % trace_.tokens.size()];
      auto nf = path_->Predict({&nin, 1});
      if (!nf.ok()) Die("path predictor: " + nf.status().ToString());
      for (int n = 0; n <= l + a_.prefetch_layers - a_.layers && n < a_.layers; ++n) {
        std::vector<int32_t> order;
        for (int e : nf->TopK(0, n, K))
          if (nf->row(0, n)[e] >= min_prob_) order.push_back(e);
        predicted_[n] = order;
        src->SetUpcoming(n, std::move(order));
      }
    }
    src->store().SetForecast(step_forecast_);
  }

  void Step(int token, runtime::LocalMoeExecutor& moe, CachedExpertSource* src) {
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
    auto* row0_dev = reinterpret_cast<int32_t*>(Scratch(12, 1));  // zeroed at allocation: row index 0
    const int32_t pos = a_.context;
    b_->CopyToDevice(pos_dev, &pos, sizeof pos);
    Check(runtime::cuda::launch_fill_random(x, DType::kF32, H, 1000 + token, 1.0f, b_->stream()), "input");
    std::vector<int32_t> ids(a_.top_k);
    std::vector<float> wts(a_.top_k);
    std::vector<float> zeros(H, 0.f);
    const size_t t = static_cast<size_t>(token) % trace_.tokens.size();
    if (mode_ == "path") PathForecast(t, -1, {}, src);
    for (int l = 0; l < a_.layers; ++l) {
      const AttnLayer& L = layers_[l];
      b_->RmsNorm(x, T, H, L.input_norm, 1e-5f, h);
      b_->Gemm(h, T, L.q, nullptr, q, false);
      b_->Gemm(h, T, L.k, nullptr, k, false);
      b_->Gemm(h, T, L.v, nullptr, v, false);
      b_->Rope(q, pos_dev, T, a_.heads, a_.head_dim, 1e6f);
      b_->Rope(k, pos_dev, T, a_.kv_heads, a_.head_dim, 1e6f);
      if (a_.compute_ops == "kernels" || a_.compute_ops == "kv-kernel") {
        Check(runtime::cuda::launch_gather_rows(
                  k, row0_dev, 1, kvd, kv_[2 * l].f32() + static_cast<size_t>(a_.context) * kvd, nullptr, b_->stream()),
              "kv append");
        Check(runtime::cuda::launch_gather_rows(v, row0_dev, 1, kvd,
                                                kv_[2 * l + 1].f32() + static_cast<size_t>(a_.context) * kvd, nullptr,
                                                b_->stream()),
              "kv append");
      } else {
        b_->CopyOnDevice(kv_[2 * l].f32() + static_cast<size_t>(a_.context) * kvd, k, sizeof(float) * kvd);
        b_->CopyOnDevice(kv_[2 * l + 1].f32() + static_cast<size_t>(a_.context) * kvd, v, sizeof(float) * kvd);
      }
      b_->Attention(q, 1, kv_[2 * l].f32(), kv_[2 * l + 1].f32(), a_.context + 1, a_.heads, a_.kv_heads, a_.head_dim,
                    attn);
      b_->Gemm(attn, T, L.o, nullptr, tmp, false);
      b_->Add(x, tmp, H);
      b_->RmsNorm(x, T, H, L.post_norm, 1e-5f, h);
      if (a_.compute_ops == "kernels") {
        Check(runtime::cuda::launch_fill_random(out, DType::kF32, H, 1, 0.f, b_->stream()), "zero");  // 0 * u = 0
      } else if (a_.compute_ops == "engine") {
        b_->SetZero(out, sizeof(float) * H);
      } else {
        b_->CopyToDevice(out, zeros.data(), sizeof(float) * H);
      }
      b_->Gemm(h, T, L.router, nullptr, logits, false);
      b_->RouterTopK(logits, T, a_.experts, a_.top_k, true, ids_dev, w_dev);
      b_->CopyToHost(ids.data(), ids_dev, ids.size() * sizeof(int32_t));  // the engine's sync point
      b_->CopyToHost(wts.data(), w_dev, wts.size() * sizeof(float));
      if (!OwnRouting(mode_)) {
        // Routing override: the trace's token decides.
        for (int j = 0; j < a_.top_k; ++j) {
          ids[j] = trace_.expert(t, l, j);
          const auto& tw = trace_.tokens[t].weights;
          wts[j] = tw.empty() ? 1.f / a_.top_k : tw[static_cast<size_t>(l) * a_.top_k + j];
        }
      }
      if (mode_ == "lookahead") {
        // The router input to the host, as Engine::set_expose_router_inputs does.
        b_->CopyToHost(h_host_.data(), h, h_host_.size() * sizeof(float));
        Lookahead(l, h_host_, ids, src);
      } else if (mode_ == "path") {
        PathForecast(t, l, ids, src);
      }
      Status st = moe.Run(l, T, a_.top_k, h, ids, wts, out);
      if (!st.ok()) Die("moe: " + st.ToString());
      b_->Add(x, out, H);
      // The next time layer l runs is the next token's: the oracle forecast for it.
      if (mode_ == "oracle") src->SetUpcoming(l, Experts(token + 1, l));
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
  std::string mode_;
  std::unique_ptr<placement::LookaheadPredictor> lookahead_;
  const placement::ConditionalPredictor* path_ = nullptr;
  placement::TraceInputs inputs_{trace_};  // path mode: every trace token's predictor input
  double min_prob_ = 0;
  std::vector<int16_t> observed_;  // path mode: the running token's experts so far
  std::vector<float> h_host_ = std::vector<float>(static_cast<size_t>(a_.hidden));
  std::vector<std::vector<int32_t>> predicted_ = std::vector<std::vector<int32_t>>(static_cast<size_t>(a_.layers));
  placement::RoutingForecast step_forecast_;
  int64_t forecast_hits_ = 0, forecast_chosen_ = 0;
  std::unique_ptr<CudaBackend> backend_;
  CudaBackend* b_ = nullptr;
  std::vector<AttnLayer> layers_;
  runtime::ModelConfig config_;   // the MoE shape the cache sees: every layer routed
  runtime::ExpertWeights shape_;  // every expert's (data unused)
  size_t expert_bytes_ = 0;       // one expert in the device slot layout
  std::shared_ptr<PinnedHostTier> tier_;
  std::vector<Buffer> kv_;
  std::vector<Buffer> scratch_;
};

// --layers 0: 32 layers when the host can pin 32 x 8 experts with 16 GiB to spare, else 16. Returns
// the header's note on the choice.
std::string ChooseLayers(Args* a, size_t expert_bytes, double mem) {
  if (a->layers != 0) return std::to_string(a->layers) + " layers (--layers)";
  const double need32 = 32.0 * a->experts * expert_bytes + 16.0 * (1 << 30);
  a->layers = mem >= need32 ? 32 : 16;
  return a->layers == 32 ? "32 layers (auto: host memory holds them)"
                         : "16 layers, NOT 32 (auto: " + std::to_string(mem / (1 << 30)) +
                               " GiB available cannot pin 32 x 8 experts + 16 GiB)";
}

// The '#' header: shape, trace, build, device, modes.
void PrintHeader(const Args& a, const perf::DeviceInfo& info, const placement::RoutingTrace& trace,
                 const std::string& layers_note, size_t expert_bytes, double mem) {
  const cudaDeviceProp& prop = info.prop;
  const char* cuda_v = info.cuda_runtime.c_str();
  const char* drv_v = info.driver.c_str();
  const char* cublas_v = info.cublas.c_str();
  std::printf(
      "# ef_offload_bench: Mixtral-8x7B-shaped decode (hidden %d, %d experts x ffn %d, top-%d, bf16 synthetic "
      "weights), batch 1, routing from %s (%zu tokens, (seq,pos) order)\n",
      a.hidden, a.experts, a.inter, a.top_k, a.trace.c_str(), trace.tokens.size());
  std::printf("# git %s, build %s, device %s (%.0f GiB), CUDA runtime %s, driver %s, cuBLAS %s, host %.0f GiB free\n",
              EF_GIT_SHA, EF_BUILD_TYPE, prop.name, prop.totalGlobalMem / double(1 << 30), cuda_v, drv_v, cublas_v,
              mem / (1 << 30));
  std::printf(
      "# %s; %d warm-up + %d timed tokens, context %d; lru = on demand, oracle = expertflow + prefetch %d layer(s) "
      "ahead from the trace's true routing; lru-own / lookahead = the same with the model's own (synthetic) routers, "
      "lookahead prefetching from the lookahead predictor; pcie bound = misses x %.2f ms (%.0f MB / %.0f GB/s); "
      "copy queue = pieces of %d MB on the copy engine at once (0: whole loads); compute-stream ops: %s\n",
      layers_note.c_str(), a.warmup, a.steps, a.context, a.prefetch_layers, expert_bytes / (a.pcie_gbps * 1e6),
      expert_bytes / 1e6, a.pcie_gbps, a.chunk_mb, "see the ops column");
  if (std::string(EF_BUILD_TYPE) == "Debug") std::printf("# WARNING: debug build, timings are not representative\n");
}

// Path mode: the predictor file (owned by *loaded), checked against the trace; a warning when it
// trained on the sequences the bench decodes. Null without --predictor.
const placement::ConditionalPredictor* LoadPathPredictor(const Args& a, const placement::RoutingTrace& trace,
                                                         placement::LoadedPredictor* loaded, std::string* note) {
  if (a.predictor.empty()) return nullptr;
  *loaded = OrDie(placement::LoadPredictor(a.predictor), "--predictor");
  const placement::ConditionalPredictor* path =
      dynamic_cast<const placement::ConditionalPredictor*>(loaded->predictor.get());
  if (path == nullptr)
    Die("--predictor " + a.predictor + " is a " + loaded->info.kind +
        " predictor; mode path needs kind path or hybrid");
  if (loaded->info.num_layers < a.layers || loaded->info.num_experts != a.experts)
    Die("--predictor " + a.predictor + " forecasts " + std::to_string(loaded->info.num_layers) + " layers x " +
        std::to_string(loaded->info.num_experts) + " experts; the bench runs " + std::to_string(a.layers) + " x " +
        std::to_string(a.experts));
  std::set<int64_t> trained(loaded->info.train_seqs.begin(), loaded->info.train_seqs.end()), overlap;
  for (int i = 0; i < a.warmup + a.steps + 1; ++i)
    if (trained.count(trace.tokens[static_cast<size_t>(i)].seq))
      overlap.insert(trace.tokens[static_cast<size_t>(i)].seq);
  *note = loaded->info.kind + " predictor " + a.predictor + ", trained on sequences";
  for (int64_t s : loaded->info.train_seqs) *note += ' ' + std::to_string(s);
  std::printf("# %s\n", note->c_str());
  if (!overlap.empty())
    std::printf("# WARNING: the predictor trained on %zu of the sequences decoded here: its forecasts are flattered\n",
                overlap.size());
  return path;
}

// One configuration of the sweep.
struct RunConfig {
  std::string ops;
  int queue = 0;
  int pct = 0;  // budget, percent of the experts
  int slots = 0;
  std::string mode;
  std::string policy;
  double min_prob = 0;
  bool forecasts = false;  // lookahead or path
};

// Prints a run's row; returns its record.
nlohmann::json Report(const Args& a, size_t expert_bytes, const RunConfig& c, const Bench::Result& r) {
  const std::string& ops = c.ops;
  const std::string& mode = c.mode;
  const std::string& policy = c.policy;
  const int pct = c.pct, slots = c.slots, queue = c.queue;
  const double min_prob = c.min_prob;
  const bool forecasts = c.forecasts;
  const std::string label = forecasts ? mode + "+" + policy : mode;
  const double n = a.steps;
  const int64_t acc = r.c.hits + r.c.misses;
  const double hit = acc ? double(r.c.hits) / acc : 0;
  const double ms_tok = 1e3 * r.seconds / n;
  const double pcie_ms = r.c.misses * (expert_bytes / (a.pcie_gbps * 1e9)) * 1e3 / n;
  const double bytes_ms = r.copies.bytes_h2d / (a.pcie_gbps * 1e9) * 1e3 / n;
  const double recall = r.forecast_chosen ? double(r.forecast_hits) / r.forecast_chosen : 0;
  char recall_text[16] = "-";
  if (forecasts) std::snprintf(recall_text, sizeof recall_text, "%.3f", recall);
  char used_text[16] = "-";
  const int64_t settled = r.c.prefetch_used + r.c.prefetch_wasted;
  if (settled > 0) std::snprintf(used_text, sizeof used_text, "%.0f%%", 100.0 * r.c.prefetch_used / settled);
  std::printf("%-9s %5d%% %5d %-14s %5.2f %5d %9.2f %9.1f %6.1f%% %10.1f %9.1f %8lld %8lld %6s %7s %11.1f %11.1f\n",
              ops.c_str(), pct, slots, label.c_str(), min_prob, queue, n / r.seconds, ms_tok, 100 * hit,
              r.copies.stall_ms / n, r.copies.bytes_h2d / 1e9, static_cast<long long>(r.c.misses),
              static_cast<long long>(r.copies.prefetch_loads), used_text, recall_text, pcie_ms, bytes_ms);
  std::fflush(stdout);
  const char* prefetch = mode == "oracle"      ? "oracle (trace's next-layer routing)"
                         : mode == "lookahead" ? "lookahead predictor (next layers' routers on h)"
                         : mode == "path"      ? "path predictor (a priori, then corrected layer by layer)"
                                               : "none (on demand)";
  return {{"budget_pct", pct},
          {"slots_per_layer", slots},
          {"mode", mode},
          {"routing", OwnRouting(mode) ? "model's own routers" : "trace"},
          {"policy", policy},
          {"prefetch", prefetch},
          {"copy_queue", queue},
          {"prefetch_min_prob", min_prob},
          {"compute_ops", ops},
          {"chunk_mb", a.chunk_mb},
          {"tokens", a.steps},
          {"tokens_per_s", n / r.seconds},
          {"ms_per_token", ms_tok},
          {"hit_rate", hit},
          {"hits", r.c.hits},
          {"misses", r.c.misses},
          {"prefetch_loads", r.copies.prefetch_loads},
          {"prefetch_used", r.c.prefetch_used},
          {"prefetch_wasted", r.c.prefetch_wasted},
          {"forecast_recall", forecasts ? nlohmann::json(recall) : nlohmann::json(nullptr)},
          {"stall_ms_per_token", r.copies.stall_ms / n},
          {"stalled_waits", r.copies.stalled_waits},
          {"bytes_h2d", r.copies.bytes_h2d},
          {"pcie_bound_ms_per_token", pcie_ms},
          {"bytes_bound_ms_per_token", bytes_ms}};
}

// The same records as JSON, to --json.
void WriteJson(const Args& a, const perf::DeviceInfo& info, const std::string& layers_note,
               const std::string& predictor_note, size_t expert_bytes, const nlohmann::json& records) {
  nlohmann::json doc = perf::DeviceJson("ef_offload_bench", info);
  doc.update({{"layers", a.layers},
              {"layers_note", layers_note},
              {"trace", a.trace},
              {"warmup_tokens", a.warmup},
              {"timed_tokens", a.steps},
              {"context", a.context},
              {"prefetch_layers", a.prefetch_layers},
              {"predictor", predictor_note},
              {"chunk_mb", a.chunk_mb},
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
              {"records", records}});
  std::ofstream(a.json) << doc.dump(2) << "\n";
}

int Main(int argc, char** argv) {
  Args a = ParseArgs(argc, argv);
  perf::DeviceInfo info;
  if (!perf::QueryDeviceInfo(&info)) Die("no CUDA device");

  placement::RoutingTrace trace = OrDie(placement::ReadRoutingTrace(a.trace), "trace");
  trace.SortBySeqPos();
  if (trace.num_experts() != a.experts || trace.top_k() != a.top_k)
    Die("trace " + a.trace + " has " + std::to_string(trace.num_experts()) + " experts top-" +
        std::to_string(trace.top_k()) + ", the model 8 top-2");

  const size_t expert_bytes = 3 * size_t{2} * a.hidden * a.inter;  // bf16 gate, up, down
  const double mem = MemAvailableBytes();
  const std::string layers_note = ChooseLayers(&a, expert_bytes, mem);
  if (a.layers > trace.num_layers()) Die("the trace has only " + std::to_string(trace.num_layers()) + " layers");
  if (a.warmup + a.steps + 1 > static_cast<int>(trace.tokens.size()))
    Die("the trace has " + std::to_string(trace.tokens.size()) + " tokens, fewer than warmup + steps + 1");

  PrintHeader(a, info, trace, layers_note, expert_bytes, mem);

  placement::LoadedPredictor loaded;  // outlives the bench (path points into it)
  std::string predictor_note;
  const placement::ConditionalPredictor* path = LoadPathPredictor(a, trace, &loaded, &predictor_note);

  Bench bench(a, trace, path);
  bench.Build();

  nlohmann::json records = nlohmann::json::array();
  std::printf("\n%-9s %6s %5s %-14s %5s %5s %9s %9s %7s %10s %9s %8s %8s %6s %7s %11s %11s\n", "ops", "budget", "slots",
              "mode", "min_p", "queue", "tok/s", "ms/tok", "hit%", "stall_ms/t", "GB_h2d", "misses", "prefetch",
              "used%", "recall", "pcie_ms/t", "bytes_ms/t");
  for (const std::string& ops : a.compute_ops_list)
    for (int queue : a.copy_queues) {
      for (int pct : a.budgets) {
        const int slots = std::max(a.top_k, (a.experts * pct + 99) / 100);
        for (const std::string& mode : a.modes)
          for (const std::string& forecast_policy : a.forecast_policies)
            for (double min_prob : a.min_probs) {
              const bool forecasts = mode == "lookahead" || mode == "path";
              // The gate and the forecast policy change nothing in the other modes: they run once.
              if (!forecasts && (min_prob != a.min_probs.front() || forecast_policy != a.forecast_policies.front()))
                continue;
              if (!forecasts) min_prob = 0;
              const std::string policy = forecasts ? forecast_policy : Policy(mode);
              const Bench::Result r = bench.Run(slots, mode, queue, ops, min_prob, policy);
              records.push_back(
                  Report(a, expert_bytes, {ops, queue, pct, slots, mode, policy, min_prob, forecasts}, r));
            }
      }
    }
  std::printf(
      "# stall = compute-stream time blocked on expert copies (cudaEvents); pcie bound counts misses only, "
      "bytes bound every byte moved (misses + prefetches) at %.0f GB/s\n",
      a.pcie_gbps);
  if (!a.json.empty()) WriteJson(a, info, layers_note, predictor_note, expert_bytes, records);
  return 0;
}

}  // namespace
}  // namespace ef::cache

int main(int argc, char** argv) { return ef::cache::Main(argc, argv); }
