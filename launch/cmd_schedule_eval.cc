// `expertflow schedule-eval`: trace-driven evaluation of ExpertFlow's token regrouping, placement
// planning and request->rank assignment against FCFS batching (scheduler/schedule_evaluator.h
// defines the workload and every metric).
//
//   expertflow schedule-eval --trace T.jsonl --batch-size 16 --window 4 [--ranks 8]
//                            [--oracle | --predictor P.safetensors] [--seqs 24-31] [--hidden-size 4096]
//                            [--json]
//
// With --predictor, only the sequences the predictor was not trained on are scheduled (as
// eval-predictor scores them), unless --seqs names others.
//
// Output: a `#` header, a fixed-width table (FCFS vs regrouped), or with --json exactly one JSON
// object on stdout. a2a bytes per token = 2 (dispatch + combine) x hidden_size x 2 bytes (bf16) x
// the number of distinct remote ranks among a token's experts, summed over layers.
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "launch/cli_checks.h"
#include "launch/command.h"
#include "placement/predictor_io.h"
#include "placement/routing_trace.h"
#include "runtime/core/build_info.h"
#include "scheduler/expert_path_set.h"
#include "scheduler/schedule_evaluator.h"

#if __has_include("placement/predictor_file.h") && __has_include("placement/trace_inputs.h")
#include "placement/predictor_file.h"
#include "placement/trace_inputs.h"
#define EF_SCHEDULE_EVAL_HAS_PREDICTORS 1
#endif

namespace ef::launch {

namespace {

struct ScheduleEvalArgs {
  std::string trace;
  std::string predictor;
  std::string seqs;  // sequence ids to schedule; empty: see SelectSequences
  bool oracle = false;
  int batch_size = 16;
  int window = 2;
  int ranks = 1;
  int hidden_size = 0;  // 0: from the trace's model, else 4096
  bool keep_sequence_order = false;
  int swap_passes = 2;
  bool json = false;
};

// Hidden size of models whose traces we know; 4096 otherwise.
int DefaultHiddenSize(const std::string& model) {
  std::string m = model;
  std::transform(m.begin(), m.end(), m.begin(), [](unsigned char c) { return std::tolower(c); });
  if (m.find("mixtral-8x7b") != std::string::npos) return 4096;
  if (m.find("mixtral-8x22b") != std::string::npos) return 6144;
  if (m.find("olmoe") != std::string::npos) return 2048;
  if (m.find("qwen1.5-moe") != std::string::npos || m.find("qwen2-moe") != std::string::npos) return 2048;
  return 4096;
}

// The forecast rows for every (sorted) trace token, and the forecast's name.
StatusOr<scheduler::ExpertPathSet> BuildForecast(const ScheduleEvalArgs& args, const placement::RoutingTrace& trace,
                                                 std::string* name) {
  if (args.predictor.empty()) {
    *name = "oracle";
    std::vector<size_t> all(trace.tokens.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    return scheduler::ExpertPathSet::FromTrace(trace, all);
  }
#ifdef EF_SCHEDULE_EVAL_HAS_PREDICTORS
  EF_ASSIGN_OR_RETURN(placement::LoadedPredictor loaded, placement::LoadPredictor(args.predictor));
  const placement::Predictor& p = *loaded.predictor;
  if (p.num_layers() != trace.num_layers() || p.num_experts() != trace.num_experts())
    return InvalidArgument("predictor " + args.predictor + " is for " + std::to_string(p.num_layers()) + " layers x " +
                           std::to_string(p.num_experts()) + " experts, the trace has " +
                           std::to_string(trace.num_layers()) + " x " + std::to_string(trace.num_experts()));
  *name = p.name();
  const placement::TraceInputs inputs(trace);
  scheduler::ExpertPathSet out(static_cast<int>(trace.tokens.size()), trace.num_layers(), trace.num_experts());
  const int k = trace.top_k();
  constexpr size_t kChunk = 256;
  for (size_t s = 0; s < inputs.size(); s += kChunk) {
    const size_t n = std::min(kChunk, inputs.size() - s);
    EF_ASSIGN_OR_RETURN(placement::RoutingForecast f, p.Predict(inputs.inputs().subspan(s, n)));
    if (f.num_tokens != static_cast<int>(n)) return Internal("predictor returned a forecast of the wrong size");
    for (int t = 0; t < f.num_tokens; ++t)
      for (int l = 0; l < f.num_layers; ++l)
        for (int e : f.TopK(t, l, k)) out.Set(static_cast<int>(s) + t, l, e);
  }
  return out;
#else
  return Unimplemented("--predictor is not available in this build (predictor loading has not landed); use --oracle");
#endif
}

// The trace's sequences to schedule: --seqs, else with a predictor the ones it did not train on,
// else all. *what describes the choice for the header.
StatusOr<std::vector<int64_t>> SelectSequences(const ScheduleEvalArgs& args, const placement::RoutingTrace& trace,
                                               std::string* what) {
  const std::vector<int64_t> all = trace.SequenceIds();
  if (!args.seqs.empty()) {
    EF_ASSIGN_OR_RETURN(std::vector<int64_t> s, placement::ParseSeqList(args.seqs));
    *what = "as given";
    return s;
  }
  *what = "all";
#ifdef EF_SCHEDULE_EVAL_HAS_PREDICTORS
  if (!args.predictor.empty()) {
    EF_ASSIGN_OR_RETURN(placement::LoadedPredictor loaded, placement::LoadPredictor(args.predictor));
    const std::vector<int64_t>& trained = loaded.info.train_seqs;
    if (trained.empty()) return all;
    std::vector<int64_t> held;
    for (int64_t s : all)
      if (std::find(trained.begin(), trained.end(), s) == trained.end()) held.push_back(s);
    if (held.empty())
      return InvalidArgument("predictor " + args.predictor + " was trained on every sequence of trace " + args.trace +
                             " (" + placement::FormatSeqList(trained) + "); pass --seqs to schedule some anyway");
    *what = "held out from the predictor's training";
    return held;
  }
#endif
  return all;
}

nlohmann::json SideJson(const scheduler::ScheduleEvalSide& s) {
  return {{"distinct_experts_per_batch_layer", s.distinct_experts_per_batch_layer},
          {"a2a_bytes_per_token", s.a2a_bytes_per_token},
          {"load_imbalance", s.load_imbalance},
          {"expert_load_imbalance", s.expert_load_imbalance},
          {"num_batches", s.num_batches},
          {"max_delay_batches", s.max_delay_batches}};
}

int Run(const ScheduleEvalArgs& args) {
  if (args.batch_size < 1) return ReportError(InvalidArgument("--batch-size must be >= 1"));
  if (args.window < 1) return ReportError(InvalidArgument("--window must be >= 1"));
  if (args.ranks < 1) return ReportError(InvalidArgument("--ranks must be >= 1"));
  if (args.oracle && !args.predictor.empty())
    return ReportError(InvalidArgument("--oracle and --predictor are exclusive"));
  auto trace = placement::ReadRoutingTrace(args.trace);
  if (!trace.ok()) return ReportError(trace.status());
  trace->SortBySeqPos();
  std::string seqs_what;
  auto seqs = SelectSequences(args, *trace, &seqs_what);
  if (!seqs.ok()) return ReportError(seqs.status());
  *trace = trace->Filter([&](int64_t s) { return std::find(seqs->begin(), seqs->end(), s) != seqs->end(); });
  if (trace->tokens.empty())
    return ReportError(InvalidArgument("--seqs " + args.seqs + " selects no token of trace " + args.trace));
  std::string forecast_name;
  auto forecast = BuildForecast(args, *trace, &forecast_name);
  if (!forecast.ok()) return ReportError(forecast.status());

  scheduler::ScheduleEvalOptions opt;
  opt.batch_size = args.batch_size;
  opt.window = args.window;
  opt.num_ranks = args.ranks;
  opt.hidden_size = args.hidden_size > 0 ? args.hidden_size : DefaultHiddenSize(trace->header.model);
  opt.keep_sequence_order = args.keep_sequence_order;
  opt.regroup.max_swap_passes = args.swap_passes;
  auto result = scheduler::ScheduleEvaluator(opt).Run(*trace, *forecast);
  if (!result.ok()) return ReportError(result.status());
  const auto& r = *result;

  if (args.json) {
    nlohmann::json j = {{"fcfs", SideJson(r.fcfs)},
                        {"regrouped", SideJson(r.regrouped)},
                        {"scheduler_us_per_batch", r.scheduler_us_per_batch},
                        {"regroup_us_per_batch", r.regroup_us_per_batch},
                        {"replicas_per_batch", r.replicas_per_batch},
                        {"forecast", forecast_name},
                        {"trace", args.trace},
                        {"model", trace->header.model},
                        {"num_tokens", r.num_tokens},
                        {"seqs", placement::FormatSeqList(*seqs)},
                        {"batch_size", args.batch_size},
                        {"window", args.window},
                        {"ranks", args.ranks},
                        {"hidden_size", opt.hidden_size},
                        {"keep_sequence_order", args.keep_sequence_order},
                        {"reduction", r.reduction}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("# expertflow schedule-eval (git %s, %s build)\n", EF_GIT_SHA, EF_BUILD_TYPE);
  std::printf("# trace %s: %s, %d layers x %d experts, top-%d, %d tokens\n", args.trace.c_str(),
              trace->header.model.c_str(), trace->num_layers(), trace->num_experts(), trace->top_k(), r.num_tokens);
  std::printf("# sequences %s (%s)\n", placement::FormatSeqList(*seqs).c_str(), seqs_what.c_str());
  std::printf("# forecast %s, batch %d, window %d, ranks %d, hidden %d (bf16: %d bytes per token per hop)%s\n",
              forecast_name.c_str(), args.batch_size, args.window, args.ranks, opt.hidden_size, opt.hidden_size * 2,
              args.keep_sequence_order ? ", sequence order kept" : "");
  std::printf("%-10s %8s %14s %16s %10s %12s %9s\n", "schedule", "batches", "experts/b/l", "a2a_B/token", "tok_imb",
              "expert_imb", "max_delay");
  auto row = [](const char* name, const scheduler::ScheduleEvalSide& s) {
    std::printf("%-10s %8d %14.3f %16.1f %10.3f %12.3f %9d\n", name, s.num_batches, s.distinct_experts_per_batch_layer,
                s.a2a_bytes_per_token, s.load_imbalance, s.expert_load_imbalance, s.max_delay_batches);
  };
  row("fcfs", r.fcfs);
  row("regrouped", r.regrouped);
  std::printf(
      "# distinct experts per batch: %.1f%% fewer; a2a bytes: %.1f%% fewer\n", 100 * r.reduction,
      r.fcfs.a2a_bytes_per_token > 0 ? 100 * (1 - r.regrouped.a2a_bytes_per_token / r.fcfs.a2a_bytes_per_token) : 0.0);
  std::printf("# scheduler time per batch (median): %.1f us (regroup %.1f us), planner replicas per batch %.2f\n",
              r.scheduler_us_per_batch, r.regroup_us_per_batch, r.replicas_per_batch);
  return 0;
}

}  // namespace

Command AddScheduleEvalCommand(CLI::App& root) {
  Command c;
  auto args = std::make_shared<ScheduleEvalArgs>();
  c.app = root.add_subcommand("schedule-eval", "Trace-driven evaluation of token regrouping and placement");
  c.app->add_option("--trace", args->trace, "routing trace (moe-routing-trace JSON Lines)")->required();
  c.app->add_option("--batch-size,-b", args->batch_size, "tokens per batch")->check(kPositive)->capture_default_str();
  c.app->add_option("--window,-w", args->window, "batches regrouped together (1: FCFS)")
      ->check(kPositive)
      ->capture_default_str();
  c.app->add_option("--ranks,-r", args->ranks, "ranks (expert-parallel MoE, data-parallel attention)")
      ->check(kPositive)
      ->capture_default_str();
  auto* pred = c.app->add_option("--predictor", args->predictor, "predictor file to forecast routing with");
  auto* orc = c.app->add_flag("--oracle", args->oracle, "forecast with the trace's true routing (default)");
  pred->excludes(orc);
  c.app->add_option("--seqs", args->seqs,
                    "sequence ids to schedule, e.g. 24-31 (default: all; with --predictor, those it was not "
                    "trained on)");
  c.app->add_option("--hidden-size", args->hidden_size, "hidden size (default: from the trace's model, else 4096)")
      ->check(kPositive);
  c.app->add_flag("--keep-sequence-order", args->keep_sequence_order,
                  "never emit a token before an earlier token of its sequence");
  c.app->add_option("--swap-passes", args->swap_passes, "regrouper local-search passes (0: greedy only)")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app->add_flag("--json", args->json, "print one JSON object instead of the table");
  c.run = [args] { return Run(*args); };
  return c;
}

}  // namespace ef::launch
