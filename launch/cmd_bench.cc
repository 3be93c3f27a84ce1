// `expertflow bench`: offline benchmark of a closed-loop workload on the real engine.
//
//   expertflow bench --model DIR -n 64 -c 8 --prompt-len 32 --gen-len 32 [--json OUT.json]
//   expertflow bench --synthetic mixtral-8x7b --synthetic-scale 64 --routing-trace T.jsonl
//                    --cache-slots-per-layer 4 --cache-policy expertflow --prefetch-layers 1
//
// --synthetic SHAPE writes (once, cached) a seeded random-weight checkpoint of a real model's
// shape (launch/synthetic_model.h) and benchmarks it through the normal loader; --synthetic-scale
// divides hidden/FFN sizes for CPU runs; --synthetic-in-memory generates the weights in host memory
// instead of writing them (shapes larger than the disk), --synthetic-distinct-layers N with it
// generates N layers and repeats their bytes in the others. --routing-trace makes every MoE layer take its experts
// from a recorded trace (its layers, experts and top-k must match the model: an error otherwise).
// --cache-device-budget (a size, 'N slots', 'N slots per layer' or 'P%'; with --cache-policy,
// --prefetch-layers, --predictor, or the config's cache:/predictor: sections) serves experts from
// the expert cache (launch/expert_cache_setup.h: device slots on CUDA, an arena on the CPU), built
// with the engine and cluster by launch/deployment.h as for every command; the
// experts are then not uploaded at load, so a model larger than the GPU runs. --oracle-prefetch
// replaces the predictor by the trace's true routing: the next layers' experts to prefetch, and this
// step's and the next step's experts as the expertflow policy's forecast (an upper bound for a
// predictor, labelled as such). The config file's scheduler section (max_batch_requests,
// max_prefill_tokens, regroup_window) fills what the command line leaves out. The table and JSON carry the hit rate
// (expert uses a resident slot served; experts computed on the host under cache.cpu_compute count as uses not served),
// bytes moved into slots and the stall time waiting for them.
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
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <thread>

#include "cache/expert_cache.h"
#include "comm/cluster.h"
#include "comm/mpi_context.h"
#include "launch/cli_checks.h"
#include "launch/command.h"
#include "launch/config.h"
#include "launch/deployment.h"
#include "launch/engine_options.h"
#include "launch/expert_cache_setup.h"
#include "launch/server/server_metrics.h"
#include "launch/server/serving_loop.h"
#include "launch/synthetic_model.h"
#include "placement/trace_routing_override.h"
#include "runtime/core/build_info.h"
#include "runtime/core/limits.h"
#include "runtime/core/logging.h"
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
  int max_prefill_tokens = 0;
  uint64_t seed = 1;
  runtime::SamplingParams sampling;  // temperature 0: greedy (each request's seed: --seed + its index)
  std::string json_path;
  // Synthetic weights (empty: --model).
  std::string synthetic;
  int synthetic_layers = 0;  // 0: the shape's
  int synthetic_scale = 1;
  uint64_t synthetic_seed = 1;
  std::string synthetic_dir;  // empty: DefaultSyntheticRoot()
  bool synthetic_in_memory = false;
  int synthetic_distinct_layers = 0;  // with synthetic_in_memory; 0: all
  // Routing and expert cache.
  std::string routing_trace;
  bool oracle_prefetch = false;                           // the trace's future routing as the cache's forecast
  int warmup_tokens = DeploymentOptions{}.warmup_tokens;  // Deployment's warm-up (0: none)
  int regroup_window = 0;                                 // admission regrouping over this many batches (0: FIFO)
  bool regroup_window_from_file = false;                  // scheduler.regroup_window, not the flag
  int max_wait_steps = 16;
};

// The config file's scheduler section where the command line left an option out (as `serve`).
void ApplySchedulerSection(const CLI::App& app, BenchOptions* o) {
  const Config& f = o->cluster.config;
  if (!FlagGiven(app, "--max-batch") && f.has("scheduler.max_batch_requests"))
    o->max_batch = f.scheduler.max_batch_requests;
  if (!FlagGiven(app, "--max-prefill-tokens") && f.has("scheduler.max_prefill_tokens"))
    o->max_prefill_tokens = f.scheduler.max_prefill_tokens;
  if (!FlagGiven(app, "--regroup-window") && f.has("scheduler.regroup_window")) {
    o->regroup_window = f.scheduler.regroup_window;
    o->regroup_window_from_file = true;
  }
}

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
  if (o.assign == "locality" && ranks == 1)
    EF_LOG(WARN, SCHED, "--assign locality places requests on ranks under mpirun; in one process it does nothing");
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

// The run's effective options and this process's place in it.
struct BenchRun {
  BenchOptions o;            // the command line; the config file's routing section fills what it left out
  std::string trace_origin;  // where o.routing_trace came from, for its errors
  comm::MpiContext* ctx = nullptr;
  double step_timeout_s = 0;  // the context's timeout at the start (one step's exchange)
  bool distributed = false;   // under mpirun with more than one rank
  int ranks = 1;
  int me = 0;
  bool root = true;
  bool want_cache = false;  // cache.device_budget is set
  placement::TraceKeying keying = placement::TraceKeying::kStream;
  const Config& config() const { return o.cluster.config; }  // the cache and predictor sections, flags applied
};

StatusOr<BenchRun> ResolveRun(const BenchOptions& given, comm::MpiContext* ctx) {
  BenchRun b;
  b.o = given;
  BenchOptions& o = b.o;
  const Config& file = o.cluster.config;
  if (o.routing_trace.empty() && file.has("routing.replay")) o.routing_trace = file.routing.replay;
  b.trace_origin = given.routing_trace.empty() ? "routing.replay" : "--routing-trace";
  if (o.routing_key == "auto" && file.has("routing.key")) o.routing_key = file.routing.key;
  if (o.num_requests < 1 || o.concurrency < 1 || o.prompt_len < 1 || o.gen_len < 1)
    return InvalidArgument("-n, -c, --prompt-len and --gen-len must be >= 1");
  if (Status s = o.sampling.Validate(); !s.ok()) return s.Prepend("--temperature / --top-p / --top-k");
  if ((o.synthetic_in_memory || o.synthetic_distinct_layers != 0) && o.synthetic.empty())
    return InvalidArgument("--synthetic-in-memory and --synthetic-distinct-layers need --synthetic SHAPE");
  if (o.synthetic_distinct_layers != 0 && !o.synthetic_in_memory)
    return InvalidArgument(
        "--synthetic-distinct-layers needs --synthetic-in-memory (a written checkpoint has every layer)");
  b.ctx = ctx;
  b.step_timeout_s = ctx->timeout_s();
  b.distributed = ctx->mpi() && ctx->size() > 1;
  b.ranks = b.distributed ? ctx->size() : 1;
  b.me = b.distributed ? ctx->rank() : 0;
  b.root = b.me == 0;
  b.want_cache = WantsExpertCache(b.config().cache);
  if (o.oracle_prefetch && (!b.want_cache || o.routing_trace.empty()))
    return InvalidArgument("--oracle-prefetch needs --cache-device-budget and --routing-trace");
  if (o.routing_key == "sequence" || (o.routing_key == "auto" && (b.distributed || o.assign == "locality")))
    b.keying = placement::TraceKeying::kSequence;
  if (o.regroup_window > 1 && o.regroup_window_from_file &&
      (o.routing_trace.empty() || b.keying != placement::TraceKeying::kSequence)) {
    // From the config file: without a forecast there is nothing to regroup on; admit in order.
    if (b.root)
      EF_LOG(WARN, SCHED,
             "scheduler.regroup_window %d has no effect without a routing trace keyed by sequence (--routing-trace, "
             "--routing-key sequence: each prompt's trace routing is the forecast): admission stays FIFO",
             o.regroup_window);
    o.regroup_window = 0;
  }
  return b;
}

// Long collective steps (writing a synthetic checkpoint, loading it) wait longer than a step.
Status LongBarrier(const BenchRun& b, const std::string& what) {
  if (!b.distributed) return Status::Ok();
  b.ctx->set_timeout_s(std::max(b.step_timeout_s, 3600.0));
  Status s = b.ctx->Barrier(what);
  b.ctx->set_timeout_s(b.step_timeout_s);
  return s;
}

// What the run builds, in the order it builds it. Members are destroyed in reverse, after the
// serving loop: the deployment tears down cache, cluster and engine (launch/deployment.h), and the
// engine holds the trace override's hook, so the override goes last.
struct BenchParts {
  std::string model_dir;
  SyntheticShape shape;         // with --synthetic
  SyntheticInMemory in_memory;  // with --synthetic-in-memory: the weights
  std::optional<runtime::Tokenizer> tokenizer;
  std::unique_ptr<placement::TraceRoutingOverride> trace_override;
  std::unique_ptr<Deployment> deployment;
  // The deployment's parts (cluster and cache null when not built).
  runtime::Engine* engine = nullptr;
  comm::Cluster* cluster = nullptr;
  cache::ExpertCache* expert_cache = nullptr;
};

// The checkpoint (--model, or a synthetic one rank 0 writes once) and its tokenizer.
Status ResolveModel(const BenchRun& b, BenchParts* p) {
  const BenchOptions& o = b.o;
  p->model_dir = o.model.dir;
  if (!o.synthetic.empty()) {
    EF_ASSIGN_OR_RETURN(p->shape, FindSyntheticShape(o.synthetic));
    EF_ASSIGN_OR_RETURN(p->shape, ScaleSyntheticShape(p->shape, o.synthetic_layers, o.synthetic_scale));
    const std::string root_dir = o.synthetic_dir.empty() ? DefaultSyntheticRoot() : o.synthetic_dir;
    if (o.synthetic_in_memory) {  // every rank generates its own copy; only the config goes to disk
      EF_ASSIGN_OR_RETURN(p->in_memory,
                          BuildSyntheticCheckpoint(p->shape, o.synthetic_seed, root_dir, o.synthetic_distinct_layers));
      p->model_dir = p->in_memory.dir;
      EF_ASSIGN_OR_RETURN(p->tokenizer, runtime::Tokenizer::FromModelDir(p->model_dir));
      return Status::Ok();
    }
    // Rank 0 writes the checkpoint once; the others then find it cached.
    if (b.root) {
      EF_ASSIGN_OR_RETURN(p->model_dir, WriteSyntheticCheckpoint(p->shape, o.synthetic_seed, root_dir));
    }
    EF_RETURN_IF_ERROR(LongBarrier(b, "the synthetic checkpoint written by rank 0"));
    if (!b.root) {
      EF_ASSIGN_OR_RETURN(p->model_dir, WriteSyntheticCheckpoint(p->shape, o.synthetic_seed, root_dir));
    }
  }
  EF_ASSIGN_OR_RETURN(p->tokenizer, runtime::Tokenizer::FromModelDir(p->model_dir));
  return Status::Ok();
}

// With a routing trace, every MoE layer takes its experts from it (a hook the cache must see first).
Status LoadRoutingTrace(const BenchRun& b, BenchParts* p) {
  if (b.o.routing_trace.empty()) return Status::Ok();
  EF_ASSIGN_OR_RETURN(placement::RoutingTrace trace, placement::ReadRoutingTrace(b.o.routing_trace));
  EF_ASSIGN_OR_RETURN(const runtime::ModelConfig config, runtime::ModelConfig::FromModelDir(p->model_dir));
  auto ov = placement::TraceRoutingOverride::Create(std::move(trace), config, b.keying);
  if (!ov.ok()) {
    Status s = ov.status();
    s.Prepend(b.trace_origin + " " + b.o.routing_trace);
    return s;
  }
  p->trace_override = std::move(ov).value();
  return Status::Ok();
}

// --oracle-prefetch: the trace's true routing is the cache's forecast. The experts the current rows
// will use at the next D MoE layers are prefetched, and for the expertflow policy this step's and
// the next step's routing is the forecast (the next step taken as the same number of following
// rows: exact for decode at concurrency 1).
Status InstallOraclePrefetch(const BenchRun& b, BenchParts* p) {
  if (b.keying != placement::TraceKeying::kStream)
    return InvalidArgument("--oracle-prefetch needs --routing-key stream (one rank)");
  const runtime::ModelConfig& cfg = p->engine->config();
  const std::vector<int> moe_layers = cfg.MoeLayers();
  const placement::RoutingTrace* tr = &p->trace_override->trace();
  cache::ExpertCache* cache = p->expert_cache;
  const int depth = std::max(1, b.config().cache.prefetch_layers);
  const cache::CacheBudget budget = cache->budget();
  const int decoder_layers = cfg.num_layers, num_experts = cfg.num_experts;
  p->trace_override->set_on_override([tr, cache, moe_layers, depth, budget, decoder_layers, num_experts](
                                         int moe_layer, size_t first, int num_tokens) {
    const size_t n = tr->tokens.size();
    if (moe_layer == 0 && cache->store() != nullptr) {
      placement::RoutingForecast f(2, decoder_layers, num_experts);
      for (int t = 0; t < 2; ++t)
        for (int i = 0; i < num_tokens; ++i)
          for (int m = 0; m < static_cast<int>(moe_layers.size()); ++m)
            for (int j = 0; j < tr->top_k(); ++j)
              f.row(t, moe_layers[m])[tr->expert((first + static_cast<size_t>(t) * num_tokens + i) % n, m, j)] = 1.f;
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
      if (experts.size() > static_cast<size_t>(budget.slots(moe_layers[moe_layer + d]))) experts.clear();
      cache->SetUpcoming(moe_layers[moe_layer + d], std::move(experts));
    }
  });
  return Status::Ok();
}

// The deployment every command builds (engine, then under mpirun the cluster, then with
// cache.device_budget this rank's expert cache), with the trace override's hook installed first.
Status Deploy(const BenchRun& b, BenchParts* p) {
  const BenchOptions& o = b.o;
  DeploymentOptions d;
  d.model_dir = p->model_dir;
  d.model_dtype = b.config().model.dtype;
  d.engine = o.model.ToEngineOptions();
  d.engine.checkpoint = p->in_memory.checkpoint;  // null unless --synthetic-in-memory
  // Real shapes allow 32k+ positions; size a synthetic model's KV cache to the workload instead.
  if (!o.synthetic.empty() && d.engine.max_seq_len == 0) d.engine.max_seq_len = o.prompt_len + o.gen_len;
  d.engine.allow_untrained_positions = !o.synthetic.empty();  // random weights: positions mean nothing
  d.cache = b.config().cache;
  d.predictor = b.config().predictor;
  if (o.oracle_prefetch) d.predictor.kind = "none";  // the oracle is the forecast
  d.cluster = o.cluster.cluster;
  d.cluster_on_one_rank = false;  // one rank runs without the cluster, as the table's ranks column says
  placement::TraceRoutingOverride* ov = p->trace_override.get();
  if (ov) {
    d.trace = &ov->trace();
    d.on_engine = [ov](runtime::Engine& engine) {
      engine.AddRoutingHook(ov->Hook());
      return Status::Ok();
    };
  }
  d.announce = false;  // the header names the cache
  d.warmup_tokens = o.warmup_tokens;
  EF_ASSIGN_OR_RETURN(p->deployment, Deployment::Create(b.ctx, d));
  p->engine = &p->deployment->engine();
  p->cluster = p->deployment->cluster();
  p->expert_cache = p->deployment->cache();
  if (o.prompt_len + o.gen_len > p->engine->max_seq_len())
    return InvalidArgument("--prompt-len + --gen-len exceeds the context of " +
                           std::to_string(p->engine->max_seq_len()));
  if (o.oracle_prefetch && p->expert_cache && p->expert_cache->active())
    EF_RETURN_IF_ERROR(InstallOraclePrefetch(b, p));
  return Status::Ok();
}

// The same R x n seeded prompts on every rank.
std::vector<std::vector<int32_t>> MakePrompts(const BenchOptions& o, int num_requests, int vocab_size) {
  std::vector<std::vector<int32_t>> prompts(num_requests);
  std::mt19937_64 rng(o.seed);
  std::uniform_int_distribution<int32_t> pick(3, vocab_size - 1);
  for (auto& p : prompts)
    for (int i = 0; i < o.prompt_len; ++i) p.push_back(pick(rng));
  return prompts;
}

// The requests (indices into the prompts) this rank runs.
StatusOr<std::vector<int>> RequestsOfThisRank(const BenchRun& b, const BenchParts& p, int num_requests) {
  EF_ASSIGN_OR_RETURN(std::vector<int> request_rank,
                      AssignRequests(b.o, num_requests, b.ranks, p.engine->config(), p.trace_override.get(),
                                     p.cluster ? &p.cluster->placement() : nullptr));
  std::vector<int> mine;
  for (int i = 0; i < num_requests; ++i)
    if (request_rank[i] == b.me) mine.push_back(i);
  return mine;
}

// The serving loop's options; with --regroup-window, admission regrouping whose forecast of a
// prompt's experts is its positions' trace routing (sequence keyed).
StatusOr<ServingLoopOptions> MakeLoopOptions(const BenchRun& b, const BenchParts& p) {
  ServingLoopOptions lo;
  lo.max_batch = b.o.max_batch;
  lo.max_prefill_tokens = b.o.max_prefill_tokens;
  if (b.o.regroup_window <= 1) return lo;
  if (!p.trace_override || b.keying != placement::TraceKeying::kSequence)
    return InvalidArgument(
        "--regroup-window needs --routing-trace with --routing-key sequence (the trace's routing of each prompt is "
        "the forecast)");
  const placement::TraceRoutingOverride* ov = p.trace_override.get();
  const int layers = ov->trace().num_layers(), experts = ov->trace().num_experts(), k = ov->trace().top_k();
  lo.regroup_window = b.o.regroup_window;
  lo.max_wait_steps = b.o.max_wait_steps;
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
  return lo;
}

const char* KvCacheDTypeName(const runtime::Engine& e) { return e.kv_cache_dtype() == DType::kBF16 ? "bf16" : "fp32"; }

// The '#' header (rank 0): build, model, routing, cache, ranks, workload.
void PrintHeader(const BenchRun& b, const BenchParts& p) {
  const BenchOptions& o = b.o;
  const runtime::ModelConfig& cfg = p.engine->config();
  std::printf("# expertflow bench  git %s  build %s  compiler %s\n", EF_GIT_SHA, EF_BUILD_TYPE, EF_CXX_COMPILER);
  std::printf("# model %s (%s layers, %d experts, top-%d, hidden %d, expert FFN %d)  backend %s  device %d\n",
              p.model_dir.c_str(), std::to_string(cfg.num_layers).c_str(), cfg.num_experts, cfg.top_k, cfg.hidden_size,
              cfg.moe_intermediate_size, p.engine->backend().name().c_str(), o.model.device);
  std::printf("# kv cache %s (kv_cache_dtype %s), attention %s\n", KvCacheDTypeName(*p.engine),
              o.model.kv_cache_dtype.c_str(), p.engine->reduced_precision_attention() ? "bf16" : "fp32");
  if (!o.synthetic.empty()) {
    std::printf("# synthetic %s: random %s weights (seed %llu), %d layers, scale 1/%d\n", p.shape.name.c_str(),
                SyntheticWeightFormat(p.shape).c_str(), static_cast<unsigned long long>(o.synthetic_seed),
                p.shape.num_layers, p.shape.scale);
    if (p.in_memory.checkpoint)
      std::printf("# weights generated in host memory (%.1f MiB): %d distinct layers, the others repeat their bytes\n",
                  static_cast<double>(p.in_memory.host_bytes) / (1 << 20), p.in_memory.distinct_layers);
    if (!p.shape.note.empty()) std::printf("# %s\n", p.shape.note.c_str());
  }
  if (p.trace_override)
    std::printf("# routing from trace %s (%zu tokens), keyed by %s\n", o.routing_trace.c_str(),
                p.trace_override->trace().tokens.size(),
                b.keying == placement::TraceKeying::kSequence ? "(request, position)" : "row order");
  if (p.expert_cache)
    std::printf("# %s%s\n", p.expert_cache->Describe().c_str(),
                o.oracle_prefetch ? "; forecast = the trace's true routing of the next layers (oracle)" : "");
  if (b.distributed)
    std::printf(
        "# %d ranks (expert-parallel MoE, data-parallel attention), exchange %s, placement %s, "
        "requests assigned %s\n",
        b.ranks, p.cluster->Stats()["exchange"].get<std::string>().c_str(), p.cluster->placement().Describe().c_str(),
        o.assign.c_str());
  std::printf(
      "# workload: %d requests per rank, concurrency %d per rank, prompt %d tokens, generate %d tokens, max batch "
      "%d, seed %llu\n",
      o.num_requests, o.concurrency, o.prompt_len, o.gen_len, o.max_batch, static_cast<unsigned long long>(o.seed));
  if (std::string(EF_BUILD_TYPE) == "Debug") std::printf("# WARNING: debug build; numbers are not representative\n");
  std::fflush(stdout);
}

// One request's times, seen by the client that submitted it.
struct RequestTiming {
  int generated = 0;
  double ttft_s = 0;
  double itl_s = 0;
};

// Submits one request and waits for its last token.
Status RunRequest(ServingLoop& loop, ServeRequest r, RequestTiming* timing) {
  const auto start = Clock::now();
  auto stream = loop.Submit(std::move(r));
  if (!stream.ok()) return stream.status();
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
  if (!u.error.ok()) return u.error;
  timing->generated = u.num_tokens;
  timing->ttft_s = std::chrono::duration<double>(first - start).count();
  timing->itl_s = u.num_tokens > 1 ? std::chrono::duration<double>(last - first).count() / (u.num_tokens - 1) : 0;
  return Status::Ok();
}

// Requests that failed on their own; reported once the run is torn down.
struct RequestFailures {
  int count = 0;
  std::string first;
};

// The timed run: o.concurrency client threads each submit one of this rank's requests, wait for its
// last token and submit the next. Fills the times, tokens and admission counters of the result
// (not expert_tokens); stops the loop. Errors: the loop's fatal error (a failed forward pass).
StatusOr<RankResult> RunRequests(const BenchRun& b, ServingLoop& loop, const std::vector<std::vector<int32_t>>& prompts,
                                 const std::vector<int>& mine, RequestFailures* failures) {
  const int n_mine = static_cast<int>(mine.size());
  std::vector<RequestTiming> timing(n_mine);
  std::atomic<int> next{0}, done{0}, failed{0};
  std::mutex err_mu;
  EF_RETURN_IF_ERROR(LongBarrier(b, "the start of the timed run"));
  const auto t0 = Clock::now();
  // The run ends when the last client's last request does (not when the progress loop below,
  // which sleeps 100 ms at a time, notices it).
  std::vector<Clock::time_point> client_end(static_cast<size_t>(b.o.concurrency), t0);
  auto client = [&](int c) {
    for (int k; (k = next.fetch_add(1)) < n_mine;) {
      const int i = mine[k];
      ServeRequest r;
      r.prompt = prompts[i];
      r.max_new_tokens = b.o.gen_len;
      r.ignore_eos = true;
      r.sampling = b.o.sampling;
      r.sampling.seed = b.o.seed + static_cast<uint64_t>(i);
      r.seq_id = i + 1;  // the request's routing key
      if (Status s = RunRequest(loop, std::move(r), &timing[k]); !s.ok()) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (failures->first.empty()) failures->first = s.ToString();
        ++failed;
        continue;
      }
      ++done;
    }
    client_end[static_cast<size_t>(c)] = Clock::now();
  };
  std::vector<std::thread> clients;
  for (int c = 0; c < b.o.concurrency; ++c) clients.emplace_back(client, c);
  // Progress line on long runs (stderr, so the table on stdout stays clean).
  auto last_print = Clock::now();
  while (done.load() + failed.load() < n_mine) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (b.root && Clock::now() - last_print > std::chrono::seconds(2)) {
      last_print = Clock::now();
      std::fprintf(stderr, "\r# progress: %d/%d requests%s, %.1f s", done.load(), n_mine,
                   b.distributed ? " on rank 0" : "", std::chrono::duration<double>(last_print - t0).count());
      std::fflush(stderr);
    }
  }
  for (auto& t : clients) t.join();
  RankResult res;
  res.wall_s = std::chrono::duration<double>(*std::max_element(client_end.begin(), client_end.end()) - t0).count();
  loop.Stop();
  res.admission = loop.admission_stats();
  failures->count = failed.load();
  // A failed forward pass ends the run with its own error (the other ranks then time out waiting
  // for this one and name it), not with a drain that cannot match their exchange.
  if (Status f = loop.fatal_error(); !f.ok()) return f;
  res.requests = n_mine;
  for (const RequestTiming& t : timing) {
    res.generated += t.generated;
    res.ttft.push_back(t.ttft_s);
    res.itl.push_back(t.itl_s);
  }
  res.prompt_tokens = int64_t{b.o.prompt_len} * n_mine;
  return res;
}

// The counters of the run's end: the cluster's and the expert cache's.
struct RunCounters {
  nlohmann::json comm_stats;   // under mpirun, rank 0: GatherStats over every rank
  cache::ExpertStoreStats cs;  // this rank's cache; rank 0 under mpirun: totals over all ranks
  cache::CacheBudget cache_budget;
  std::string cache_summary;
  nlohmann::json cache_json = nlohmann::json::object();  // ExpertCache::StatsJson of this rank
  // Experts computed on the host (cache.cpu_compute): this rank's; rank 0 under mpirun: all ranks'.
  int64_t host_uses = 0;
};

// Ends the run's parts: this rank keeps joining the other ranks' expert-parallel steps until all
// are done, the counters are gathered, then the cache and the cluster are destroyed (the cache's
// slots live in the engine's backend: they go while it exists, and before the cluster whose shards
// back them).
StatusOr<RunCounters> FinishRun(const BenchRun& b, BenchParts* p) {
  RunCounters c;
  // Under the cluster: drain, every rank's counters (its cache's included) on rank 0, shut down.
  if (p->cluster) {
    EF_ASSIGN_OR_RETURN(c.comm_stats, p->deployment->Finish());
  }
  if (p->expert_cache) {
    c.cache_budget = p->expert_cache->budget();
    c.cs = p->expert_cache->stats();
    c.cache_summary = p->expert_cache->StatsSummary();
    c.cache_json = p->expert_cache->StatsJson();
    c.host_uses = c.cache_json.value("cpu_computed_experts", int64_t{0});
  }
  if (b.root && b.distributed && c.cs.total.hits + c.cs.total.misses > 0) {
    // Every rank's cache: the table's hit rate and bytes are over all ranks.
    c.cs.total = {};
    c.host_uses = 0;
    for (const json& r : c.comm_stats["ranks"]) {
      const json& rank_cache = r["expert_cache"];
      if (!rank_cache.value("active", false)) continue;
      c.cs.total.hits += rank_cache["hits"].get<int64_t>();
      c.cs.total.misses += rank_cache["misses"].get<int64_t>();
      c.cs.total.prefetch_issued += rank_cache["prefetch_issued"].get<int64_t>();
      c.cs.total.prefetch_used += rank_cache["prefetch_used"].get<int64_t>();
      c.cs.total.prefetch_wasted += rank_cache.value("prefetch_wasted", int64_t{0});
      c.cs.total.prefetch_declined += rank_cache.value("prefetch_declined", int64_t{0});
      c.cs.total.bytes_from_host += rank_cache["bytes_loaded"].get<int64_t>();
      c.host_uses += rank_cache.value("cpu_computed_experts", int64_t{0});
    }
    c.cache_summary = "rank 0: " + c.cache_summary + " (the table: all ranks)";
  }
  return c;
}

// Tokens routed to each expert over the run, [layer * E + expert].
std::vector<int64_t> ExpertTokens(const ServerMetrics& metrics, const runtime::ModelConfig& cfg) {
  std::vector<int64_t> tokens(static_cast<size_t>(cfg.num_layers) * cfg.num_experts);
  for (int l = 0; l < cfg.num_layers; ++l)
    for (int e = 0; e < cfg.num_experts; ++e)
      tokens[static_cast<size_t>(l) * cfg.num_experts + e] = metrics.expert_tokens(l, e);
  return tokens;
}

// Every rank's result on rank 0 (other ranks: an empty list).
StatusOr<std::vector<RankResult>> GatherResults(const BenchRun& b, const RankResult& res) {
  if (!b.distributed) return std::vector<RankResult>{res};
  const std::string bytes = ToJson(res).dump();
  EF_ASSIGN_OR_RETURN(auto gathered, b.ctx->GatherBytesToRoot({bytes.data(), bytes.size()}, "the bench results"));
  std::vector<RankResult> all;
  if (!b.root) return all;
  for (const auto& g : gathered) all.push_back(FromJson(json::parse(std::string(g.begin(), g.end()))));
  return all;
}

// The run over all ranks, as the table and the JSON report it.
struct BenchSummary {
  int total_requests = 0;
  int64_t gen_tokens = 0, prompt_tokens = 0;
  double wall = 0;  // the slowest rank's
  double out_tps = 0, total_tps = 0;
  std::vector<double> ttft, itl;  // every request's
  json per_rank = json::array();
  AdmissionStats admission;
  int64_t a2a_bytes = 0;
  double a2a_per_token = 0;
  // Routing balance: per MoE layer, the busiest expert's share relative to a uniform share.
  double worst_imbalance = 0;
  int64_t routed = 0;
  json per_layer = json::array();
  double rss_mib = 0;
  // The expert cache over all ranks (without one: every expert resident).
  bool cached = false;
  int slots_per_layer = 0;     // the fewest of any MoE layer
  double budget_fraction = 1;  // of the experts, all layers together
  double hit_rate = 1;
  double moved_mib = 0;
  double stall_ms = 0;
};

// Per decoder layer, the tokens of each expert and the busiest one over the mean.
void SummarizeRouting(const runtime::ModelConfig& cfg, const std::vector<int64_t>& expert_tokens, BenchSummary* s) {
  for (int l = 0; l < cfg.num_layers; ++l) {
    int64_t sum = 0, mx = 0;
    json counts = json::array();
    for (int e = 0; e < cfg.num_experts; ++e) {
      const int64_t n = expert_tokens[static_cast<size_t>(l) * cfg.num_experts + e];
      counts.push_back(n);
      sum += n;
      mx = std::max(mx, n);
    }
    s->routed += sum;
    const double imb = sum > 0 ? static_cast<double>(mx) * cfg.num_experts / static_cast<double>(sum) : 0;
    s->worst_imbalance = std::max(s->worst_imbalance, imb);
    s->per_layer.push_back({{"layer", l}, {"expert_tokens", counts}, {"max_over_mean", imb}});
  }
}

// Over all ranks: tokens / slowest rank's wall time; latency percentiles over every request.
BenchSummary Summarize(const BenchRun& b, const runtime::ModelConfig& cfg, const std::vector<RankResult>& all,
                       const RunCounters& c) {
  BenchSummary s;
  s.total_requests = b.o.num_requests * b.ranks;
  std::vector<int64_t> expert_tokens(static_cast<size_t>(cfg.num_layers) * cfg.num_experts, 0);
  AdmissionStats& adm = s.admission;
  for (const RankResult& r : all) {
    adm.rounds += r.admission.rounds;
    adm.fcfs_distinct += r.admission.fcfs_distinct;
    adm.regrouped_distinct += r.admission.regrouped_distinct;
    adm.forced += r.admission.forced;
    adm.max_overtaken = std::max(adm.max_overtaken, r.admission.max_overtaken);
    adm.scheduler_us += r.admission.scheduler_us;
    s.gen_tokens += r.generated;
    s.prompt_tokens += r.prompt_tokens;
    s.wall = std::max(s.wall, r.wall_s);
    s.ttft.insert(s.ttft.end(), r.ttft.begin(), r.ttft.end());
    s.itl.insert(s.itl.end(), r.itl.begin(), r.itl.end());
    for (size_t i = 0; i < expert_tokens.size(); ++i) expert_tokens[i] += r.expert_tokens[i];
    s.per_rank.push_back({{"requests", r.requests}, {"generated_tokens", r.generated}, {"wall_s", r.wall_s}});
  }
  s.out_tps = static_cast<double>(s.gen_tokens) / s.wall;
  s.total_tps = static_cast<double>(s.gen_tokens + s.prompt_tokens) / s.wall;
  s.a2a_bytes = b.distributed ? c.comm_stats["a2a_bytes"].get<int64_t>() : 0;
  const int64_t tokens = s.gen_tokens + s.prompt_tokens;
  s.a2a_per_token = tokens > 0 ? static_cast<double>(s.a2a_bytes) / static_cast<double>(tokens) : 0;
  SummarizeRouting(cfg, expert_tokens, &s);
  s.rss_mib = static_cast<double>(PeakRssBytes()) / (1 << 20);
  s.cached = c.cs.total.hits + c.cs.total.misses > 0;
  s.slots_per_layer = s.cached ? c.cache_budget.slots_per_layer : cfg.num_experts;
  // The share of the experts the slots hold (layers may hold different counts: slots sized per layer).
  s.budget_fraction = s.cached && c.cache_budget.num_moe_layers > 0
                          ? static_cast<double>(c.cache_budget.total_slots()) /
                                (static_cast<double>(cfg.num_experts) * c.cache_budget.num_moe_layers)
                          : 1.0;
  // Experts computed on the host (cache.cpu_compute) never reach the slots: they count as expert
  // uses the slots did not serve, so the rate compares with a run without host compute.
  const int64_t uses = c.cs.total.hits + c.cs.total.misses + c.host_uses;
  s.hit_rate = s.cached && uses > 0 ? static_cast<double>(c.cs.total.hits) / static_cast<double>(uses) : 1.0;
  s.moved_mib = static_cast<double>(c.cs.total.bytes_from_host) / (1 << 20);
  s.stall_ms = static_cast<double>(c.cs.total.stall_ns) * 1e-6;
  return s;
}

// A total over admission rounds, per round (0 without rounds).
double PerRound(double v, int64_t rounds) { return rounds ? v / static_cast<double>(rounds) : 0.0; }

// The fixed-width row and its '#' footer (rank 0).
void PrintTable(const BenchRun& b, const BenchSummary& s, const RunCounters& c) {
  const BenchOptions& o = b.o;
  std::printf("%5s %8s %5s %6s %6s %10s %10s %9s %9s %9s %9s %9s %10s %9s %8s %10s %9s %10s\n", "ranks", "requests",
              "conc", "prompt", "gen", "out_tok/s", "all_tok/s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "wall",
              "peak_rss", "exp_imbal", "hit_rate", "moved", "stall", "a2a");
  std::printf("%5s %8s %5s %6s %6s %10s %10s %9s %9s %9s %9s %9s %10s %9s %8s %10s %9s %10s\n", "", "", "/rank", "tok",
              "tok", "", "", "ms", "ms", "ms", "ms", "s", "MiB", "max/mean", "", "MiB", "ms", "B/tok");
  std::printf(
      "%5d %8d %5d %6d %6d %10.1f %10.1f %9.2f %9.2f %9.3f %9.3f %9.2f %10.1f %9.2f %8.4f %10.1f %9.1f %10.0f\n",
      b.ranks, s.total_requests, o.concurrency, o.prompt_len, o.gen_len, s.out_tps, s.total_tps,
      1e3 * Percentile(s.ttft, 0.5), 1e3 * Percentile(s.ttft, 0.99), 1e3 * Percentile(s.itl, 0.5),
      1e3 * Percentile(s.itl, 0.99), s.wall, s.rss_mib, s.worst_imbalance, s.hit_rate, s.moved_mib, s.stall_ms,
      s.a2a_per_token);
  std::printf(
      "# %lld tokens generated, %lld expert assignments routed; exp_imbal = busiest expert / mean, worst layer\n",
      static_cast<long long>(s.gen_tokens), static_cast<long long>(s.routed));
  if (b.distributed) {
    std::printf(
        "# all-to-all: %lld bytes sent over all ranks (%.0f per prompt or generated token); %.1f output "
        "tok/s per rank; peak_rss is rank 0's\n",
        static_cast<long long>(s.a2a_bytes), s.a2a_per_token, s.out_tps / b.ranks);
    const json& cs = c.comm_stats;
    std::printf("# rows computed per rank over the run: max/mean %.3f (placement_mode %s)\n",
                cs["rows_computed_max_over_mean"].get<double>(), cs["placement_mode"].get<std::string>().c_str());
    if (cs.contains("planned")) {
      const json& p = cs["planned"];
      std::printf(
          "# planned: per MoE layer step, busiest rank's rows / mean %.3f (bound %.2f; the static plan of the same "
          "rows: %.3f), over %lld layer steps; %lld of %lld rows computed on their token's rank instead\n",
          p["rows_max_over_mean"].get<double>(), p["max_imbalance_bound"].get<double>(),
          p["static_rows_max_over_mean"].get<double>(), static_cast<long long>(p["layer_steps"].get<int64_t>()),
          static_cast<long long>(p["rows_moved_to_source"].get<int64_t>()),
          static_cast<long long>(p["rows"].get<int64_t>()));
    }
  }
  const AdmissionStats& adm = s.admission;
  if (o.regroup_window > 1)
    std::printf(
        "# admission regrouping (window %d, starvation bound %d rounds): %lld rounds with a queue; distinct "
        "(layer, expert) per admitted batch %.2f FIFO -> %.2f regrouped (%+.1f%%); %lld forced by the bound; at most "
        "%lld rounds overtaken; %.1f us per round\n",
        o.regroup_window, o.max_wait_steps, static_cast<long long>(adm.rounds),
        PerRound(static_cast<double>(adm.fcfs_distinct), adm.rounds),
        PerRound(static_cast<double>(adm.regrouped_distinct), adm.rounds),
        adm.fcfs_distinct ? 100.0 * (static_cast<double>(adm.regrouped_distinct) / adm.fcfs_distinct - 1) : 0.0,
        static_cast<long long>(adm.forced), static_cast<long long>(adm.max_overtaken),
        PerRound(adm.scheduler_us, adm.rounds));
  if (s.cached)
    std::printf("# %s; moved = bytes loaded into slots, stall = time waiting for loads\n", c.cache_summary.c_str());
  else
    std::printf("# no expert cache: every expert resident (hit_rate 1, nothing moved)\n");
}

// The record's "cache" object.
json CacheJson(const BenchRun& b, const BenchSummary& s, const RunCounters& c) {
  const Config& config = b.config();
  const cache::ExpertCounters& t = c.cs.total;
  json j = {{"enabled", s.cached},
            {"slots_per_layer", s.slots_per_layer},
            {"budget_fraction", s.budget_fraction},
            {"policy", s.cached ? config.cache.policy : "none"},
            {"prefetch_layers", s.cached ? config.cache.prefetch_layers : 0},
            {"predictor", s.cached ? (b.o.oracle_prefetch ? "oracle" : config.predictor.kind) : "none"},
            // hits + misses (slot accesses) + cpu_computed_experts: results.hit_rate is hits over these.
            {"expert_uses", t.hits + t.misses + c.host_uses},
            {"hits", t.hits},
            {"misses", t.misses},
            {"prefetch_issued", t.prefetch_issued},
            {"prefetch_used", t.prefetch_used},
            {"prefetch_wasted", t.prefetch_wasted},
            {"prefetch_declined", t.prefetch_declined},
            {"bytes_from_host", t.bytes_from_host},
            {"stall_ms", s.stall_ms},
            {"cpu_compute", s.cached ? c.cache_json.value("cpu_compute", std::string("off")) : "off"},
            {"cpu_compute_admit", s.cached ? config.cache.cpu_compute_admit : 0},
            {"cpu_computed_experts", c.host_uses},
            {"cpu_computed_rows", c.cache_json.value("cpu_computed_rows", int64_t{0})},
            {"cpu_compute_ms", c.cache_json.value("cpu_compute_ms", 0.0)},
            {"split_experts", c.cache_json.value("split_experts", int64_t{0})},
            {"split_copied_fraction", c.cache_json.value("split_copied_fraction", 0.0)},
            {"split_staged_bytes", c.cache_json.value("split_staged_bytes", int64_t{0})},
            {"cpu_compute_admitted", c.cache_json.value("cpu_compute_admitted", int64_t{0})}};
  // Slots sized per layer (cache.low_precision_layers): each MoE layer's slots.
  if (c.cache_json.contains("slots_per_moe_layer")) j["slots_per_moe_layer"] = c.cache_json["slots_per_moe_layer"];
  // What the loads moved: the precision asked for, where, and the loads and bytes in each.
  j["miss_precision"] = s.cached ? config.cache.miss_precision : "native";
  j["low_precision_layers"] = s.cached ? config.cache.low_precision_layers : "all";
  j["high_precision"] = s.cached ? config.cache.high_precision : "native";
  // The precision the loads took after both keys were resolved (native + high lossless: lossless).
  if (c.cache_json.contains("precision")) j["load_precision"] = c.cache_json["precision"];
  if (s.cached && config.cache.miss_precision == "auto") j["low_precision"] = config.cache.low_precision;
  if (s.cached && !config.cache.quantized_experts.empty()) j["quantized_experts"] = config.cache.quantized_experts;
  for (const char* k : {"native_loads", "native_bytes", "low_precision_loads", "low_precision_bytes"})
    if (c.cache_json.contains(k)) j[k] = c.cache_json[k];
  return j;
}

// The largest per-rank value of a GatherStats key (e.g. the all-to-all wall time of the slowest rank).
json MaxOverRanks(const json& comm_stats, const char* key) {
  double m = 0;
  for (const json& r : comm_stats.value("ranks", json::array())) m = std::max(m, r.value(key, 0.0));
  return m;
}

// The record's "results" object.
json ResultsJson(const BenchRun& b, const BenchSummary& s, const RunCounters& c) {
  const json& cs = c.comm_stats;
  const bool planned = b.distributed && cs.contains("planned");
  return {{"output_tokens_per_s", s.out_tps},
          {"total_tokens_per_s", s.total_tps},
          {"ttft_ms_p50", 1e3 * Percentile(s.ttft, 0.5)},
          {"ttft_ms_p99", 1e3 * Percentile(s.ttft, 0.99)},
          {"itl_ms_p50", 1e3 * Percentile(s.itl, 0.5)},
          {"itl_ms_p99", 1e3 * Percentile(s.itl, 0.99)},
          {"wall_s", s.wall},
          {"peak_rss_mib", s.rss_mib},
          {"generated_tokens", s.gen_tokens},
          {"hit_rate", s.hit_rate},
          // Slot loads and the partial copies of split misses (cache.cpu_compute auto).
          {"bytes_moved", c.cs.total.bytes_from_host + c.cache_json.value("split_staged_bytes", int64_t{0})},
          {"stall_ms", s.stall_ms},
          {"output_tokens_per_s_per_rank", s.out_tps / b.ranks},
          {"a2a_bytes", s.a2a_bytes},
          {"a2a_bytes_per_token", s.a2a_per_token},
          {"a2a_seconds_max_over_ranks", b.distributed ? MaxOverRanks(cs, "a2a_seconds") : json(nullptr)},
          {"rows_computed_max_over_mean", b.distributed ? cs["rows_computed_max_over_mean"] : json(nullptr)},
          {"planned_rows_max_over_mean", planned ? cs["planned"]["rows_max_over_mean"] : json(nullptr)},
          {"planned_static_rows_max_over_mean", planned ? cs["planned"]["static_rows_max_over_mean"] : json(nullptr)},
          {"expert_imbalance_max_over_mean", s.worst_imbalance}};
}

// The same record as the table, as JSON, to --json.
// The serving loop's forward passes on rank 0 (ServerMetrics): where a step's time goes.
struct EngineSteps {
  int64_t steps = 0;
  int64_t device_routed = 0;                // MoE routing kept on the device (no host round trip per layer)
  double seconds = 0;                       // wall time inside Engine::Forward
  double device_routed_seconds = 0;         // of which in the device-routed passes
  double step_seconds = 0;                  // wall time of the serving loop's steps (forward + host work)
  int64_t preemptions = 0;                  // requests that gave their KV blocks back to be prefilled again
  runtime::Engine::GraphStats graphs;       // decode steps from CUDA graphs (runtime.cuda_graphs)
  runtime::Engine::SamplingStats sampling;  // tokens drawn with a temperature, where
};

Status WriteJson(const BenchRun& b, const BenchParts& p, const BenchSummary& s, const RunCounters& c,
                 const EngineSteps& steps) {
  const BenchOptions& o = b.o;
  const runtime::ModelConfig& cfg = p.engine->config();
  const AdmissionStats& adm = s.admission;
  json j = {{"git_sha", EF_GIT_SHA},
            {"build_type", EF_BUILD_TYPE},
            {"compiler", EF_CXX_COMPILER},
            {"model", p.model_dir},
            {"model_shape",
             {{"num_layers", cfg.num_layers},
              {"num_moe_layers", cfg.num_moe_layers()},
              {"num_experts", cfg.num_experts},
              {"top_k", cfg.top_k},
              {"hidden_size", cfg.hidden_size},
              {"moe_intermediate_size", cfg.moe_intermediate_size}}},
            {"synthetic",
             o.synthetic.empty()
                 ? json(nullptr)
                 : json{{"shape", p.shape.name},
                        {"layers", p.shape.num_layers},
                        {"scale", p.shape.scale},
                        {"seed", o.synthetic_seed},
                        {"in_memory", o.synthetic_in_memory},
                        {"distinct_layers", p.in_memory.checkpoint ? p.in_memory.distinct_layers : p.shape.num_layers},
                        {"note", p.shape.note}}},
            {"routing_trace", o.routing_trace},
            {"cache", CacheJson(b, s, c)},
            {"ranks", b.ranks},
            {"assignment", o.assign},
            {"assign_max_imbalance", o.assign == "locality" ? json(o.assign_max_imbalance) : json()},
            {"admission",
             {{"regroup_window", o.regroup_window},
              {"max_wait_steps", o.max_wait_steps},
              {"rounds", adm.rounds},
              {"fcfs_distinct_per_round", PerRound(static_cast<double>(adm.fcfs_distinct), adm.rounds)},
              {"regrouped_distinct_per_round", PerRound(static_cast<double>(adm.regrouped_distinct), adm.rounds)},
              {"forced", adm.forced},
              {"max_rounds_overtaken", adm.max_overtaken},
              {"scheduler_us_per_round", PerRound(adm.scheduler_us, adm.rounds)}}},
            {"per_rank", s.per_rank},
            {"comm", b.distributed ? c.comm_stats : json(nullptr)},
            {"backend", o.model.backend},
            {"device", o.model.device},
            {"workload",
             {{"num_requests", s.total_requests},
              {"requests_per_rank", o.num_requests},
              {"concurrency", o.concurrency},
              {"prompt_len", o.prompt_len},
              {"gen_len", o.gen_len},
              {"max_batch", o.max_batch},
              {"max_prefill_tokens", o.max_prefill_tokens},
              {"seed", o.seed},
              {"temperature", o.sampling.temperature},
              {"top_p", o.sampling.top_p},
              {"top_k", o.sampling.top_k}}},
            {"results", ResultsJson(b, s, c)},
            {"engine",
             {{"kv_cache_dtype", KvCacheDTypeName(*p.engine)},
              {"prefill_attention", p.engine->reduced_precision_attention() ? "bf16" : "fp32"},
              {"forward_passes", steps.steps},
              {"device_routed_passes", steps.device_routed},
              {"forward_seconds", steps.seconds},
              {"device_routed_seconds", steps.device_routed_seconds},
              {"step_seconds", steps.step_seconds},
              {"preemptions", steps.preemptions},
              {"graphs_recorded", steps.graphs.recorded},
              {"graph_replays", steps.graphs.replayed},
              {"graphs_refused", steps.graphs.refused},
              {"sampled_on_backend", steps.sampling.on_backend},
              {"sampled_on_host", steps.sampling.on_host}}},
            {"routing", s.per_layer}};
  std::ofstream out(o.json_path);
  if (!out) return NotFound("cannot write " + o.json_path);
  out << j.dump(2) << "\n";
  return Status::Ok();
}

Status RunBench(const BenchOptions& given, comm::MpiContext* ctx) {
  EF_ASSIGN_OR_RETURN(const BenchRun run, ResolveRun(given, ctx));
  BenchParts parts;  // outlives the serving loop (declared first, destroyed last)
  EF_RETURN_IF_ERROR(ResolveModel(run, &parts));
  EF_RETURN_IF_ERROR(LoadRoutingTrace(run, &parts));
  EF_RETURN_IF_ERROR(Deploy(run, &parts));
  const runtime::ModelConfig cfg = parts.engine->config();

  // The same R x n requests on every rank; this rank runs those assigned to it.
  const int total_requests = run.o.num_requests * run.ranks;
  const std::vector<std::vector<int32_t>> prompts = MakePrompts(run.o, total_requests, cfg.vocab_size);
  EF_ASSIGN_OR_RETURN(const std::vector<int> mine, RequestsOfThisRank(run, parts, total_requests));
  ServerMetrics metrics(cfg.num_layers, cfg.num_experts);
  EF_ASSIGN_OR_RETURN(const ServingLoopOptions lo, MakeLoopOptions(run, parts));
  ServingLoop loop(parts.engine, *parts.tokenizer, &metrics, lo);
  if (run.root) PrintHeader(run, parts);

  RequestFailures failures;
  EF_ASSIGN_OR_RETURN(RankResult res, RunRequests(run, loop, prompts, mine, &failures));
  EF_ASSIGN_OR_RETURN(const RunCounters counters, FinishRun(run, &parts));
  if (failures.count > 0)
    return Internal(std::to_string(failures.count) + " requests failed; first: " + failures.first);
  if (run.root) std::fprintf(stderr, "\r%60s\r", "");
  res.expert_tokens = ExpertTokens(metrics, cfg);

  EF_ASSIGN_OR_RETURN(const std::vector<RankResult> all, GatherResults(run, res));
  if (!run.root) return Status::Ok();
  const BenchSummary summary = Summarize(run, cfg, all, counters);
  PrintTable(run, summary, counters);
  const EngineSteps steps{metrics.steps(),
                          metrics.device_routed_steps(),
                          metrics.forward_seconds(),
                          metrics.device_routed_seconds(),
                          metrics.step_seconds(),
                          metrics.preemptions(),
                          parts.engine->graph_stats(),
                          parts.engine->sampling_stats()};
  auto per = [](double s, int64_t n) { return n > 0 ? 1e3 * s / static_cast<double>(n) : 0.0; };
  const int64_t others = steps.steps - steps.device_routed;
  std::printf(
      "# engine%s: %lld forward passes, %.3f s in them: %lld with the routing on the device (%.3f ms each), %lld "
      "others (%.3f ms each); %.3f ms of host work per step around them\n",
      run.ranks > 1 ? " of rank 0" : "", static_cast<long long>(steps.steps), steps.seconds,
      static_cast<long long>(steps.device_routed), per(steps.device_routed_seconds, steps.device_routed),
      static_cast<long long>(others), per(steps.seconds - steps.device_routed_seconds, others),
      per(steps.step_seconds - steps.seconds, steps.steps));
  if (steps.sampling.on_backend + steps.sampling.on_host > 0)
    std::printf("# sampling: %lld tokens drawn on the backend, %lld on the host from their logits\n",
                static_cast<long long>(steps.sampling.on_backend), static_cast<long long>(steps.sampling.on_host));
  if (steps.graphs.recorded + steps.graphs.refused > 0)
    std::printf("# cuda graphs: %lld forward passes replayed from %lld recorded shapes (%lld not recordable)\n",
                static_cast<long long>(steps.graphs.replayed), static_cast<long long>(steps.graphs.recorded),
                static_cast<long long>(steps.graphs.refused));
  if (steps.preemptions > 0)
    std::printf("# kv cache: %lld requests preempted (their blocks given back, prefilled again later)\n",
                static_cast<long long>(steps.preemptions));
  if (run.o.json_path.empty()) return Status::Ok();
  return WriteJson(run, parts, summary, counters, steps);
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
  c.app->add_option("--max-batch", o->max_batch, "sequences in the running batch (scheduler.max_batch_requests)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  c.app
      ->add_option("--max-prefill-tokens", o->max_prefill_tokens,
                   "chunked prefill: prompt tokens prefilled per step; 0: no limit (scheduler.max_prefill_tokens)")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app->add_option("--seed", o->seed, "seed of the synthetic prompts (and of request i's sampling: seed + i)")
      ->check(kSeed)
      ->capture_default_str();
  c.app
      ->add_option("--temperature", o->sampling.temperature,
                   "sampling temperature of every request; 0: greedy (the arg max, chosen on the GPU)")
      ->check(CLI::Range(0.f, limits::kMaxTemperature))
      ->capture_default_str();
  c.app->add_option("--top-p", o->sampling.top_p, "nucleus sampling: the smallest set reaching this probability")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  c.app->add_option("--top-k", o->sampling.top_k, "sample among the k most likely tokens; 0: no limit")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app
      ->add_option("--warmup-tokens", o->warmup_tokens,
                   "cuda, one rank: prompt tokens of the warm-up step before the workload (through the expert cache: "
                   "at most 128, its counters zeroed after); 0: none")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app->add_option("--json,-J", o->json_path, "also write the record as JSON to this file")->check(kOutputFile);
  c.app->add_option("--synthetic", o->synthetic, "random weights of a real model's shape instead of --model")
      ->check(CLI::IsMember(SyntheticShapeNames()));
  c.app->add_option("--synthetic-layers", o->synthetic_layers, "layers of the synthetic model (0: the shape's)")
      ->check(kNonNegative);
  c.app->add_option("--synthetic-scale", o->synthetic_scale, "divide hidden/FFN/vocab sizes by this (CPU runs)")
      ->check(kPositive)
      ->capture_default_str();
  c.app->add_option("--synthetic-seed", o->synthetic_seed, "seed of the synthetic weights")
      ->check(kSeed)
      ->capture_default_str();
  c.app->add_option("--synthetic-dir", o->synthetic_dir, "where synthetic checkpoints are cached")
      ->default_str(DefaultSyntheticRoot());
  c.app->add_flag("--synthetic-in-memory", o->synthetic_in_memory,
                  "generate the synthetic weights in host memory instead of writing a checkpoint (models larger "
                  "than the disk; only config.json and tokenizer.json are written)");
  c.app
      ->add_option("--synthetic-distinct-layers", o->synthetic_distinct_layers,
                   "with --synthetic-in-memory: generate this many layers, later layers repeat their bytes (host "
                   "memory for N layers; the GPU still holds every layer); 0: all")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app->add_option("--routing-trace", o->routing_trace,
                    "take every MoE layer's experts from this routing trace (routing.replay)");
  c.app
      ->add_option("--regroup-window", o->regroup_window,
                   "admit waiting requests regrouped over this many batches so each prefill batch needs fewer "
                   "experts (0/1: FIFO; forecast = the trace's routing of each prompt) (scheduler.regroup_window)")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app
      ->add_option(
          "--max-wait-steps", o->max_wait_steps,
          "starvation bound of admission regrouping: admission rounds a request may be overtaken by younger ones")
      ->check(kPositive)
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
    return RunDistributed(*app, &o->model, &o->cluster, [o, app](comm::MpiContext* ctx) {
      ApplySchedulerSection(*app, o.get());
      return RunBench(*o, ctx);
    });
  };
  return c;
}

}  // namespace ef::launch
