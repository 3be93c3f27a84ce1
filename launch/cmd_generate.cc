// `expertflow generate`: tokenizes a prompt, generates, streams the text as it comes.
#include <algorithm>
#include <cstdio>
#include <fstream>

#include "comm/cluster.h"
#include "comm/mpi_context.h"
#include "launch/cli_checks.h"
#include "launch/command.h"
#include "launch/config.h"
#include "launch/deployment.h"
#include "launch/engine_options.h"
#include "runtime/core/limits.h"
#include "runtime/core/logging.h"
#include "runtime/engine/generator.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ef::launch {
namespace {

struct GenerateOptions {
  ModelFlags model;
  ClusterFlags cluster;
  std::string prompt = "def main(";
  int max_new_tokens = 64;
  runtime::SamplingParams sampling;
  bool ignore_eos = false;
  bool show_ids = false;
};

Status GenerateOnThisRank(const GenerateOptions& o, runtime::Engine& engine);

// Fills generation options from the config's generate section where the command line was silent.
void ApplyGenerateConfig(const Config& c, const CLI::App& app, GenerateOptions* o) {
  if (c.has("generate.prompt") && !FlagGiven(app, "--prompt")) o->prompt = c.generate.prompt;
  if (c.has("generate.max_new_tokens") && !FlagGiven(app, "--max-new-tokens"))
    o->max_new_tokens = c.generate.max_new_tokens;
  if (c.has("generate.temperature") && !FlagGiven(app, "--temperature"))
    o->sampling.temperature = c.generate.temperature;
  if (c.has("generate.top_p") && !FlagGiven(app, "--top-p")) o->sampling.top_p = c.generate.top_p;
  if (c.has("generate.top_k") && !FlagGiven(app, "--top-k")) o->sampling.top_k = c.generate.top_k;
  if (c.has("generate.seed") && !FlagGiven(app, "--seed")) o->sampling.seed = c.generate.seed;
}

// Under mpirun rank 0 owns the prompt (attention, sampling, printing); every rank joins each MoE
// layer's expert-parallel exchange until rank 0 is done. With cache.device_budget every rank's
// experts are served from an expert cache of that size (per rank).
Status RunGenerate(const GenerateOptions& o, comm::MpiContext* ctx) {
  // Bad sampling settings are refused before the model loads (minutes for a large one).
  EF_RETURN_IF_ERROR(o.sampling.Validate());
  EF_ASSIGN_OR_RETURN(auto deployment, Deployment::Create(ctx, MakeDeploymentOptions(o.model, o.cluster)));
  if (ctx->rank() == 0) EF_RETURN_IF_ERROR(GenerateOnThisRank(o, deployment->engine()));
  if (!deployment->cluster()) {
    deployment->PrintCacheSummary();
    if (!o.cluster.stats_out.empty())
      EF_LOG(WARN, COMM, "--comm-stats %s not written: one process, nothing communicated (run under mpirun)",
             o.cluster.stats_out.c_str());
    return Status::Ok();
  }
  // Ranks other than 0 do their expert work while they drain: their counters are final after it.
  EF_ASSIGN_OR_RETURN(auto stats, deployment->Finish());
  deployment->PrintCacheSummary();
  if (ctx->rank() == 0) {
    if (!o.cluster.stats_out.empty()) {
      std::ofstream f(o.cluster.stats_out);
      if (!f) return InvalidArgument("cannot write " + o.cluster.stats_out);
      f << stats.dump(2) << "\n";
    }
    if (ctx->size() > 1)
      std::fprintf(stderr, "comm: %d ranks, all-to-all %lld bytes, ucx gets %lld bytes\n", ctx->size(),
                   static_cast<long long>(stats["a2a_bytes"].get<int64_t>()),
                   static_cast<long long>(stats["ucx_get_bytes"].get<int64_t>()));
  }
  return Status::Ok();
}

Status GenerateOnThisRank(const GenerateOptions& o, runtime::Engine& eng) {
  runtime::Engine* engine = &eng;
  EF_ASSIGN_OR_RETURN(auto tok, runtime::Tokenizer::FromModelDir(o.model.dir));
  runtime::GenerateRequest req;
  req.prompt = tok.Encode(o.prompt);
  if (req.prompt.empty()) return InvalidArgument("the prompt encodes to no tokens");
  req.max_new_tokens = o.max_new_tokens;
  req.sampling = o.sampling;
  req.ignore_eos = o.ignore_eos;
  // Before the prompt is echoed: a refusal should not look like the start of an answer.
  if (static_cast<int64_t>(req.prompt.size()) >= engine->max_seq_len())
    return OutOfRange("the prompt's " + std::to_string(req.prompt.size()) + " tokens do not fit the context of " +
                      std::to_string(engine->max_seq_len()) + " tokens (runtime.max_seq_len, --max-seq-len)");
  // A fixed-size KV cache that cannot hold the prompt and its tokens would fail mid-answer.
  const int64_t want =
      std::min<int64_t>(static_cast<int64_t>(req.prompt.size()) + o.max_new_tokens, engine->max_seq_len());
  if (engine->kv_capacity_blocks() > 0 && engine->KvBlocksFor(want) > engine->kv_capacity_blocks())
    return ResourceExhausted("the prompt and its new tokens need " + std::to_string(want) +
                             " tokens of KV cache, more than the " + std::to_string(engine->kv_capacity_blocks()) +
                             " blocks of runtime.kv_cache_tokens (--kv-cache-tokens) hold");
  std::fputs(o.prompt.c_str(), stdout);
  std::fflush(stdout);
  runtime::StreamDecoder dec(tok, /*skip_special=*/true);
  EF_ASSIGN_OR_RETURN(auto results, runtime::Generate(*engine, {req}, [&](size_t, int32_t t) {
                        std::fputs(dec.Push(t).c_str(), stdout);
                        std::fflush(stdout);
                        return true;
                      }));
  std::fputs(dec.Flush().c_str(), stdout);
  std::fputs("\n", stdout);
  std::fflush(stdout);  // before anything goes to stderr
  if (results[0].finish == runtime::FinishReason::kContext)
    std::fprintf(stderr,
                 "generation stopped after %zu of %d tokens: the context of %d tokens is full (--max-seq-len)\n",
                 results[0].tokens.size(), o.max_new_tokens, engine->max_seq_len());
  if (o.show_ids) {
    std::fprintf(stderr, "prompt ids:");
    for (int32_t t : req.prompt) std::fprintf(stderr, " %d", t);
    std::fprintf(stderr, "\nnew ids:");
    for (int32_t t : results[0].tokens) std::fprintf(stderr, " %d", t);
    std::fprintf(stderr, "\nfinish: %s\n", runtime::FinishReasonName(results[0].finish));
  }
  return Status::Ok();
}

}  // namespace

Command AddGenerateCommand(CLI::App& root) {
  auto o = std::make_shared<GenerateOptions>();
  Command c;
  c.app = root.add_subcommand("generate", "Generate text from a prompt, streaming tokens as they come");
  o->model.Register(c.app);
  c.app->add_option("--prompt,-p", o->prompt, "prompt text")->capture_default_str();
  c.app->add_option("-n,--max-new-tokens", o->max_new_tokens, "tokens to generate")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app
      ->add_option("--temperature,-t", o->sampling.temperature,
                   std::string("sampling temperature in ") + limits::kTemperatureRange + " (0: greedy)")
      ->check(CLI::Range(0.f, limits::kMaxTemperature))
      ->capture_default_str();
  c.app->add_option("--top-k", o->sampling.top_k, "sample among the k most likely tokens (0: all)");
  c.app->add_option("--top-p", o->sampling.top_p, "nucleus sampling threshold in (0, 1]");
  c.app->add_option("--seed", o->sampling.seed, "random seed for sampling")->check(kSeed)->capture_default_str();
  c.app->add_flag("--ignore-eos", o->ignore_eos, "keep generating past end-of-sequence tokens");
  c.app->add_flag("--show-ids", o->show_ids, "print prompt and generated token ids to stderr");
  o->cluster.Register(c.app);
  CLI::App* app = c.app;
  c.run = [o, app] {
    return RunDistributed(*app, &o->model, &o->cluster, [o, app](comm::MpiContext* ctx) {
      ApplyGenerateConfig(o->cluster.config, *app, o.get());
      return RunGenerate(*o, ctx);
    });
  };
  return c;
}

}  // namespace ef::launch
