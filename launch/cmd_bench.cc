// `expertflow bench`: offline benchmark of a closed-loop workload on the real engine.
//
//   expertflow bench --model DIR -n 64 -c 8 --prompt-len 32 --gen-len 32 [--json OUT.json]
//   expertflow bench --synthetic mixtral-8x7b --synthetic-scale 64 --routing-trace T.jsonl \
//                    --cache-slots-per-layer 4 --cache-policy expertflow --prefetch-layers 1
//
// --synthetic SHAPE writes (once, cached) a seeded random-weight checkpoint of a real model's
// shape (launch/synthetic_model.h) and benchmarks it through the normal loader; --synthetic-scale
// divides hidden/FFN sizes for CPU runs. --routing-trace makes every MoE layer take its experts
// from a recorded trace (its layers, experts and top-k must match the model: an error otherwise).
// --cache-slots-per-layer N serves experts from a CachedExpertSource of N slots per MoE layer
// (policy --cache-policy); with a trace and --prefetch-layers D > 0 the trace's routing of the
// next D layers is the forecast (an oracle: an upper bound for a predictor). The table and JSON
// then carry the store's hit rate, bytes moved into slots and Acquire stall time.
//
// `concurrency` client threads each submit a request, wait for its last token and submit the
// next, until `num-requests` are done; requests go through the same ServingLoop as `serve`
// (continuous batching), without HTTP. Prompts are `prompt-len` token ids drawn from the
// vocabulary with a fixed seed; generation ignores EOS so every request makes `gen-len` tokens.
// Prints a '#' header, one fixed-width row and the same record as JSON with --json.
// TTFT is arrival -> first token; inter-token latency is a request's (last - first token time) /
// (tokens - 1), one value per request; p50/p99 are over requests.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "cache/cached_expert_source.h"
#include "launch/command.h"
#include "launch/engine_options.h"
#include "launch/server/server_metrics.h"
#include "launch/server/serving_loop.h"
#include "launch/synthetic_model.h"
#include "placement/trace_routing_override.h"
#include "runtime/core/build_info.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ef::launch {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

struct BenchOptions {
  ModelFlags model;
  int num_requests = 64;
  int concurrency = 8;
  int prompt_len = 32;
  int gen_len = 32;
  int max_batch = 32;
  uint64_t seed = 1;
  std::string json_path;
  // Synthetic weights (empty: --model).
  std::string synthetic;
  int synthetic_layers = 0;  // 0: the shape's
  int synthetic_scale = 1;
  uint64_t synthetic_seed = 1;
  std::string synthetic_dir;  // empty: DefaultSyntheticRoot()
  // Routing and expert cache.
  std::string routing_trace;
  int cache_slots_per_layer = 0;  // 0: every expert resident (no cache)
  std::string cache_policy = "lru";
  int prefetch_layers = 0;
  bool cache_async = false;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

int64_t PeakRssBytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return 0;
}

Status RunBench(const BenchOptions& o) {
  if (o.num_requests < 1 || o.concurrency < 1 || o.prompt_len < 1 || o.gen_len < 1)
    return InvalidArgument("-n, -c, --prompt-len and --gen-len must be >= 1");
  std::string model_dir = o.model.dir;
  runtime::EngineOptions eo = o.model.ToEngineOptions();
  SyntheticShape shape;
  if (!o.synthetic.empty()) {
    EF_ASSIGN_OR_RETURN(shape, FindSyntheticShape(o.synthetic));
    EF_ASSIGN_OR_RETURN(shape, ScaleSyntheticShape(shape, o.synthetic_layers, o.synthetic_scale));
    EF_ASSIGN_OR_RETURN(model_dir,
                        WriteSyntheticCheckpoint(shape, o.synthetic_seed,
                                                 o.synthetic_dir.empty() ? DefaultSyntheticRoot() : o.synthetic_dir));
    // Real shapes allow 32k+ positions; size the KV cache to the workload instead.
    if (eo.max_seq_len == 0) eo.max_seq_len = o.prompt_len + o.gen_len;
  }
  EF_ASSIGN_OR_RETURN(runtime::Tokenizer tok, runtime::Tokenizer::FromModelDir(model_dir));
  EF_ASSIGN_OR_RETURN(auto engine, runtime::Engine::Create(model_dir, eo));
  const runtime::ModelConfig cfg = engine->config();
  if (o.prompt_len + o.gen_len > engine->max_seq_len())
    return InvalidArgument("--prompt-len + --gen-len exceeds the context of " + std::to_string(engine->max_seq_len()));

  // Both outlive the serving loop (declared first, destroyed last): the engine keeps pointers.
  std::unique_ptr<placement::TraceRoutingOverride> trace_override;
  std::unique_ptr<cache::CachedExpertSource> expert_cache;
  if (!o.routing_trace.empty()) {
    EF_ASSIGN_OR_RETURN(placement::RoutingTrace trace, placement::ReadRoutingTrace(o.routing_trace));
    auto ov = placement::TraceRoutingOverride::Create(std::move(trace), cfg);
    if (!ov.ok()) {
      Status s = ov.status();
      s.Prepend("--routing-trace " + o.routing_trace);
      return s;
    }
    trace_override = std::move(ov).value();
    engine->AddRoutingHook(trace_override->Hook());
  }
  if (o.cache_slots_per_layer > 0) {
    cache::CachedExpertSourceOptions co;
    co.slots_per_layer = o.cache_slots_per_layer;
    co.policy = o.cache_policy;
    co.prefetch_layers = o.prefetch_layers;
    co.async = o.cache_async;
    EF_ASSIGN_OR_RETURN(expert_cache, cache::CachedExpertSource::Create(engine->weights(), &engine->backend(), co));
    engine->SetExpertSource(expert_cache.get());
    if (trace_override && o.prefetch_layers > 0) {
      // Oracle forecast: the experts the current rows will use at the next D MoE layers.
      std::vector<int> moe_layers;
      for (int l = 0; l < cfg.num_layers; ++l)
        if (cfg.IsMoeLayer(l)) moe_layers.push_back(l);
      const placement::RoutingTrace* tr = &trace_override->trace();
      cache::CachedExpertSource* src = expert_cache.get();
      const int depth = o.prefetch_layers;
      trace_override->set_on_override([tr, src, moe_layers, depth](int moe_layer, size_t first, int num_tokens) {
        const size_t n = tr->tokens.size();
        for (int d = 1; d <= depth && moe_layer + d < static_cast<int>(moe_layers.size()); ++d) {
          std::vector<int32_t> experts;
          for (int i = 0; i < num_tokens; ++i)
            for (int j = 0; j < tr->top_k(); ++j) experts.push_back(tr->expert((first + i) % n, moe_layer + d, j));
          std::sort(experts.begin(), experts.end());
          experts.erase(std::unique(experts.begin(), experts.end()), experts.end());
          src->SetUpcoming(moe_layers[moe_layer + d], std::move(experts));
        }
      });
    }
  } else if (o.prefetch_layers > 0 || o.cache_policy != "lru" || o.cache_async) {
    return InvalidArgument("--cache-policy, --prefetch-layers and --cache-async need --cache-slots-per-layer > 0");
  }
  ServerMetrics metrics(cfg.num_layers, cfg.num_experts);
  ServingLoopOptions lo;
  lo.max_batch = o.max_batch;
  runtime::Engine* engine_ptr = engine.get();  // owned by the loop; used after Stop() to detach the cache
  ServingLoop loop(std::move(engine), tok, &metrics, lo);

  std::printf("# expertflow bench  git %s  build %s  compiler %s\n", EF_GIT_SHA, EF_BUILD_TYPE, EF_CXX_COMPILER);
  std::printf("# model %s (%s layers, %d experts, top-%d, hidden %d, expert FFN %d)  backend %s  device %d\n",
              model_dir.c_str(), std::to_string(cfg.num_layers).c_str(), cfg.num_experts, cfg.top_k, cfg.hidden_size,
              cfg.moe_intermediate_size, o.model.backend.c_str(), o.model.device);
  if (!o.synthetic.empty()) {
    std::printf("# synthetic %s: random bf16 weights (seed %llu), %d layers, scale 1/%d\n", shape.name.c_str(),
                static_cast<unsigned long long>(o.synthetic_seed), shape.num_layers, shape.scale);
    if (!shape.note.empty()) std::printf("# %s\n", shape.note.c_str());
  }
  if (trace_override)
    std::printf("# routing from trace %s (%zu tokens)\n", o.routing_trace.c_str(),
                trace_override->trace().tokens.size());
  if (expert_cache)
    std::printf("# expert cache: %d of %d slots per MoE layer (%.0f%%), policy %s, prefetch %d layers%s%s, %s\n",
                o.cache_slots_per_layer, cfg.num_experts, 100.0 * o.cache_slots_per_layer / cfg.num_experts,
                o.cache_policy.c_str(), o.prefetch_layers,
                trace_override && o.prefetch_layers > 0 ? " (trace oracle forecast)" : "",
                !trace_override && o.prefetch_layers > 0 ? " (no forecast: no trace)" : "",
                o.cache_async ? "async loads" : "sync loads");
  std::printf(
      "# workload: %d requests, concurrency %d, prompt %d tokens, generate %d tokens, max batch %d, seed %llu\n",
      o.num_requests, o.concurrency, o.prompt_len, o.gen_len, o.max_batch, static_cast<unsigned long long>(o.seed));
  if (std::string(EF_BUILD_TYPE) == "Debug") std::printf("# WARNING: debug build; numbers are not representative\n");
  std::fflush(stdout);

  std::vector<std::vector<int32_t>> prompts(o.num_requests);
  std::mt19937_64 rng(o.seed);
  std::uniform_int_distribution<int32_t> pick(3, cfg.vocab_size - 1);
  for (auto& p : prompts)
    for (int i = 0; i < o.prompt_len; ++i) p.push_back(pick(rng));

  std::vector<double> ttft(o.num_requests, 0), itl(o.num_requests, 0), latency(o.num_requests, 0);
  std::vector<int> generated(o.num_requests, 0);
  std::atomic<int> next{0}, done{0}, failed{0};
  std::string first_error;
  std::mutex err_mu;
  const auto t0 = Clock::now();
  auto client = [&] {
    for (int i; (i = next.fetch_add(1)) < o.num_requests;) {
      ServeRequest r;
      r.prompt = prompts[i];
      r.max_new_tokens = o.gen_len;
      r.ignore_eos = true;
      const auto start = Clock::now();
      auto stream = loop.Submit(std::move(r));
      if (!stream.ok()) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (first_error.empty()) first_error = stream.status().ToString();
        ++failed;
        continue;
      }
      Clock::time_point first{}, last{};
      StreamUpdate u;
      int seen = 0;
      do {
        u = (*stream)->Take(std::chrono::milliseconds(1000));
        if (u.num_tokens > seen) {
          last = Clock::now();
          if (seen == 0) first = last;
          seen = u.num_tokens;
        }
      } while (!u.done);
      if (!u.error.ok()) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (first_error.empty()) first_error = u.error.ToString();
        ++failed;
        continue;
      }
      generated[i] = u.num_tokens;
      ttft[i] = std::chrono::duration<double>(first - start).count();
      latency[i] = std::chrono::duration<double>(last - start).count();
      itl[i] = u.num_tokens > 1 ? std::chrono::duration<double>(last - first).count() / (u.num_tokens - 1) : 0;
      ++done;
    }
  };
  std::vector<std::thread> clients;
  for (int c = 0; c < o.concurrency; ++c) clients.emplace_back(client);
  // Progress line on long runs (stderr, so the table on stdout stays clean).
  auto last_print = Clock::now();
  while (done.load() + failed.load() < o.num_requests) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (Clock::now() - last_print > std::chrono::seconds(2)) {
      last_print = Clock::now();
      std::fprintf(stderr, "\r# progress: %d/%d requests, %.1f s", done.load(), o.num_requests,
                   std::chrono::duration<double>(last_print - t0).count());
      std::fflush(stderr);
    }
  }
  for (auto& t : clients) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  loop.Stop();
  // The cache's slots live in the engine's backend: detach and free them while it exists (the
  // loop, declared last, destroys the engine first).
  cache::ExpertStoreStats cs;
  if (expert_cache) {
    cs = expert_cache->stats();
    engine_ptr->SetExpertSource(nullptr);
    expert_cache.reset();
  }
  if (failed.load() > 0) return Internal(std::to_string(failed.load()) + " requests failed; first: " + first_error);
  std::fprintf(stderr, "\r%60s\r", "");

  int64_t gen_tokens = 0;
  for (int g : generated) gen_tokens += g;
  const double out_tps = static_cast<double>(gen_tokens) / wall;
  const double total_tps = static_cast<double>(gen_tokens + int64_t{o.prompt_len} * o.num_requests) / wall;
  // Routing balance: per MoE layer, the busiest expert's share relative to a uniform share.
  double worst_imbalance = 0;
  int64_t routed = 0;
  json per_layer = json::array();
  for (int l = 0; l < cfg.num_layers; ++l) {
    int64_t sum = 0, mx = 0;
    json counts = json::array();
    for (int e = 0; e < cfg.num_experts; ++e) {
      const int64_t n = metrics.expert_tokens(l, e);
      counts.push_back(n);
      sum += n;
      mx = std::max(mx, n);
    }
    routed += sum;
    const double imb = sum > 0 ? static_cast<double>(mx) * cfg.num_experts / static_cast<double>(sum) : 0;
    worst_imbalance = std::max(worst_imbalance, imb);
    per_layer.push_back({{"layer", l}, {"expert_tokens", counts}, {"max_over_mean", imb}});
  }
  const double rss_mib = static_cast<double>(PeakRssBytes()) / (1 << 20);
  const bool cached = o.cache_slots_per_layer > 0;
  const double hit_rate = cached ? cs.hit_rate() : 1.0;
  const double moved_mib = static_cast<double>(cs.total.bytes_from_host) / (1 << 20);
  const double stall_ms = static_cast<double>(cs.total.stall_ns) * 1e-6;

  std::printf("%8s %5s %6s %6s %10s %10s %9s %9s %9s %9s %9s %10s %9s %8s %10s %9s\n", "requests", "conc", "prompt",
              "gen", "out_tok/s", "all_tok/s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "wall", "peak_rss",
              "exp_imbal", "hit_rate", "moved", "stall");
  std::printf("%8s %5s %6s %6s %10s %10s %9s %9s %9s %9s %9s %10s %9s %8s %10s %9s\n", "", "", "tok", "tok", "", "",
              "ms", "ms", "ms", "ms", "s", "MiB", "max/mean", "", "MiB", "ms");
  std::printf("%8d %5d %6d %6d %10.1f %10.1f %9.2f %9.2f %9.3f %9.3f %9.2f %10.1f %9.2f %8.4f %10.1f %9.1f\n",
              o.num_requests, o.concurrency, o.prompt_len, o.gen_len, out_tps, total_tps, 1e3 * Percentile(ttft, 0.5),
              1e3 * Percentile(ttft, 0.99), 1e3 * Percentile(itl, 0.5), 1e3 * Percentile(itl, 0.99), wall, rss_mib,
              worst_imbalance, hit_rate, moved_mib, stall_ms);
  std::printf(
      "# %lld tokens generated, %lld expert assignments routed; exp_imbal = busiest expert / mean, worst layer\n",
      static_cast<long long>(gen_tokens), static_cast<long long>(routed));
  if (cached)
    std::printf(
        "# cache: %lld hits, %lld misses, prefetch %lld issued / %lld used / %lld wasted; moved = bytes loaded "
        "into slots, stall = Acquire time waiting for loads\n",
        static_cast<long long>(cs.total.hits), static_cast<long long>(cs.total.misses),
        static_cast<long long>(cs.total.prefetch_issued), static_cast<long long>(cs.total.prefetch_used),
        static_cast<long long>(cs.total.prefetch_wasted));
  else
    std::printf("# no expert cache: every expert resident (hit_rate 1, nothing moved)\n");

  if (!o.json_path.empty()) {
    json j = {{"git_sha", EF_GIT_SHA},
              {"build_type", EF_BUILD_TYPE},
              {"compiler", EF_CXX_COMPILER},
              {"model", model_dir},
              {"model_shape",
               {{"num_layers", cfg.num_layers},
                {"num_moe_layers", cfg.num_moe_layers()},
                {"num_experts", cfg.num_experts},
                {"top_k", cfg.top_k},
                {"hidden_size", cfg.hidden_size},
                {"moe_intermediate_size", cfg.moe_intermediate_size}}},
              {"synthetic", o.synthetic.empty() ? json(nullptr)
                                                : json{{"shape", shape.name},
                                                       {"layers", shape.num_layers},
                                                       {"scale", shape.scale},
                                                       {"seed", o.synthetic_seed},
                                                       {"note", shape.note}}},
              {"routing_trace", o.routing_trace},
              {"cache",
               {{"enabled", cached},
                {"slots_per_layer", cached ? o.cache_slots_per_layer : cfg.num_experts},
                {"budget_fraction", cached ? static_cast<double>(o.cache_slots_per_layer) / cfg.num_experts : 1.0},
                {"policy", cached ? o.cache_policy : "none"},
                {"prefetch_layers", o.prefetch_layers},
                {"async", o.cache_async},
                {"hits", cs.total.hits},
                {"misses", cs.total.misses},
                {"prefetch_issued", cs.total.prefetch_issued},
                {"prefetch_used", cs.total.prefetch_used},
                {"prefetch_wasted", cs.total.prefetch_wasted},
                {"bytes_from_host", cs.total.bytes_from_host},
                {"stall_ms", stall_ms}}},
              {"ranks", 1},
              {"backend", o.model.backend},
              {"device", o.model.device},
              {"workload",
               {{"num_requests", o.num_requests},
                {"concurrency", o.concurrency},
                {"prompt_len", o.prompt_len},
                {"gen_len", o.gen_len},
                {"max_batch", o.max_batch},
                {"seed", o.seed}}},
              {"results",
               {{"output_tokens_per_s", out_tps},
                {"total_tokens_per_s", total_tps},
                {"ttft_ms_p50", 1e3 * Percentile(ttft, 0.5)},
                {"ttft_ms_p99", 1e3 * Percentile(ttft, 0.99)},
                {"itl_ms_p50", 1e3 * Percentile(itl, 0.5)},
                {"itl_ms_p99", 1e3 * Percentile(itl, 0.99)},
                {"wall_s", wall},
                {"peak_rss_mib", rss_mib},
                {"generated_tokens", gen_tokens},
                {"hit_rate", hit_rate},
                {"bytes_moved", cs.total.bytes_from_host},
                {"stall_ms", stall_ms},
                {"expert_imbalance_max_over_mean", worst_imbalance}}},
              {"routing", per_layer}};
    std::ofstream out(o.json_path);
    if (!out) return NotFound("cannot write " + o.json_path);
    out << j.dump(2) << "\n";
  }
  return Status::Ok();
}

}  // namespace

Command AddBenchCommand(CLI::App& root) {
  auto o = std::make_shared<BenchOptions>();
  Command c;
  c.app = root.add_subcommand("bench", "Offline closed-loop benchmark of a workload on the real engine");
  o->model.Register(c.app);
  c.app->add_option("-n,--num-requests", o->num_requests, "requests in the workload")->capture_default_str();
  c.app->add_option("-c,--concurrency", o->concurrency, "requests in flight (closed loop)")->capture_default_str();
  c.app->add_option("--prompt-len", o->prompt_len, "prompt tokens per request")->capture_default_str();
  c.app->add_option("--gen-len", o->gen_len, "generated tokens per request")->capture_default_str();
  c.app->add_option("--max-batch", o->max_batch, "sequences in the running batch")->capture_default_str();
  c.app->add_option("--seed", o->seed, "seed of the synthetic prompts")->capture_default_str();
  c.app->add_option("--json,-J", o->json_path, "also write the record as JSON to this file");
  c.app->add_option("--synthetic", o->synthetic, "random weights of a real model's shape instead of --model")
      ->check(CLI::IsMember(SyntheticShapeNames()));
  c.app->add_option("--synthetic-layers", o->synthetic_layers, "layers of the synthetic model (0: the shape's)")
      ->check(CLI::NonNegativeNumber);
  c.app->add_option("--synthetic-scale", o->synthetic_scale, "divide hidden/FFN/vocab sizes by this (CPU runs)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c.app->add_option("--synthetic-seed", o->synthetic_seed, "seed of the synthetic weights")->capture_default_str();
  c.app->add_option("--synthetic-dir", o->synthetic_dir, "where synthetic checkpoints are cached")
      ->default_str(DefaultSyntheticRoot());
  c.app->add_option("--routing-trace", o->routing_trace, "take every MoE layer's experts from this routing trace");
  c.app
      ->add_option("--cache-slots-per-layer", o->cache_slots_per_layer,
                   "serve experts from a cache of this many slots per MoE layer (0: all resident)")
      ->check(CLI::NonNegativeNumber);
  c.app->add_option("--cache-policy", o->cache_policy, "eviction policy: lru | lfu | expertflow | static")
      ->capture_default_str();
  c.app->add_option("--prefetch-layers", o->prefetch_layers, "MoE layers the cache prefetches ahead (needs a forecast)")
      ->check(CLI::NonNegativeNumber);
  c.app->add_flag("--cache-async", o->cache_async, "load misses and prefetches on the store's worker thread");
  c.run = [o] {
    Status s = RunBench(*o);
    return s.ok() ? 0 : ReportError(s);
  };
  return c;
}

}  // namespace ef::launch
