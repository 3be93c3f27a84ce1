// `expertflow serve`: the OpenAI-compatible HTTP server.
//
//   expertflow serve --model DIR --port P [--host 127.0.0.1] [--api-key K] [--max-batch N]
//                    [--max-body-bytes 8MiB] [--max-tokens-limit N]
//   expertflow serve --config C.yaml          (model, runtime, server.*, scheduler.max_batch_requests,
//                                              cache.*, predictor.*)
//   expertflow serve --cache-device-budget "2 slots per layer" --predictor lookahead ...
//
// With a cache device budget the experts are served from an expert cache of that size
// (launch/expert_cache_setup.h); /metrics then carries its counters per layer and expert.
//
// Under mpirun (`mpirun -np N expertflow serve ...`) rank 0 listens and runs every request; the
// other ranks compute their share of each MoE layer's experts (expert parallelism, comm::Cluster)
// and follow rank 0's steps until it stops. While idle, rank 0 keeps them alive every 100 ms, so
// their step wait (cluster.timeout_s) only fires when rank 0 is really gone. /metrics shows rank 0's
// own all-to-all and UCX peer-fetch counters live; every rank's totals are printed at shutdown.
//
// Threads: main (HTTP accept loop), HTTP handlers (parse, enqueue, wait), one engine thread
// (ServingLoop), one signal watcher. SIGTERM/SIGINT: refuse new requests (503), let in-flight
// ones finish (streams too), exit 0; a second signal stops at once. `--port 0` picks a free
// port; the chosen address is always printed on stdout as "listening on HOST:PORT" (tests and
// scripts read it).
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "comm/cluster.h"
#include "comm/mpi_context.h"
#include "launch/cli_checks.h"
#include "launch/command.h"
#include "launch/config.h"
#include "launch/deployment.h"
#include "launch/engine_options.h"
#include "launch/expert_cache_setup.h"
#include "launch/server/chat_template.h"
#include "launch/server/http_server.h"
#include "launch/server/server_metrics.h"
#include "launch/server/serving_loop.h"
#include "placement/predictor_file.h"
#include "runtime/core/logging.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ef::launch {
namespace {

struct ServeOptions {
  ModelFlags model;
  ClusterFlags cluster;  // --config, the cluster and the expert cache flags
  HttpServerOptions http;
  ServingLoopOptions loop;
  std::string served_name;
  // Flags that are config keys (server.*): set through the config schema, which validates them.
  std::string max_body_bytes;
  std::string max_tokens_limit;
};

// Admission regrouping needs each prompt's experts before it runs: the forecast of a trained
// predictor file (path, affinity, frequency or hybrid) over the prompt's tokens, top-k per layer.
Status SetUpAdmissionForecast(const Config& cfg, const runtime::ModelConfig& model, ServingLoopOptions* loop) {
  auto read = placement::LoadPredictor(cfg.predictor.path);
  if (!read.ok()) {
    Status s = read.status();
    return s.Prepend("predictor.path (--predictor-path, for admission regrouping)");
  }
  placement::LoadedPredictor loaded = std::move(read).value();
  const int layers = model.num_moe_layers(), experts = model.num_experts, k = model.top_k;
  if (loaded.info.num_layers != layers || loaded.info.num_experts != experts)
    return InvalidArgument("predictor " + cfg.predictor.path + " forecasts " + std::to_string(loaded.info.num_layers) +
                           " MoE layers x " + std::to_string(loaded.info.num_experts) + " experts; the model has " +
                           std::to_string(layers) + " x " + std::to_string(experts));
  std::shared_ptr<const placement::Predictor> predictor = std::move(loaded.predictor);
  loop->forecast_layers = layers;
  loop->forecast_experts = experts;
  loop->forecast = [predictor, layers, experts, k](const ServeRequest& r, uint64_t* row) {
    std::vector<placement::PredictorInput> in(r.prompt.size());
    for (size_t i = 0; i < r.prompt.size(); ++i) {
      in[i].pos = static_cast<int64_t>(i);
      in[i].token = r.prompt[i];
      in[i].context = std::span<const int32_t>(r.prompt.data(), i);
    }
    auto f = predictor->Predict(in);
    if (!f.ok()) return;  // no forecast: the request competes with an empty path (admitted FCFS)
    for (int t = 0; t < f->num_tokens; ++t)
      for (int l = 0; l < layers; ++l)
        for (int e : f->TopK(t, l, k)) {
          const int bit = l * experts + e;
          row[bit / 64] |= uint64_t{1} << (bit % 64);
        }
  };
  EF_LOG(INFO, SERVE, "admission regrouping: forecasts from %s (%s)", cfg.predictor.path.c_str(),
         loaded.info.kind.c_str());
  return Status::Ok();
}

// SIGTERM and SIGINT: blocked in every thread (the command blocks them before MPI or any thread
// starts) and taken by the watcher thread with sigtimedwait.
sigset_t ShutdownSignals() {
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, SIGTERM);
  sigaddset(&s, SIGINT);
  return s;
}

// The server section and scheduler keys of the config file under the flags; the checks that need
// both.
Status ApplyServeConfig(const CLI::App& app, ServeOptions* so) {
  ServeOptions& o = *so;
  Config& cfg = o.cluster.config;  // file keys and cache flags applied by ClusterFlags::Load
  {
    if (FlagGiven(app, "--max-body-bytes"))
      EF_RETURN_IF_ERROR(SetConfigKey("server.max_body_bytes", o.max_body_bytes, "--max-body-bytes", &cfg));
    if (FlagGiven(app, "--max-tokens-limit"))
      EF_RETURN_IF_ERROR(SetConfigKey("server.max_tokens_limit", o.max_tokens_limit, "--max-tokens-limit", &cfg));
    o.http.max_body_bytes = cfg.server.max_body_bytes;
    o.http.max_tokens_limit = cfg.server.max_tokens_limit;
    if (!FlagGiven(app, "--host") && cfg.has("server.host")) o.http.host = cfg.server.host;
    if (!FlagGiven(app, "--port") && cfg.has("server.port")) o.http.port = cfg.server.port;
    if (!FlagGiven(app, "--api-key") && cfg.has("server.api_key")) o.http.api_key = cfg.server.api_key;
    if (!FlagGiven(app, "--max-batch") && cfg.has("scheduler.max_batch_requests"))
      o.loop.max_batch = cfg.scheduler.max_batch_requests;
    if (!FlagGiven(app, "--regroup-window") && cfg.has("scheduler.regroup_window"))
      o.loop.regroup_window = cfg.scheduler.regroup_window;
    if (!FlagGiven(app, "--max-prefill-tokens") && cfg.has("scheduler.max_prefill_tokens"))
      o.loop.max_prefill_tokens = cfg.scheduler.max_prefill_tokens;
  }
  if (o.http.port < 0 || o.http.port > 65535) return InvalidArgument("--port must be in 0..65535");
  if (o.http.host.empty())
    return InvalidArgument("--host is empty: give the address to listen on (127.0.0.1, 0.0.0.0 for every interface)");
  if (o.loop.max_batch < 1) return InvalidArgument("--max-batch must be >= 1");
  if (o.loop.max_queue < 1)
    return InvalidArgument("--max-queue must be >= 1 (waiting requests before 503), got " +
                           std::to_string(o.loop.max_queue));
  if ((FlagGiven(app, "--api-key") || cfg.has("server.api_key")) && o.http.api_key.empty())
    return InvalidArgument(
        "--api-key (server.api_key) is empty: every request would be let in (leave it out to serve without a key)");
  if (o.loop.max_prefill_tokens < 0) return InvalidArgument("--max-prefill-tokens must be >= 0 (0: no limit)");
  if (o.loop.regroup_window > 1 && cfg.predictor.path.empty()) {
    if (FlagGiven(app, "--regroup-window"))
      return InvalidArgument(
          "--regroup-window needs a trained predictor (--predictor-path or predictor.path) to forecast each prompt's "
          "experts");
    // From the config file: without a forecast there is nothing to regroup on; admit in order.
    EF_LOG(WARN, SERVE,
           "scheduler.regroup_window %d has no effect without predictor.path (a trained predictor file): admission "
           "stays FIFO",
           o.loop.regroup_window);
    o.loop.regroup_window = 0;
  }

  return Status::Ok();
}

// What a serving rank prints when it stops: the cluster's and the cache's counters, admission.
void PrintServeSummary(const Deployment& d, const nlohmann::json& comm_stats, const ServingLoop& loop,
                       comm::MpiContext* ctx) {
  if (!comm_stats.is_null())
    std::fprintf(stderr, "comm: %d ranks, all-to-all %lld bytes, ucx gets %lld bytes\n", ctx->size(),
                 static_cast<long long>(comm_stats["a2a_bytes"].get<int64_t>()),
                 static_cast<long long>(comm_stats["ucx_get_bytes"].get<int64_t>()));
  d.PrintCacheSummary();
  if (const AdmissionStats a = loop.admission_stats(); a.rounds > 0)
    std::fprintf(stderr,
                 "admission regrouping: %lld rounds with a queue, forecast distinct (layer, expert) per admitted batch "
                 "%.1f FIFO -> %.1f regrouped, %lld admitted by the starvation bound\n",
                 static_cast<long long>(a.rounds), static_cast<double>(a.fcfs_distinct) / a.rounds,
                 static_cast<double>(a.regrouped_distinct) / a.rounds, static_cast<long long>(a.forced));
}

// Rank 0 serves HTTP; under mpirun the other ranks follow its expert-parallel steps. Parts are
// declared in dependency order (deployment, metrics, loop, server) and so torn down in reverse on
// every way out: the server stops answering, the loop stops driving the engine and removes its
// hook, then the deployment frees the cache, the cluster and the engine.
Status RunServe(ServeOptions o, const CLI::App& app, comm::MpiContext* ctx) {
  EF_RETURN_IF_ERROR(ApplyServeConfig(app, &o));
  const Config& cfg = o.cluster.config;
  const sigset_t signals = ShutdownSignals();
  EF_ASSIGN_OR_RETURN(runtime::Tokenizer tok, runtime::Tokenizer::FromModelDir(o.model.dir));
  EF_ASSIGN_OR_RETURN(ChatTemplate chat, ChatTemplate::FromModelDir(o.model.dir));
  DeploymentOptions dopt = MakeDeploymentOptions(o.model, o.cluster);
  dopt.cluster_on_one_rank = false;
  EF_ASSIGN_OR_RETURN(auto deployment, Deployment::Create(ctx, dopt));
  comm::Cluster* cluster = deployment->cluster();
  if (cluster && ctx->rank() != 0) {
    // A follower: compute this rank's experts for rank 0's steps until it stops.
    EF_RETURN_IF_ERROR(cluster->executor().Follow());
    EF_RETURN_IF_ERROR(deployment->GatherAndShutdown().status());
    deployment->PrintCacheSummary();  // its own experts' counters, as rank 0 prints its own
    return Status::Ok();
  }
  if (cluster) {
    comm::ExpertParallelExecutor* executor = &cluster->executor();
    o.loop.idle_tick = [executor] { return executor->KeepAlive(); };
  }
  runtime::Engine& engine = deployment->engine();
  // A failed keep-alive (a follower gone) stops the engine thread; the watcher then stops HTTP.
  std::atomic<bool> fatal{false};
  o.loop.on_fatal = [&fatal](const Status&) { fatal.store(true); };
  if (o.loop.regroup_window > 1) EF_RETURN_IF_ERROR(SetUpAdmissionForecast(cfg, engine.config(), &o.loop));
  ServerMetrics metrics(engine.config().num_layers, engine.config().num_experts);
  if (deployment->cache() && deployment->cache()->active()) metrics.SetExpertCache(deployment->cache());
  if (cluster) metrics.SetCommCounters([cluster] { return cluster->LiveCounters(); });
  o.http.model_name = !o.served_name.empty()
                          ? o.served_name
                          : std::filesystem::path(o.model.dir).lexically_normal().filename().string();
  if (o.http.model_name.empty())
    o.http.model_name = std::filesystem::path(o.model.dir).parent_path().filename().string();
  ServingLoop loop(&engine, tok, &metrics, o.loop);
  HttpServer server(o.http, &loop, &tok, &chat, &metrics);
  EF_ASSIGN_OR_RETURN(const int port, server.Bind());
  std::atomic<bool> done{false};
  // The first SIGTERM/SIGINT drains: new requests get 503, the server stops once every request in
  // flight (streams included) is answered. A second one, or a dead engine, stops at once.
  std::thread watcher([&] {
    const timespec tick{0, 50'000'000};
    bool draining = false, now = false, aborted = false;
    while (!done.load()) {
      const int sig = sigtimedwait(&signals, nullptr, &tick);
      const bool signalled = sig == SIGTERM || sig == SIGINT;
      if (fatal.load() && !now) {
        std::fprintf(stderr, "expertflow serve: the engine stopped; shutting down\n");
        now = true;
      } else if (signalled && draining && !now) {
        std::fprintf(stderr, "expertflow serve: second signal; stopping now\n");
        now = true;
      } else if (signalled && !draining) {
        EF_LOG(WARN, SERVE, "signal %d: draining in-flight requests", sig);
        std::fprintf(stderr,
                     "expertflow serve: shutting down (finishing in-flight requests; signal again to stop now)\n");
      }
      draining = draining || signalled || now;
      // Stopping now ends the requests in flight (their clients get 503) rather than finishing them.
      if (now && !aborted) {
        loop.Abort(Unavailable("the server is stopping"));
        aborted = true;
      }
      // Again every tick: the server stops once drained, and a stop that lands before the accept
      // loop starts would be lost.
      if (draining) server.Stop(now);
    }
  });

  std::printf("listening on %s:%d\n", o.http.host.c_str(), port);
  std::printf("model %s, context %d, max batch %d%s\n", o.http.model_name.c_str(), loop.max_seq_len(), o.loop.max_batch,
              chat.is_plain() ? ", plain chat template" : ", chat template from tokenizer_config.json");
  std::fflush(stdout);
  Status s = server.Listen();  // returns after Stop() once every handler has answered
  loop.Stop();
  done.store(true);
  watcher.join();
  if (Status f = loop.fatal_error(); !f.ok()) return f;
  nlohmann::json comm_stats;
  if (cluster) {
    // The followers are waiting for the next step: tell them to stop, then the collectives.
    EF_RETURN_IF_ERROR(cluster->executor().Stop());
    EF_ASSIGN_OR_RETURN(comm_stats, deployment->GatherAndShutdown());
  }
  PrintServeSummary(*deployment, comm_stats, loop, ctx);
  if (s.ok()) std::fprintf(stderr, "expertflow serve: stopped\n");
  return s;
}

}  // namespace

Command AddServeCommand(CLI::App& root) {
  auto o = std::make_shared<ServeOptions>();
  Command c;
  c.app = root.add_subcommand("serve", "OpenAI-compatible HTTP server (completions, chat, SSE streaming, metrics)");
  o->model.Register(c.app);
  c.app->add_option("--host", o->http.host, "address to bind (loopback by default)")->capture_default_str();
  c.app->add_option("--port,-p", o->http.port, "TCP port; 0 picks a free one (printed on stdout)")
      ->capture_default_str();
  c.app->add_option("--api-key", o->http.api_key, "require 'Authorization: Bearer KEY' on /v1/*");
  c.app->add_option("--served-model-name", o->served_name, "model id for /v1/models (default: the model folder)");
  c.app->add_option("--max-batch", o->loop.max_batch, "sequences in the running batch")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  c.app
      ->add_option("--max-prefill-tokens", o->loop.max_prefill_tokens,
                   "chunked prefill: prompt tokens prefilled per step (longer prompts take several steps while "
                   "the running requests keep decoding); 0: no limit (scheduler.max_prefill_tokens)")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app->add_option("--max-queue", o->loop.max_queue, "waiting requests before 503")->capture_default_str();
  c.app
      ->add_option("--regroup-window", o->loop.regroup_window,
                   "admit queued requests regrouped over this many batches so each prefill batch needs fewer experts "
                   "(needs --predictor-path; 0/1: FIFO) (scheduler.regroup_window)")
      ->check(kNonNegative);
  c.app
      ->add_option("--max-wait-steps", o->loop.max_wait_steps,
                   "admission rounds a request may be overtaken by younger ones when regrouping")
      ->check(kPositive)
      ->capture_default_str();
  c.app->add_option("--max-tokens-limit", o->max_tokens_limit,
                    "largest max_tokens a request may ask; 0: the context (server.max_tokens_limit)");
  c.app->add_option("--max-body-bytes", o->max_body_bytes,
                    "largest request body, e.g. 8MiB; larger ones get 413 (server.max_body_bytes, default 8MiB)");
  c.app->add_option("--default-max-tokens", o->http.default_max_tokens, "max_tokens when a request gives none")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app->add_option("--http-threads", o->http.num_threads, "HTTP handler threads")
      ->check(kPositive)
      ->capture_default_str();
  o->cluster.Register(c.app);
  CLI::App* app = c.app;
  c.run = [o, app] {
    // Before MPI starts its own threads, which would otherwise take the signal and die of it.
    const sigset_t signals = ShutdownSignals();
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);
    return RunDistributed(*app, &o->model, &o->cluster,
                          [o, app](comm::MpiContext* ctx) { return RunServe(*o, *app, ctx); });
  };
  return c;
}

}  // namespace ef::launch
