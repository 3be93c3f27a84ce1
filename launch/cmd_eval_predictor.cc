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
//
//   expertflow eval-predictor --predictor lookahead --lookahead-layers d --model DIR --trace T.jsonl
//       [--test-seqs 24-31] [--k K] [--json]
//
// `lookahead` (placement/lookahead_predictor.h) needs no file but the model: the trace's token
// sequences are run through it (seq order, each sequence in one forward; the trace's tokens are
// the inputs, so every test sequence must list positions 0..n-1 with token ids), and layer m of
// each token is forecast by router m on the hidden state the router of layer m-d saw (layers
// m < d: from the input embedding, i.e. m+1 <= d layers ahead). It is scored against the trace's
// experts. The model's own routing is compared with the trace too (the agreement rate: equal
// expert sets per token and layer). Test sequences default to the last quarter (the complement
// of train-predictor's default training split); the baselines are fitted on the others.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <set>

#include "launch/command.h"
#include "launch/engine_options.h"
#include "placement/affinity_predictor.h"
#include "placement/frequency_predictor.h"
#include "placement/lookahead_predictor.h"
#include "placement/predictor_eval.h"
#include "placement/predictor_file.h"
#include "placement/predictor_io.h"
#include "placement/routing_trace.h"
#include "runtime/engine/engine.h"

namespace ef::launch {
namespace {

using namespace ef::placement;

struct EvalArgs {
  std::string predictor, trace, test_seqs;
  int k = 0;
  bool json = false;
  // --predictor lookahead
  int lookahead_layers = 1;
  bool no_rescale = false;
  ModelFlags model;
};

constexpr const char* kLookahead = "lookahead";

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
  // Forecast cost on this host, scoring included: per token for a whole a-priori path, per token
  // and layer one layer ahead (one PredictGiven call per layer for the batch of test tokens).
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  EF_ASSIGN_OR_RETURN(PredictorMetrics pm, EvaluatePredictor(p, test, DefaultEvalMode(p), a.k));
  const double eval_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
  const double per_call_us =
      eval_us / pm.tokens / (pm.mode == EvalMode::kOneLayerAhead ? static_cast<double>(info.num_layers) : 1.0);
  // A conditional predictor is scored as it is used layer by layer (one layer ahead); its
  // forecast before anything runs (which plans the whole batch) is reported beside it.
  std::optional<PredictorMetrics> prior;
  if (pm.mode == EvalMode::kOneLayerAhead) {
    EF_ASSIGN_OR_RETURN(PredictorMetrics m, EvaluatePredictor(p, test, EvalMode::kAPriori, a.k));
    prior = std::move(m);
  }
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
    if (prior) j["a_priori"] = ToJson(*prior);
    j["forecast_us_per_token"] = per_call_us;
    std::printf("%s\n", j.dump().c_str());
    return Status::Ok();
  }
  std::printf("# eval-predictor predictor=%s kind=%s (%s) trace=%s\n", a.predictor.c_str(), info.kind.c_str(),
              EvalModeName(pm.mode), a.trace.c_str());
  std::printf("# train_seqs=%s test_seqs=%s tokens=%d k=%d%s\n", FormatSeqList(info.train_seqs).c_str(),
              FormatSeqList(test_seqs).c_str(), pm.tokens, pm.k,
              overlap ? "  WARNING: test sequences overlap the training sequences" : "");
  std::printf("# recall@k per layer; affinity is one layer ahead (true routing of layer l-1 observed)\n");
  std::printf("# forecast cost on this host: %.1f us per token%s (scoring included)\n", per_call_us,
              pm.mode == EvalMode::kOneLayerAhead ? " and layer" : "");
  if (prior)
    std::printf("# %s: one layer ahead (layers < l observed); a-priori: %s's forecast before layer 0 runs\n",
                info.kind.c_str(), info.kind.c_str());
  const auto prior_col = [&](double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, " %12.4f", v);
    return prior ? std::string(buf) : std::string();
  };
  std::printf("%-6s %12s%s %12s %12s %12s\n", "layer", info.kind.c_str(), prior ? "     a-priori" : "", "precision",
              "affinity", "frequency");
  for (int l = 0; l < info.num_layers; ++l)
    std::printf("%-6d %12.4f%s %12.4f %12.4f %12.4f\n", l, pm.per_layer_recall[l],
                prior_col(prior ? prior->per_layer_recall[l] : 0).c_str(), pm.per_layer_precision[l],
                am.per_layer_recall[l], fm.per_layer_recall[l]);
  std::printf("%-6s %12.4f%s %12.4f %12.4f %12.4f\n", "mean", pm.recall, prior_col(prior ? prior->recall : 0).c_str(),
              pm.precision, am.recall, fm.recall);
  std::printf("%-6s %12.4f%s %12s %12.4f %12.4f\n", "path", pm.path_recall,
              prior_col(prior ? prior->path_recall : 0).c_str(), "", am.path_recall, fm.path_recall);
  return Status::Ok();
}

// A forecast computed beforehand, behind the Predictor interface, so that EvaluatePredictor
// scores it exactly like the others.
class FixedForecast final : public Predictor {
 public:
  explicit FixedForecast(RoutingForecast f) : f_(std::move(f)) {}
  std::string name() const override { return kLookahead; }
  int num_layers() const override { return f_.num_layers; }
  int num_experts() const override { return f_.num_experts; }
  StatusOr<RoutingForecast> Predict(std::span<const PredictorInput> batch) const override {
    if (static_cast<int>(batch.size()) != f_.num_tokens) return Internal("fixed forecast asked for another batch");
    return f_;
  }

 private:
  RoutingForecast f_;
};

Status RunLookaheadEval(const EvalArgs& a) {
  const int d = a.lookahead_layers;
  if (d < 1) return InvalidArgument("--lookahead-layers must be >= 1, got " + std::to_string(d));
  EF_ASSIGN_OR_RETURN(RoutingTrace trace, ReadRoutingTrace(a.trace));
  EF_ASSIGN_OR_RETURN(auto engine, runtime::Engine::Create(a.model.dir, a.model.ToEngineOptions()));
  const runtime::ModelConfig& c = engine->config();
  Status shape = CheckTraceShape(trace, c.num_moe_layers(), c.num_experts, c.top_k);
  if (!shape.ok())
    return InvalidArgument("trace " + a.trace + " does not fit model " + a.model.dir + ": " + shape.message());
  trace.SortBySeqPos();
  const std::vector<int64_t> all = trace.SequenceIds();
  std::vector<int64_t> test_seqs;
  if (a.test_seqs.empty()) {
    const size_t n_train = std::max<size_t>(1, static_cast<size_t>(std::floor(all.size() * 0.75)));
    test_seqs.assign(all.begin() + static_cast<std::ptrdiff_t>(std::min(n_train, all.size())), all.end());
  } else {
    EF_ASSIGN_OR_RETURN(test_seqs, ParseSeqList(a.test_seqs));
  }
  std::set<int64_t> test_set(test_seqs.begin(), test_seqs.end());
  RoutingTrace test = trace.Filter([&](int64_t s) { return test_set.count(s) > 0; });
  RoutingTrace base = trace.Filter([&](int64_t s) { return test_set.count(s) == 0; });
  if (test.tokens.empty())
    return InvalidArgument("no test tokens: the test sequences (" + FormatSeqList(test_seqs) +
                           ") select nothing in trace " + a.trace);
  if (base.tokens.empty())
    return InvalidArgument("every sequence of trace " + a.trace +
                           " is a test sequence; none is left to fit the baselines on (use --test-seqs)");
  std::vector<int64_t> base_seqs = base.SequenceIds();

  // Every test sequence must be complete from position 0 with known tokens: they are the inputs.
  const int L = c.num_moe_layers(), E = c.num_experts, K = c.top_k;
  const int n = static_cast<int>(test.tokens.size());
  std::map<int64_t, std::pair<int, int>> span;  // seq -> (first token index, length)
  for (int t = 0; t < n; ++t) {
    const TraceToken& tk = test.tokens[t];
    auto [it, fresh] = span.try_emplace(tk.seq, t, 0);
    if (tk.pos != it->second.second)
      return InvalidArgument("trace " + a.trace + ": sequence " + std::to_string(tk.seq) + " has position " +
                             std::to_string(tk.pos) + " where " + std::to_string(it->second.second) +
                             " was expected; lookahead re-runs the model and needs positions 0..n-1, each once");
    if (tk.token < 0 || tk.token >= c.vocab_size)
      return InvalidArgument("trace " + a.trace + ": sequence " + std::to_string(tk.seq) + " position " +
                             std::to_string(tk.pos) + " has no token id in the model's vocabulary (" +
                             std::to_string(tk.token) + "); lookahead needs the tokens to re-run the model");
    ++it->second.second;
  }

  LookaheadOptions lo;
  lo.max_lookahead = d;
  lo.rescale_norm = !a.no_rescale;
  EF_ASSIGN_OR_RETURN(auto look, LookaheadPredictor::FromModel(engine->weights(), lo));
  RoutingForecast forecast(n, L, E);
  std::vector<int64_t> agree_set(L, 0), agree_ordered(L, 0);
  const int H = c.hidden_size;
  engine->set_expose_router_inputs(true);
  engine->AddRoutingHook([&](runtime::LayerRouting& r) -> Status {
    const int s = r.moe_layer.index;
    for (int t = 0; t < r.num_tokens; ++t) {
      const int idx = span.at(r.seq[t]).first + r.pos[t];
      const int16_t* truth = test.tokens[idx].experts.data() + static_cast<size_t>(s) * K;
      std::vector<int> mine(r.ids.begin() + t * r.top_k, r.ids.begin() + (t + 1) * r.top_k);
      std::vector<int> want(truth, truth + K);
      agree_ordered[s] += mine == want;
      std::sort(mine.begin(), mine.end());
      std::sort(want.begin(), want.end());
      agree_set[s] += mine == want;
      if (s + d < L)
        EF_RETURN_IF_ERROR(
            look->LayerProbs(r.hidden.subspan(static_cast<size_t>(t) * H, H), s, s + d, forecast.row(idx, s + d)));
    }
    return Status::Ok();
  });
  for (const auto& [seq, first_len] : span) {
    const auto [first, len] = first_len;
    std::vector<int32_t> ids(len);
    for (int i = 0; i < len; ++i) {
      ids[i] = static_cast<int32_t>(test.tokens[first + i].token);
      // Layers m < d have no layer m-d: forecast them from the input embedding.
      EF_ASSIGN_OR_RETURN(std::vector<float> emb, LookaheadPredictor::InputEmbedding(engine->weights(), ids[i]));
      for (int m = 0; m < std::min(d, L); ++m)
        EF_RETURN_IF_ERROR(look->LayerProbs(emb, -1, m, forecast.row(first + i, m)));
    }
    EF_RETURN_IF_ERROR(engine->AddSequence(seq));
    runtime::SeqChunk chunk{seq, ids, /*all_logits=*/false};
    runtime::ForwardResult res;
    Status st = engine->Forward({&chunk, 1}, &res);
    engine->RemoveSequence(seq);
    EF_RETURN_IF_ERROR(st);
  }
  std::vector<double> agreement(L);
  for (int l = 0; l < L; ++l) agreement[l] = static_cast<double>(agree_set[l]) / n;
  const double agree_mean = std::accumulate(agreement.begin(), agreement.end(), 0.0) / L;
  const double agree_ordered_mean =
      static_cast<double>(std::accumulate(agree_ordered.begin(), agree_ordered.end(), int64_t{0})) / (n * L);

  FixedForecast fixed(std::move(forecast));
  EF_ASSIGN_OR_RETURN(PredictorMetrics pm, EvaluatePredictor(fixed, test, EvalMode::kAPriori, a.k));
  EF_ASSIGN_OR_RETURN(auto freq, FrequencyPredictor::Fit(base));
  EF_ASSIGN_OR_RETURN(auto aff, AffinityPredictor::Fit(base));
  EF_ASSIGN_OR_RETURN(PredictorMetrics fm, EvaluatePredictor(*freq, test, EvalMode::kAPriori, a.k));
  EF_ASSIGN_OR_RETURN(PredictorMetrics am, EvaluatePredictor(*aff, test, EvalMode::kOneLayerAhead, a.k));
  if (a.json) {
    nlohmann::json j = ToJson(pm);
    j["mode"] = "lookahead";
    j["predictor"] = kLookahead;
    j["lookahead_layers"] = d;
    j["rescale_norm"] = lo.rescale_norm;
    j["model"] = a.model.dir;
    j["train_seqs"] = FormatSeqList(base_seqs);
    j["test_seqs"] = FormatSeqList(test_seqs);
    j["test_overlaps_training"] = false;
    j["baseline_frequency"] = ToJson(fm);
    j["baseline_affinity"] = ToJson(am);
    j["trace_agreement"] = {{"mean", agree_mean}, {"per_layer", agreement}, {"ordered", agree_ordered_mean}};
    std::printf("%s\n", j.dump().c_str());
    return Status::Ok();
  }
  const std::string col = "lookahead-" + std::to_string(d);
  std::printf(
      "# eval-predictor predictor=lookahead d=%d (router of layer l on the hidden state of layer l-%d; "
      "layers < %d from the input embedding) model=%s trace=%s\n",
      d, d, d, a.model.dir.c_str(), a.trace.c_str());
  std::printf("# baselines fitted on seqs=%s test_seqs=%s tokens=%d k=%d rescale_norm=%d\n",
              FormatSeqList(base_seqs).c_str(), FormatSeqList(test_seqs).c_str(), pm.tokens, pm.k,
              lo.rescale_norm ? 1 : 0);
  std::printf(
      "# the model's own routing reproduces the trace's expert sets for %.4f of (token, layer) (same order: "
      "%.4f)\n",
      agree_mean, agree_ordered_mean);
  std::printf("# recall@k per layer; affinity is one layer ahead (true routing of layer l-1 observed)\n");
  std::printf("%-6s %12s %12s %12s %12s %12s\n", "layer", col.c_str(), "precision", "affinity", "frequency",
              "agreement");
  for (int l = 0; l < L; ++l)
    std::printf("%-6d %12.4f %12.4f %12.4f %12.4f %12.4f\n", l, pm.per_layer_recall[l], pm.per_layer_precision[l],
                am.per_layer_recall[l], fm.per_layer_recall[l], agreement[l]);
  std::printf("%-6s %12.4f %12.4f %12.4f %12.4f %12.4f\n", "mean", pm.recall, pm.precision, am.recall, fm.recall,
              agree_mean);
  std::printf("%-6s %12.4f %12s %12.4f %12.4f\n", "path", pm.path_recall, "", am.path_recall, fm.path_recall);
  return Status::Ok();
}

}  // namespace

Command AddEvalPredictorCommand(CLI::App& root) {
  auto args = std::make_shared<EvalArgs>();
  Command c;
  c.app = root.add_subcommand("eval-predictor", "Evaluate a routing predictor on a routing trace");
  CLI::App* app = c.app;
  app->add_option("--predictor", args->predictor,
                  "predictor file written by train-predictor, or 'lookahead' (later routers on the hidden state; "
                  "needs --model)")
      ->required();
  app->add_option("--trace", args->trace, "routing trace (moe-routing-trace JSONL)")->required();
  app->add_option("--test-seqs", args->test_seqs, "test sequence ids, e.g. 24-31 (default: all not trained on)");
  app->add_option("--k", args->k, "experts predicted per layer (default: the trace's top_k)");
  app->add_flag("--json", args->json, "print one JSON object instead of the table");
  app->add_option("--lookahead-layers", args->lookahead_layers,
                  "lookahead: forecast layer l from the hidden state of layer l-d")
      ->capture_default_str();
  app->add_flag("--lookahead-no-rescale", args->no_rescale,
                "lookahead: apply the routers to the raw normalised hidden state (no norm-weight rescaling)");
  args->model.Register(app);
  c.run = [args] {
    Status s = args->predictor == kLookahead ? RunLookaheadEval(*args) : RunEval(*args);
    return s.ok() ? 0 : ReportError(s);
  };
  return c;
}

}  // namespace ef::launch
