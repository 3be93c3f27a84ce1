// expertflow eval-predictor: scores a saved predictor on a routing trace, side by side with a
// frequency and an affinity baseline fitted on the predictor's own training sequences.
//
//   expertflow eval-predictor --predictor P.safetensors --trace T.jsonl [--test-seqs 24-31]
//       [--k K] [--json]
//
// Metrics and evaluation modes are defined in placement/predictor_eval.h: path and frequency
// forecast every layer a priori; affinity and hybrid forecast layer l from the true routing of
// layers < l (one layer ahead). Test sequences default to every sequence the predictor was not
// trained on.
#include <cstdio>
#include <nlohmann/json.hpp>
#include <set>

#include "launch/command.h"
#include "placement/affinity_predictor.h"
#include "placement/frequency_predictor.h"
#include "placement/predictor_eval.h"
#include "placement/predictor_file.h"
#include "placement/predictor_io.h"
#include "placement/routing_trace.h"

namespace ef::launch {
namespace {

using namespace ef::placement;

struct EvalArgs {
  std::string predictor, trace, test_seqs;
  int k = 0;
  bool json = false;
};

nlohmann::json ToJson(const PredictorMetrics& m) {
  return {{"recall", m.recall},           {"per_layer_recall", m.per_layer_recall},
          {"precision", m.precision},     {"per_layer_precision", m.per_layer_precision},
          {"path_recall", m.path_recall}, {"mode", EvalModeName(m.mode)},
          {"tokens", m.tokens},           {"k", m.k}};
}

Status RunEval(const EvalArgs& a) {
  EF_ASSIGN_OR_RETURN(LoadedPredictor loaded, LoadPredictor(a.predictor));
  EF_ASSIGN_OR_RETURN(RoutingTrace trace, ReadRoutingTrace(a.trace));
  const PredictorInfo& info = loaded.info;
  Status shape = CheckTraceShape(trace, info.num_layers, info.num_experts, info.top_k);
  if (!shape.ok())
    return InvalidArgument("predictor " + a.predictor + " does not fit trace " + a.trace + ": " + shape.message());
  trace.SortBySeqPos();
  std::set<int64_t> train_set(info.train_seqs.begin(), info.train_seqs.end());
  std::vector<int64_t> test_seqs;
  if (a.test_seqs.empty()) {
    for (int64_t s : trace.SequenceIds())
      if (!train_set.count(s)) test_seqs.push_back(s);
  } else {
    EF_ASSIGN_OR_RETURN(test_seqs, ParseSeqList(a.test_seqs));
  }
  std::set<int64_t> test_set(test_seqs.begin(), test_seqs.end());
  RoutingTrace test = trace.Filter([&](int64_t s) { return test_set.count(s) > 0; });
  if (test.tokens.empty())
    return InvalidArgument("no test tokens: the test sequences (" + FormatSeqList(test_seqs) +
                           ") select nothing in trace " + a.trace +
                           " (training sequences: " + FormatSeqList(info.train_seqs) + ")");
  // Baselines are fitted on the predictor's training sequences (all non-test ones if unknown).
  RoutingTrace base =
      trace.Filter([&](int64_t s) { return train_set.empty() ? test_set.count(s) == 0 : train_set.count(s) > 0; });
  if (base.tokens.empty())
    return InvalidArgument("trace " + a.trace + " holds none of the predictor's training sequences (" +
                           FormatSeqList(info.train_seqs) + ") to fit the baselines on");
  int overlap = 0;
  for (int64_t s : test_seqs) overlap += train_set.count(s) > 0;

  const Predictor& p = *loaded.predictor;
  EF_ASSIGN_OR_RETURN(PredictorMetrics pm, EvaluatePredictor(p, test, DefaultEvalMode(p), a.k));
  EF_ASSIGN_OR_RETURN(auto freq, FrequencyPredictor::Fit(base));
  EF_ASSIGN_OR_RETURN(auto aff, AffinityPredictor::Fit(base));
  EF_ASSIGN_OR_RETURN(PredictorMetrics fm, EvaluatePredictor(*freq, test, EvalMode::kAPriori, a.k));
  EF_ASSIGN_OR_RETURN(PredictorMetrics am, EvaluatePredictor(*aff, test, EvalMode::kOneLayerAhead, a.k));

  if (a.json) {
    nlohmann::json j = ToJson(pm);
    j["predictor"] = info.kind;
    j["train_seqs"] = FormatSeqList(info.train_seqs);
    j["test_seqs"] = FormatSeqList(test_seqs);
    j["test_overlaps_training"] = overlap > 0;
    j["baseline_frequency"] = ToJson(fm);
    j["baseline_affinity"] = ToJson(am);
    std::printf("%s\n", j.dump().c_str());
    return Status::Ok();
  }
  std::printf("# eval-predictor predictor=%s kind=%s (%s) trace=%s\n", a.predictor.c_str(), info.kind.c_str(),
              EvalModeName(pm.mode), a.trace.c_str());
  std::printf("# train_seqs=%s test_seqs=%s tokens=%d k=%d%s\n", FormatSeqList(info.train_seqs).c_str(),
              FormatSeqList(test_seqs).c_str(), pm.tokens, pm.k,
              overlap ? "  WARNING: test sequences overlap the training sequences" : "");
  std::printf("# recall@k per layer; affinity is one layer ahead (true routing of layer l-1 observed)\n");
  std::printf("%-6s %12s %12s %12s %12s\n", "layer", info.kind.c_str(), "precision", "affinity", "frequency");
  for (int l = 0; l < info.num_layers; ++l)
    std::printf("%-6d %12.4f %12.4f %12.4f %12.4f\n", l, pm.per_layer_recall[l], pm.per_layer_precision[l],
                am.per_layer_recall[l], fm.per_layer_recall[l]);
  std::printf("%-6s %12.4f %12.4f %12.4f %12.4f\n", "mean", pm.recall, pm.precision, am.recall, fm.recall);
  std::printf("%-6s %12.4f %12s %12.4f %12.4f\n", "path", pm.path_recall, "", am.path_recall, fm.path_recall);
  return Status::Ok();
}

}  // namespace

Command AddEvalPredictorCommand(CLI::App& root) {
  auto args = std::make_shared<EvalArgs>();
  Command c;
  c.app = root.add_subcommand("eval-predictor", "Evaluate a routing predictor on a routing trace");
  CLI::App* app = c.app;
  app->add_option("--predictor", args->predictor, "predictor file written by train-predictor")->required();
  app->add_option("--trace", args->trace, "routing trace (moe-routing-trace JSONL)")->required();
  app->add_option("--test-seqs", args->test_seqs, "test sequence ids, e.g. 24-31 (default: all not trained on)");
  app->add_option("--k", args->k, "experts predicted per layer (default: the trace's top_k)");
  app->add_flag("--json", args->json, "print one JSON object instead of the table");
  c.run = [args] {
    Status s = RunEval(*args);
    return s.ok() ? 0 : ReportError(s);
  };
  return c;
}

}  // namespace ef::launch
