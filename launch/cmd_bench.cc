// `expertflow bench`: offline benchmark of a closed-loop workload on the real engine.
//
//   expertflow bench --model DIR -n 64 -c 8 --prompt-len 32 --gen-len 32 [--json OUT.json]
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

#include "launch/command.h"
#include "launch/engine_options.h"
#include "launch/server/server_metrics.h"
#include "launch/server/serving_loop.h"
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
  EF_ASSIGN_OR_RETURN(runtime::Tokenizer tok, runtime::Tokenizer::FromModelDir(o.model.dir));
  EF_ASSIGN_OR_RETURN(auto engine, runtime::Engine::Create(o.model.dir, o.model.ToEngineOptions()));
  const runtime::ModelConfig cfg = engine->config();
  if (o.prompt_len + o.gen_len > engine->max_seq_len())
    return InvalidArgument("--prompt-len + --gen-len exceeds the context of " + std::to_string(engine->max_seq_len()));
  ServerMetrics metrics(cfg.num_layers, cfg.num_experts);
  ServingLoopOptions lo;
  lo.max_batch = o.max_batch;
  ServingLoop loop(std::move(engine), tok, &metrics, lo);

  std::printf("# expertflow bench  git %s  build %s  compiler %s\n", EF_GIT_SHA, EF_BUILD_TYPE, EF_CXX_COMPILER);
  std::printf("# model %s (%s layers, %d experts, top-%d)  backend %s  device %d\n", o.model.dir.c_str(),
              std::to_string(cfg.num_layers).c_str(), cfg.num_experts, cfg.top_k, o.model.backend.c_str(),
              o.model.device);
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

  std::printf("%8s %5s %6s %6s %10s %10s %9s %9s %9s %9s %9s %10s %9s\n", "requests", "conc", "prompt", "gen",
              "out_tok/s", "all_tok/s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "wall", "peak_rss", "exp_imbal");
  std::printf("%8s %5s %6s %6s %10s %10s %9s %9s %9s %9s %9s %10s %9s\n", "", "", "tok", "tok", "", "", "ms", "ms",
              "ms", "ms", "s", "MiB", "max/mean");
  std::printf("%8d %5d %6d %6d %10.1f %10.1f %9.2f %9.2f %9.3f %9.3f %9.2f %10.1f %9.2f\n", o.num_requests,
              o.concurrency, o.prompt_len, o.gen_len, out_tps, total_tps, 1e3 * Percentile(ttft, 0.5),
              1e3 * Percentile(ttft, 0.99), 1e3 * Percentile(itl, 0.5), 1e3 * Percentile(itl, 0.99), wall, rss_mib,
              worst_imbalance);
  std::printf(
      "# %lld tokens generated, %lld expert assignments routed; exp_imbal = busiest expert / mean, worst layer\n",
      static_cast<long long>(gen_tokens), static_cast<long long>(routed));

  if (!o.json_path.empty()) {
    json j = {{"git_sha", EF_GIT_SHA},
              {"build_type", EF_BUILD_TYPE},
              {"compiler", EF_CXX_COMPILER},
              {"model", o.model.dir},
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
  c.run = [o] {
    Status s = RunBench(*o);
    return s.ok() ? 0 : ReportError(s);
  };
  return c;
}

}  // namespace ef::launch
