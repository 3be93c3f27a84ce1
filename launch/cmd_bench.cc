// `expertflow bench`: offline benchmark of a closed-loop workload on the real engine.
//
//   expertflow bench --model DIR -n 64 -c 8 --prompt-len 32 --gen-len 32 [--json OUT.json]
//   expertflow bench --synthetic mixtral-8x7b --synthetic-scale 64 --routing-trace T.jsonl
//                    --cache-slots-per-layer 4 --cache-policy expertflow --prefetch-layers 1
//
// --synthetic SHAPE writes (once, cached) a seeded random-weight checkpoint of a real model's
// shape (launch/synthetic_model.h) and benchmarks it through the normal loader; --synthetic-scale
// divides hidden/FFN sizes for CPU runs. --routing-trace makes every MoE layer take its experts
// from a recorded trace (its layers, experts and top-k must match the model: an error otherwise).
// --cache-device-budget (a size, 'N slots' or 'N slots per layer'; with --cache-policy,
// --prefetch-layers, --predictor, or the config's cache:/predictor: sections) serves experts from
// the expert cache (launch/expert_cache_setup.h: device slots on CUDA, an arena on the CPU); the
// experts are then not uploaded at load, so a model larger than the GPU runs. --oracle-prefetch
// replaces the predictor by the trace's true routing: the next layers' experts to prefetch, and this
// step's and the next step's experts as the expertflow policy's forecast (an upper bound for a
// predictor, labelled as such). The table and JSON carry the hit rate, bytes moved into slots and
// the stall time waiting for them.
//
// Under mpirun (`mpirun -np R expertflow bench ...`) every rank runs its own requests through its
// own serving loop (data-parallel attention) while the MoE layers are expert-parallel across the
// ranks (comm::Cluster, as for generate/score); -n and -c are per rank, so the workload grows with
// R (weak scaling). All ranks draw the same R x n requests; --assign decides which rank runs each:
// round_robin (request i on rank i mod R) or locality (scheduler::RankAssigner: a request goes
// where the experts its tokens route to are computed, so fewer hidden states cross ranks; needs
// --routing-trace, whose routing is then the oracle forecast). Under mpirun trace routing is keyed
// by (request, position) (placement::TraceKeying::kSequence), so a request routes the same on any
// rank. Rank 0 prints the table over all ranks, with all-to-all bytes per token.
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

#include "cache/expert_cache.h"
#include "comm/cluster.h"
#include "comm/mpi_context.h"
#include "launch/command.h"
#include "launch/config.h"
#include "launch/engine_options.h"
#include "launch/expert_cache_setup.h"
#include "launch/server/server_metrics.h"
#include "launch/server/serving_loop.h"
#include "launch/synthetic_model.h"
#include "placement/trace_routing_override.h"
#include "runtime/core/build_info.h"
#include "runtime/tokenizer/tokenizer.h"
#include "scheduler/expert_path_set.h"
#include "scheduler/rank_assigner.h"

namespace ef::launch {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

struct BenchOptions {
  ModelFlags model;
  ClusterFlags cluster;
  std::string assign = "round_robin";  // request -> rank under mpirun: round_robin | locality
  double assign_max_imbalance = 1.25;  // locality: most requests' tokens on a rank / the mean
  std::string routing_key = "auto";    // trace keying: auto | stream | sequence
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
  bool oracle_prefetch = false;  // the trace's future routing as the cache's forecast
  int regroup_window = 0;        // admission regrouping over this many batches (0: FIFO)
  int max_wait_steps = 16;
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

// One rank's results, gathered to rank 0 as JSON.
struct RankResult {
  double wall_s = 0;
  int64_t generated = 0;
  int64_t prompt_tokens = 0;
  int requests = 0;
  std::vector<double> ttft, itl;
  std::vector<int64_t> expert_tokens;  // [layer * E + expert]
  AdmissionStats admission;
};

json ToJson(const RankResult& r) {
  return {{"wall_s", r.wall_s},
          {"generated", r.generated},
          {"prompt_tokens", r.prompt_tokens},
          {"requests", r.requests},
          {"ttft", r.ttft},
          {"itl", r.itl},
          {"expert_tokens", r.expert_tokens},
          {"admission",
           {r.admission.rounds, r.admission.fcfs_distinct, r.admission.regrouped_distinct, r.admission.forced,
            r.admission.max_overtaken, r.admission.scheduler_us}}};
}

RankResult FromJson(const json& j) {
  RankResult r;
  r.wall_s = j["wall_s"].get<double>();
  r.generated = j["generated"].get<int64_t>();
  r.prompt_tokens = j["prompt_tokens"].get<int64_t>();
  r.requests = j["requests"].get<int>();
  r.ttft = j["ttft"].get<std::vector<double>>();
  r.itl = j["itl"].get<std::vector<double>>();
  r.expert_tokens = j["expert_tokens"].get<std::vector<int64_t>>();
  const json& a = j["admission"];
  r.admission = {a[0].get<int64_t>(), a[1].get<int64_t>(), a[2].get<int64_t>(),
                 a[3].get<int64_t>(), a[4].get<int64_t>(), a[5].get<double>()};
  return r;
}

// The rank of every request: round robin, or locality from the requests' trace routing.
StatusOr<std::vector<int>> AssignRequests(const BenchOptions& o, int num_requests, int ranks,
                                          const runtime::ModelConfig& cfg, const placement::TraceRoutingOverride* trace,
                                          const comm::ExpertPlacement* placement) {
  std::vector<int> rank(num_requests);
  if (o.assign == "round_robin" || ranks == 1) {
    for (int i = 0; i < num_requests; ++i) rank[i] = i % ranks;
    return rank;
  }
  if (!trace || trace->keying() != placement::TraceKeying::kSequence)
    return InvalidArgument("--assign locality needs --routing-trace (its routing is the forecast) under mpirun");
  // Rows: every token of every request (prompt and generation), with its trace routing.
  const int len = o.prompt_len + o.gen_len;
  std::vector<size_t> indices;
  indices.reserve(static_cast<size_t>(num_requests) * len);
  std::vector<std::vector<int>> units(num_requests);
  for (int i = 0; i < num_requests; ++i)
    for (int p = 0; p < len; ++p) {
      units[i].push_back(static_cast<int>(indices.size()));
      indices.push_back(trace->TokenFor(i + 1, p));
    }
  EF_ASSIGN_OR_RETURN(scheduler::ExpertPathSet paths, scheduler::ExpertPathSet::FromTrace(trace->trace(), indices));
  placement::BatchPlan plan;
  plan.num_layers = cfg.num_moe_layers();
  plan.num_experts = cfg.num_experts;
  plan.num_ranks = ranks;
  plan.num_tokens = paths.num_tokens();
  plan.compute_ranks.resize(static_cast<size_t>(plan.num_layers) * plan.num_experts);
  for (int l = 0, m = 0; l < cfg.num_layers; ++l) {
    if (!cfg.IsMoeLayer(l)) continue;
    for (int e = 0; e < cfg.num_experts; ++e) {
      std::vector<int>& rs = plan.compute_ranks[static_cast<size_t>(m) * cfg.num_experts + e];
      for (int src = 0; src < ranks; ++src) {
        const int r = placement->ComputeRank(l, e, src);
        if (std::find(rs.begin(), rs.end(), r) == rs.end()) rs.push_back(r);
      }
    }
    ++m;
  }
  scheduler::RankAssigner assigner(scheduler::RankAssignerOptions{o.assign_max_imbalance});
  EF_ASSIGN_OR_RETURN(std::vector<int> row_rank, assigner.Assign(paths, plan, units));
  for (int i = 0; i < num_requests; ++i) rank[i] = row_rank[units[i][0]];
  return rank;
}

Status RunBench(const BenchOptions& given, comm::MpiContext* ctx) {
  // The config file's routing section fills what the command line left out.
  BenchOptions o = given;
  const Config& file = o.cluster.config;
  if (o.routing_trace.empty() && file.has("routing.replay")) o.routing_trace = file.routing.replay;
  const std::string trace_origin = given.routing_trace.empty() ? "routing.replay" : "--routing-trace";
  if (o.routing_key == "auto" && file.has("routing.key")) o.routing_key = file.routing.key;
  if (o.num_requests < 1 || o.concurrency < 1 || o.prompt_len < 1 || o.gen_len < 1)
    return InvalidArgument("-n, -c, --prompt-len and --gen-len must be >= 1");
  const bool distributed = ctx->mpi() && ctx->size() > 1;
  const int ranks = distributed ? ctx->size() : 1, me = distributed ? ctx->rank() : 0;
  const bool root = me == 0;
  const Config& config = o.cluster.config;  // the cache and predictor sections, flags applied
  const bool want_cache = WantsExpertCache(config.cache);
  if (o.oracle_prefetch && (!want_cache || o.routing_trace.empty()))
    return InvalidArgument("--oracle-prefetch needs --cache-device-budget and --routing-trace");
  // Long collective steps (writing a synthetic checkpoint, loading it) wait longer than a step.
  const double step_timeout = ctx->timeout_s();
  auto long_barrier = [&](const std::string& what) -> Status {
    if (!distributed) return Status::Ok();
    ctx->set_timeout_s(std::max(step_timeout, 3600.0));
    Status s = ctx->Barrier(what);
    ctx->set_timeout_s(step_timeout);
    return s;
  };

  std::string model_dir = o.model.dir;
  runtime::EngineOptions eo = o.model.ToEngineOptions();
  eo.upload_experts = !want_cache;  // the cache uploads what its budget holds
  SyntheticShape shape;
  if (!o.synthetic.empty()) {
    EF_ASSIGN_OR_RETURN(shape, FindSyntheticShape(o.synthetic));
    EF_ASSIGN_OR_RETURN(shape, ScaleSyntheticShape(shape, o.synthetic_layers, o.synthetic_scale));
    const std::string root_dir = o.synthetic_dir.empty() ? DefaultSyntheticRoot() : o.synthetic_dir;
    // Rank 0 writes the checkpoint once; the others then find it cached.
    if (root) {
      EF_ASSIGN_OR_RETURN(model_dir, WriteSyntheticCheckpoint(shape, o.synthetic_seed, root_dir));
    }
    EF_RETURN_IF_ERROR(long_barrier("the synthetic checkpoint written by rank 0"));
    if (!root) {
      EF_ASSIGN_OR_RETURN(model_dir, WriteSyntheticCheckpoint(shape, o.synthetic_seed, root_dir));
    }
    // Real shapes allow 32k+ positions; size the KV cache to the workload instead.
    if (eo.max_seq_len == 0) eo.max_seq_len = o.prompt_len + o.gen_len;
  }
  EF_ASSIGN_OR_RETURN(runtime::Tokenizer tok, runtime::Tokenizer::FromModelDir(model_dir));
  EF_ASSIGN_OR_RETURN(auto engine, runtime::Engine::Create(model_dir, eo));
  const runtime::ModelConfig cfg = engine->config();
  if (o.prompt_len + o.gen_len > engine->max_seq_len())
    return InvalidArgument("--prompt-len + --gen-len exceeds the context of " + std::to_string(engine->max_seq_len()));

  // These outlive the serving loop (declared first, destroyed last): the engine keeps pointers.
  std::unique_ptr<placement::TraceRoutingOverride> trace_override;
  std::unique_ptr<comm::Cluster> cluster;
  std::unique_ptr<cache::ExpertCache> expert_cache;  // reads the cluster's host shards: goes first
  placement::TraceKeying keying = placement::TraceKeying::kStream;
  if (o.routing_key == "sequence" || (o.routing_key == "auto" && (distributed || o.assign == "locality")))
    keying = placement::TraceKeying::kSequence;
  if (!o.routing_trace.empty()) {
    EF_ASSIGN_OR_RETURN(placement::RoutingTrace trace, placement::ReadRoutingTrace(o.routing_trace));
    auto ov = placement::TraceRoutingOverride::Create(std::move(trace), cfg, keying);
    if (!ov.ok()) {
      Status s = ov.status();
      s.Prepend(trace_origin + " " + o.routing_trace);
      return s;
    }
    trace_override = std::move(ov).value();
    engine->AddRoutingHook(trace_override->Hook());
  }
  if (distributed) {
    EF_RETURN_IF_ERROR(long_barrier("every rank's model load"));
    comm::ClusterOptions co = o.cluster.cluster;
    co.expert_cache = want_cache;  // every rank's own cache, backed by the ranks' host shards
    co.host_budget_bytes = config.cache.host_budget;
    EF_ASSIGN_OR_RETURN(cluster, comm::Cluster::Create(ctx, engine.get(), co));
  }
  if (want_cache) {
    PredictorSection predictor = config.predictor;
    if (o.oracle_prefetch) predictor.kind = "none";  // the oracle below is the forecast
    EF_ASSIGN_OR_RETURN(expert_cache,
                        SetUpExpertCache(engine.get(), config.cache, predictor,
                                         trace_override ? &trace_override->trace() : nullptr, cluster.get(), me));
    if (o.oracle_prefetch && expert_cache->active()) {
      if (keying != placement::TraceKeying::kStream)
        return InvalidArgument("--oracle-prefetch needs --routing-key stream (one rank)");
      // Oracle forecast: the experts the current rows will use at the next D MoE layers (prefetch),
      // and for the expertflow policy this step's and the next step's routing (the next step taken
      // as the same number of following rows: exact for decode at concurrency 1).
      std::vector<int> moe_layers;
      for (int l = 0; l < cfg.num_layers; ++l)
        if (cfg.IsMoeLayer(l)) moe_layers.push_back(l);
      const placement::RoutingTrace* tr = &trace_override->trace();
      cache::ExpertCache* cache = expert_cache.get();
      const int depth = std::max(1, config.cache.prefetch_layers);
      const size_t slots = static_cast<size_t>(expert_cache->budget().slots_per_layer);
      const int decoder_layers = cfg.num_layers, num_experts = cfg.num_experts;
      trace_override->set_on_override([tr, cache, moe_layers, depth, slots, decoder_layers, num_experts](
                                          int moe_layer, size_t first, int num_tokens) {
        const size_t n = tr->tokens.size();
        if (moe_layer == 0 && cache->store() != nullptr) {
          placement::RoutingForecast f(2, decoder_layers, num_experts);
          for (int t = 0; t < 2; ++t)
            for (int i = 0; i < num_tokens; ++i)
              for (int m = 0; m < static_cast<int>(moe_layers.size()); ++m)
                for (int j = 0; j < tr->top_k(); ++j)
                  f.row(t, moe_layers[m])[tr->expert((first + static_cast<size_t>(t) * num_tokens + i) % n, m, j)] =
                      1.f;
          cache->store()->SetForecast(f);
        }
        for (int d = 1; d <= depth && moe_layer + d < static_cast<int>(moe_layers.size()); ++d) {
          std::vector<int32_t> experts;
          for (int i = 0; i < num_tokens; ++i)
            for (int j = 0; j < tr->top_k(); ++j) experts.push_back(tr->expert((first + i) % n, moe_layer + d, j));
          std::sort(experts.begin(), experts.end());
          experts.erase(std::unique(experts.begin(), experts.end()), experts.end());
          // A set larger than the layer's slots (a prefill batch) would only evict its own
          // members: the layer loads on demand instead.
          if (experts.size() > slots) experts.clear();
          cache->SetUpcoming(moe_layers[moe_layer + d], std::move(experts));
        }
      });
    }
  }

  // The same R x n requests on every rank; this rank runs those assigned to it.
  const int total_requests = o.num_requests * ranks;
  std::vector<std::vector<int32_t>> prompts(total_requests);
  std::mt19937_64 rng(o.seed);
  std::uniform_int_distribution<int32_t> pick(3, cfg.vocab_size - 1);
  for (auto& p : prompts)
    for (int i = 0; i < o.prompt_len; ++i) p.push_back(pick(rng));
  EF_ASSIGN_OR_RETURN(std::vector<int> request_rank, AssignRequests(o, total_requests, ranks, cfg, trace_override.get(),
                                                                    cluster ? &cluster->placement() : nullptr));
  std::vector<int> mine;
  for (int i = 0; i < total_requests; ++i)
    if (request_rank[i] == me) mine.push_back(i);

  ServerMetrics metrics(cfg.num_layers, cfg.num_experts);
  ServingLoopOptions lo;
  lo.max_batch = o.max_batch;
  if (o.regroup_window > 1) {
    if (!trace_override || keying != placement::TraceKeying::kSequence)
      return InvalidArgument(
          "--regroup-window needs --routing-trace with --routing-key sequence (the trace's routing of each prompt is "
          "the forecast)");
    // Oracle forecast of a prompt's experts: its positions' trace routing (sequence keyed).
    const placement::TraceRoutingOverride* ov = trace_override.get();
    const int layers = ov->trace().num_layers(), experts = ov->trace().num_experts(), k = ov->trace().top_k();
    lo.regroup_window = o.regroup_window;
    lo.max_wait_steps = o.max_wait_steps;
    lo.forecast_layers = layers;
    lo.forecast_experts = experts;
    lo.forecast = [ov, layers, experts, k](const ServeRequest& r, uint64_t* row) {
      for (int p = 0; p < static_cast<int>(r.prompt.size()); ++p) {
        const size_t t = ov->TokenFor(r.seq_id, p);
        for (int l = 0; l < layers; ++l)
          for (int j = 0; j < k; ++j) {
            const int bit = l * experts + ov->trace().expert(t, l, j);
            row[bit / 64] |= uint64_t{1} << (bit % 64);
          }
      }
    };
  }
  ServingLoop loop(engine.get(), tok, &metrics, lo);

  if (root) {
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
      std::printf("# routing from trace %s (%zu tokens), keyed by %s\n", o.routing_trace.c_str(),
                  trace_override->trace().tokens.size(),
                  keying == placement::TraceKeying::kSequence ? "(request, position)" : "row order");
    if (expert_cache)
      std::printf("# %s%s\n", expert_cache->Describe().c_str(),
                  o.oracle_prefetch ? "; forecast = the trace's true routing of the next layers (oracle)" : "");
    if (distributed)
      std::printf(
          "# %d ranks (expert-parallel MoE, data-parallel attention), exchange %s, placement %s, "
          "requests assigned %s\n",
          ranks, cluster->Stats()["exchange"].get<std::string>().c_str(), cluster->placement().Describe().c_str(),
          o.assign.c_str());
    std::printf(
        "# workload: %d requests per rank, concurrency %d per rank, prompt %d tokens, generate %d tokens, max batch "
        "%d, seed %llu\n",
        o.num_requests, o.concurrency, o.prompt_len, o.gen_len, o.max_batch, static_cast<unsigned long long>(o.seed));
    if (std::string(EF_BUILD_TYPE) == "Debug") std::printf("# WARNING: debug build; numbers are not representative\n");
    std::fflush(stdout);
  }

  const int n_mine = static_cast<int>(mine.size());
  RankResult res;
  res.requests = n_mine;
  std::vector<double> ttft(n_mine, 0), itl(n_mine, 0);
  std::vector<int> generated(n_mine, 0);
  std::atomic<int> next{0}, done{0}, failed{0};
  std::string first_error;
  std::mutex err_mu;
  EF_RETURN_IF_ERROR(long_barrier("the start of the timed run"));
  const auto t0 = Clock::now();
  auto client = [&] {
    for (int k; (k = next.fetch_add(1)) < n_mine;) {
      const int i = mine[k];
      ServeRequest r;
      r.prompt = prompts[i];
      r.max_new_tokens = o.gen_len;
      r.ignore_eos = true;
      r.seq_id = i + 1;  // the request's routing key
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
      generated[k] = u.num_tokens;
      ttft[k] = std::chrono::duration<double>(first - start).count();
      itl[k] = u.num_tokens > 1 ? std::chrono::duration<double>(last - first).count() / (u.num_tokens - 1) : 0;
      ++done;
    }
  };
  std::vector<std::thread> clients;
  for (int c = 0; c < o.concurrency; ++c) clients.emplace_back(client);
  // Progress line on long runs (stderr, so the table on stdout stays clean).
  auto last_print = Clock::now();
  while (done.load() + failed.load() < n_mine) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (root && Clock::now() - last_print > std::chrono::seconds(2)) {
      last_print = Clock::now();
      std::fprintf(stderr, "\r# progress: %d/%d requests%s, %.1f s", done.load(), n_mine,
                   distributed ? " on rank 0" : "", std::chrono::duration<double>(last_print - t0).count());
      std::fflush(stderr);
    }
  }
  for (auto& t : clients) t.join();
  res.wall_s = std::chrono::duration<double>(Clock::now() - t0).count();
  loop.Stop();
  res.admission = loop.admission_stats();
  // A failed forward pass ends the run with its own error (the other ranks then time out waiting
  // for this one and name it), not with a drain that cannot match their exchange.
  if (Status f = loop.fatal_error(); !f.ok()) return f;
  // This rank is done: keep joining the other ranks' expert-parallel steps until all are.
  json comm_stats;
  if (cluster) {
    EF_RETURN_IF_ERROR(cluster->Drain());
    const json cache_json = expert_cache ? expert_cache->StatsJson() : json{{"active", false}};
    EF_ASSIGN_OR_RETURN(comm_stats, cluster->GatherStats({{"expert_cache", cache_json}}));
    EF_RETURN_IF_ERROR(cluster->Shutdown());
  }
  // The cache's slots live in the engine's backend: detach and free them while it exists (the
  // engine, declared first, goes last), and before the cluster whose shards back it.
  cache::ExpertStoreStats cs;
  const cache::CacheBudget cache_budget = expert_cache ? expert_cache->budget() : cache::CacheBudget{};
  std::string cache_summary;
  if (expert_cache) {
    cs = expert_cache->stats();
    cache_summary = expert_cache->StatsSummary();
    expert_cache.reset();  // detaches from the engine
  }
  cluster.reset();
  if (root && distributed && cs.total.hits + cs.total.misses > 0) {
    // Every rank's cache: the table's hit rate and bytes are over all ranks.
    cs.total = {};
    for (const json& r : comm_stats["ranks"]) {
      const json& c = r["expert_cache"];
      if (!c.value("active", false)) continue;
      cs.total.hits += c["hits"].get<int64_t>();
      cs.total.misses += c["misses"].get<int64_t>();
      cs.total.prefetch_issued += c["prefetch_issued"].get<int64_t>();
      cs.total.prefetch_used += c["prefetch_used"].get<int64_t>();
      cs.total.bytes_from_host += c["bytes_loaded"].get<int64_t>();
    }
    cache_summary = "rank 0: " + cache_summary + " (the table: all ranks)";
  }
  if (failed.load() > 0) return Internal(std::to_string(failed.load()) + " requests failed; first: " + first_error);
  if (root) std::fprintf(stderr, "\r%60s\r", "");

  for (int k = 0; k < n_mine; ++k) res.generated += generated[k];
  res.prompt_tokens = int64_t{o.prompt_len} * n_mine;
  res.ttft = ttft;
  res.itl = itl;
  res.expert_tokens.resize(static_cast<size_t>(cfg.num_layers) * cfg.num_experts);
  for (int l = 0; l < cfg.num_layers; ++l)
    for (int e = 0; e < cfg.num_experts; ++e)
      res.expert_tokens[static_cast<size_t>(l) * cfg.num_experts + e] = metrics.expert_tokens(l, e);
  std::vector<RankResult> all = {res};
  if (distributed) {
    const std::string bytes = ToJson(res).dump();
    EF_ASSIGN_OR_RETURN(auto gathered, ctx->GatherBytesToRoot({bytes.data(), bytes.size()}, "the bench results"));
    if (!root) return Status::Ok();
    all.clear();
    for (const auto& b : gathered) all.push_back(FromJson(json::parse(std::string(b.begin(), b.end()))));
  }

  // Over all ranks: tokens / slowest rank's wall time; latency percentiles over every request.
  int64_t gen_tokens = 0, prompt_tokens = 0;
  double wall = 0;
  std::vector<double> all_ttft, all_itl;
  std::vector<int64_t> expert_tokens(static_cast<size_t>(cfg.num_layers) * cfg.num_experts, 0);
  json per_rank = json::array();
  AdmissionStats adm;
  for (const RankResult& r : all) {
    adm.rounds += r.admission.rounds;
    adm.fcfs_distinct += r.admission.fcfs_distinct;
    adm.regrouped_distinct += r.admission.regrouped_distinct;
    adm.forced += r.admission.forced;
    adm.max_overtaken = std::max(adm.max_overtaken, r.admission.max_overtaken);
    adm.scheduler_us += r.admission.scheduler_us;
    gen_tokens += r.generated;
    prompt_tokens += r.prompt_tokens;
    wall = std::max(wall, r.wall_s);
    all_ttft.insert(all_ttft.end(), r.ttft.begin(), r.ttft.end());
    all_itl.insert(all_itl.end(), r.itl.begin(), r.itl.end());
    for (size_t i = 0; i < expert_tokens.size(); ++i) expert_tokens[i] += r.expert_tokens[i];
    per_rank.push_back({{"requests", r.requests}, {"generated_tokens", r.generated}, {"wall_s", r.wall_s}});
  }
  const double out_tps = static_cast<double>(gen_tokens) / wall;
  const double total_tps = static_cast<double>(gen_tokens + prompt_tokens) / wall;
  const int64_t a2a_bytes = distributed ? comm_stats["a2a_bytes"].get<int64_t>() : 0;
  const double a2a_per_token = gen_tokens + prompt_tokens > 0
                                   ? static_cast<double>(a2a_bytes) / static_cast<double>(gen_tokens + prompt_tokens)
                                   : 0;
  // Routing balance: per MoE layer, the busiest expert's share relative to a uniform share.
  double worst_imbalance = 0;
  int64_t routed = 0;
  json per_layer = json::array();
  for (int l = 0; l < cfg.num_layers; ++l) {
    int64_t sum = 0, mx = 0;
    json counts = json::array();
    for (int e = 0; e < cfg.num_experts; ++e) {
      const int64_t n = expert_tokens[static_cast<size_t>(l) * cfg.num_experts + e];
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
  const bool cached = cs.total.hits + cs.total.misses > 0;
  const int slots_per_layer = cached ? cache_budget.slots_per_layer : cfg.num_experts;
  const double hit_rate = cached ? cs.hit_rate() : 1.0;
  const double moved_mib = static_cast<double>(cs.total.bytes_from_host) / (1 << 20);
  const double stall_ms = static_cast<double>(cs.total.stall_ns) * 1e-6;

  std::printf("%5s %8s %5s %6s %6s %10s %10s %9s %9s %9s %9s %9s %10s %9s %8s %10s %9s %10s\n", "ranks", "requests",
              "conc", "prompt", "gen", "out_tok/s", "all_tok/s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "wall",
              "peak_rss", "exp_imbal", "hit_rate", "moved", "stall", "a2a");
  std::printf("%5s %8s %5s %6s %6s %10s %10s %9s %9s %9s %9s %9s %10s %9s %8s %10s %9s %10s\n", "", "", "/rank", "tok",
              "tok", "", "", "ms", "ms", "ms", "ms", "s", "MiB", "max/mean", "", "MiB", "ms", "B/tok");
  std::printf(
      "%5d %8d %5d %6d %6d %10.1f %10.1f %9.2f %9.2f %9.3f %9.3f %9.2f %10.1f %9.2f %8.4f %10.1f %9.1f %10.0f\n", ranks,
      total_requests, o.concurrency, o.prompt_len, o.gen_len, out_tps, total_tps, 1e3 * Percentile(all_ttft, 0.5),
      1e3 * Percentile(all_ttft, 0.99), 1e3 * Percentile(all_itl, 0.5), 1e3 * Percentile(all_itl, 0.99), wall, rss_mib,
      worst_imbalance, hit_rate, moved_mib, stall_ms, a2a_per_token);
  std::printf(
      "# %lld tokens generated, %lld expert assignments routed; exp_imbal = busiest expert / mean, worst layer\n",
      static_cast<long long>(gen_tokens), static_cast<long long>(routed));
  if (distributed)
    std::printf(
        "# all-to-all: %lld bytes sent over all ranks (%.0f per prompt or generated token); %.1f output "
        "tok/s per rank; peak_rss is rank 0's\n",
        static_cast<long long>(a2a_bytes), a2a_per_token, out_tps / ranks);
  if (distributed) {
    std::printf("# rows computed per rank over the run: max/mean %.3f (placement_mode %s)\n",
                comm_stats["rows_computed_max_over_mean"].get<double>(),
                comm_stats["placement_mode"].get<std::string>().c_str());
    if (comm_stats.contains("planned")) {
      const json& p = comm_stats["planned"];
      std::printf(
          "# planned: per MoE layer step, busiest rank's rows / mean %.3f (bound %.2f; the static plan of the same "
          "rows: %.3f), over %lld layer steps; %lld of %lld rows computed on their token's rank instead\n",
          p["rows_max_over_mean"].get<double>(), p["max_imbalance_bound"].get<double>(),
          p["static_rows_max_over_mean"].get<double>(), static_cast<long long>(p["layer_steps"].get<int64_t>()),
          static_cast<long long>(p["rows_moved_to_source"].get<int64_t>()),
          static_cast<long long>(p["rows"].get<int64_t>()));
    }
  }
  if (o.regroup_window > 1)
    std::printf(
        "# admission regrouping (window %d, starvation bound %d rounds): %lld rounds with a queue; distinct "
        "(layer, expert) per admitted batch %.2f FIFO -> %.2f regrouped (%+.1f%%); %lld forced by the bound; at most "
        "%lld rounds overtaken; %.1f us per round\n",
        o.regroup_window, o.max_wait_steps, static_cast<long long>(adm.rounds),
        adm.rounds ? static_cast<double>(adm.fcfs_distinct) / adm.rounds : 0.0,
        adm.rounds ? static_cast<double>(adm.regrouped_distinct) / adm.rounds : 0.0,
        adm.fcfs_distinct ? 100.0 * (static_cast<double>(adm.regrouped_distinct) / adm.fcfs_distinct - 1) : 0.0,
        static_cast<long long>(adm.forced), static_cast<long long>(adm.max_overtaken),
        adm.rounds ? adm.scheduler_us / adm.rounds : 0.0);
  if (cached)
    std::printf("# %s; moved = bytes loaded into slots, stall = time waiting for loads\n", cache_summary.c_str());
  else
    std::printf("# no expert cache: every expert resident (hit_rate 1, nothing moved)\n");

  if (!o.json_path.empty()) {
    json j = {
        {"git_sha", EF_GIT_SHA},
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
          {"slots_per_layer", slots_per_layer},
          {"budget_fraction", static_cast<double>(slots_per_layer) / cfg.num_experts},
          {"policy", cached ? config.cache.policy : "none"},
          {"prefetch_layers", cached ? config.cache.prefetch_layers : 0},
          {"predictor", cached ? (o.oracle_prefetch ? "oracle" : config.predictor.kind) : "none"},
          {"hits", cs.total.hits},
          {"misses", cs.total.misses},
          {"prefetch_issued", cs.total.prefetch_issued},
          {"prefetch_used", cs.total.prefetch_used},
          {"prefetch_wasted", cs.total.prefetch_wasted},
          {"bytes_from_host", cs.total.bytes_from_host},
          {"stall_ms", stall_ms}}},
        {"ranks", ranks},
        {"assignment", o.assign},
        {"assign_max_imbalance", o.assign == "locality" ? nlohmann::json(o.assign_max_imbalance) : nlohmann::json()},
        {"admission",
         {{"regroup_window", o.regroup_window},
          {"max_wait_steps", o.max_wait_steps},
          {"rounds", adm.rounds},
          {"fcfs_distinct_per_round", adm.rounds ? static_cast<double>(adm.fcfs_distinct) / adm.rounds : 0.0},
          {"regrouped_distinct_per_round", adm.rounds ? static_cast<double>(adm.regrouped_distinct) / adm.rounds : 0.0},
          {"forced", adm.forced},
          {"max_rounds_overtaken", adm.max_overtaken},
          {"scheduler_us_per_round", adm.rounds ? adm.scheduler_us / adm.rounds : 0.0}}},
        {"per_rank", per_rank},
        {"comm", distributed ? comm_stats : json(nullptr)},
        {"backend", o.model.backend},
        {"device", o.model.device},
        {"workload",
         {{"num_requests", total_requests},
          {"requests_per_rank", o.num_requests},
          {"concurrency", o.concurrency},
          {"prompt_len", o.prompt_len},
          {"gen_len", o.gen_len},
          {"max_batch", o.max_batch},
          {"seed", o.seed}}},
        {"results",
         {{"output_tokens_per_s", out_tps},
          {"total_tokens_per_s", total_tps},
          {"ttft_ms_p50", 1e3 * Percentile(all_ttft, 0.5)},
          {"ttft_ms_p99", 1e3 * Percentile(all_ttft, 0.99)},
          {"itl_ms_p50", 1e3 * Percentile(all_itl, 0.5)},
          {"itl_ms_p99", 1e3 * Percentile(all_itl, 0.99)},
          {"wall_s", wall},
          {"peak_rss_mib", rss_mib},
          {"generated_tokens", gen_tokens},
          {"hit_rate", hit_rate},
          {"bytes_moved", cs.total.bytes_from_host},
          {"stall_ms", stall_ms},
          {"output_tokens_per_s_per_rank", out_tps / ranks},
          {"a2a_bytes", a2a_bytes},
          {"a2a_bytes_per_token", a2a_per_token},
          {"rows_computed_max_over_mean", distributed ? comm_stats["rows_computed_max_over_mean"] : json(nullptr)},
          {"planned_rows_max_over_mean",
           distributed && comm_stats.contains("planned") ? comm_stats["planned"]["rows_max_over_mean"] : json(nullptr)},
          {"planned_static_rows_max_over_mean", distributed && comm_stats.contains("planned")
                                                    ? comm_stats["planned"]["static_rows_max_over_mean"]
                                                    : json(nullptr)},
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
  c.app->add_option("-n,--num-requests", o->num_requests, "requests in the workload (per rank under mpirun)")
      ->capture_default_str();
  c.app->add_option("-c,--concurrency", o->concurrency, "requests in flight, closed loop (per rank under mpirun)")
      ->capture_default_str();
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
  c.app->add_option("--routing-trace", o->routing_trace,
                    "take every MoE layer's experts from this routing trace (routing.replay)");
  c.app
      ->add_option("--regroup-window", o->regroup_window,
                   "admit waiting requests regrouped over this many batches so each prefill batch needs fewer "
                   "experts (0/1: FIFO; forecast = the trace's routing of each prompt)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  c.app
      ->add_option(
          "--max-wait-steps", o->max_wait_steps,
          "starvation bound of admission regrouping: admission rounds a request may be overtaken by younger ones")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c.app->add_flag("--oracle-prefetch", o->oracle_prefetch,
                  "the cache's forecast is the trace's true routing: the next layers' experts are prefetched, the next "
                  "step's are kept (an upper bound)");
  c.app
      ->add_option("--assign", o->assign,
                   "which rank runs each request under mpirun: round_robin, or locality (where its experts are "
                   "computed; needs --routing-trace)")
      ->check(CLI::IsMember({"round_robin", "locality"}))
      ->capture_default_str();
  c.app
      ->add_option("--assign-max-imbalance", o->assign_max_imbalance,
                   "locality: at most this many times the mean tokens on a rank (>= 1; a closed loop runs as fast "
                   "as its busiest rank)")
      ->check(CLI::Range(1.0, 100.0))
      ->capture_default_str();
  c.app
      ->add_option("--routing-key", o->routing_key,
                   "trace routing per token row in order (stream) or per (request, position) (sequence); auto: "
                   "sequence under mpirun or with --assign locality, else stream")
      ->check(CLI::IsMember({"auto", "stream", "sequence"}))
      ->capture_default_str();
  o->cluster.Register(c.app, /*short_config=*/false);
  CLI::App* app = c.app;
  c.run = [o, app] {
    return RunDistributed(*app, &o->model, &o->cluster, [o](comm::MpiContext* ctx) { return RunBench(*o, ctx); });
  };
  return c;
}

}  // namespace ef::launch
