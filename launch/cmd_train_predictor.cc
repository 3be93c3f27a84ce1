// expertflow train-predictor: fits a routing predictor on a routing trace and saves it as a
// safetensors file (placement/predictor_file.h).
//
//   expertflow train-predictor --trace T.jsonl --kind path --out P.safetensors [--train-seqs 0-23]
//       [--epochs 40] [--seed 1] [--model DIR]
//
// The training sequences (default: the first 75% of the trace's sequence ids) are recorded in
// the file so eval-predictor can fit its baselines on them and test on the rest. For the path
// and hybrid kinds the last eighth of the training sequences (at least one) is held out as the
// validation split (early stopping, per-layer blend weights). One progress line per epoch.
#include <cmath>
#include <cstdio>
#include <set>

#include "launch/cli_checks.h"
#include "launch/command.h"
#include "placement/affinity_predictor.h"
#include "placement/frequency_predictor.h"
#include "placement/hybrid_predictor.h"
#include "placement/path_predictor.h"
#include "placement/predictor_file.h"
#include "placement/predictor_io.h"
#include "placement/routing_trace.h"
#include "runtime/core/logging.h"

namespace ef::launch {
namespace {

using namespace ef::placement;

struct TrainArgs {
  std::string trace, kind = "path", out, train_seqs, model;
  PathPredictorOptions path;
};

Status RunTrain(const TrainArgs& a) {
  EF_ASSIGN_OR_RETURN(RoutingTrace trace, ReadRoutingTrace(a.trace));
  trace.SortBySeqPos();
  std::vector<int64_t> all = trace.SequenceIds();
  std::vector<int64_t> train_seqs;
  if (a.train_seqs.empty()) {
    size_t n = std::max<size_t>(1, static_cast<size_t>(std::floor(all.size() * 0.75)));
    train_seqs.assign(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n));
  } else {
    EF_ASSIGN_OR_RETURN(std::vector<int64_t> wanted, ParseSeqList(a.train_seqs));
    std::set<int64_t> present(all.begin(), all.end());
    for (int64_t s : wanted)
      if (present.count(s)) train_seqs.push_back(s);
    if (train_seqs.empty())
      return InvalidArgument("--train-seqs " + a.train_seqs + " selects no sequence of trace " + a.trace);
  }
  std::set<int64_t> train_set(train_seqs.begin(), train_seqs.end());
  RoutingTrace train = trace.Filter([&](int64_t s) { return train_set.count(s) > 0; });
  // Validation: the last eighth of the training sequences (none when there is only one).
  const size_t n_val = train_seqs.size() >= 2 ? std::max<size_t>(1, train_seqs.size() / 8) : 0;
  std::set<int64_t> val_set(train_seqs.end() - static_cast<std::ptrdiff_t>(n_val), train_seqs.end());
  RoutingTrace fit = train.Filter([&](int64_t s) { return val_set.count(s) == 0; });
  RoutingTrace val = train.Filter([&](int64_t s) { return val_set.count(s) > 0; });
  if (!a.model.empty())
    std::printf("# --model %s: accepted; using the served model's input embeddings is not implemented yet\n",
                a.model.c_str());
  std::printf("# train-predictor kind=%s trace=%s train_seqs=%s (%zu tokens)", a.kind.c_str(), a.trace.c_str(),
              FormatSeqList(train_seqs).c_str(), train.tokens.size());
  if (a.kind == "path" || a.kind == "hybrid")
    std::printf(" fit_seqs=%zu val_seqs=%s", train_seqs.size() - n_val,
                FormatSeqList({val_set.begin(), val_set.end()}).c_str());
  std::printf("\n");
  std::fflush(stdout);

  PredictorInfo info;
  info.kind = a.kind;
  info.num_layers = trace.num_layers();
  info.num_experts = trace.num_experts();
  info.top_k = trace.top_k();
  info.model = trace.header.model;
  info.trace = a.trace;
  info.train_seqs = train_seqs;

  auto progress = [](const PathEpochReport& r) {
    std::printf("epoch %3d  train_loss %.5f  val_loss %.5f  val_recall %.4f%s\n", r.epoch, r.train_loss, r.val_loss,
                r.val_recall, r.best ? "  *" : "");
    std::fflush(stdout);
  };
  std::unique_ptr<Predictor> predictor;
  if (a.kind == "frequency") {
    EF_ASSIGN_OR_RETURN(predictor, FrequencyPredictor::Fit(train));
  } else if (a.kind == "affinity") {
    EF_ASSIGN_OR_RETURN(predictor, AffinityPredictor::Fit(train));
  } else if (a.kind == "path" || a.kind == "hybrid") {
    EF_ASSIGN_OR_RETURN(auto path, PathPredictor::Train(fit, val, a.path, progress));
    const auto print_layers = [](const char* what, const std::vector<float>& v) {
      std::printf("# %s:", what);
      for (float t : v) std::printf(" %.2g", t);
      std::printf("\n");
    };
    print_layers("a priori, per-layer trust in the network (vs popularity)", path->layer_trust());
    print_layers("a priori, per-layer weight of its view with token ids (vs without)", path->layer_token_weight());
    if (a.path.observe_path) {
      print_layers("corrected (layers < l observed), trust in the network", path->layer_trust_given());
      print_layers("corrected, weight of the view with token ids", path->layer_token_weight_given());
    }
    if (a.kind == "path") {
      predictor = std::move(path);
    } else {
      EF_ASSIGN_OR_RETURN(auto aff, AffinityPredictor::Fit(fit));
      auto hybrid = std::make_unique<HybridPredictor>(std::move(path), std::move(aff), std::vector<float>{});
      EF_RETURN_IF_ERROR(hybrid->FitWeights(val));
      std::printf("# per-layer weight of the path forecast (vs affinity):");
      for (float w : hybrid->weights()) std::printf(" %.1f", w);
      std::printf("\n");
      predictor = std::move(hybrid);
    }
  } else {
    return InvalidArgument("unknown --kind \"" + a.kind + "\" (expected path, affinity, frequency or hybrid)");
  }
  EF_RETURN_IF_ERROR(SavePredictor(*predictor, info, a.out));
  std::printf("# wrote %s predictor to %s\n", a.kind.c_str(), a.out.c_str());
  return Status::Ok();
}

}  // namespace

Command AddTrainPredictorCommand(CLI::App& root) {
  auto args = std::make_shared<TrainArgs>();
  Command c;
  c.app = root.add_subcommand("train-predictor", "Train a routing predictor on a routing trace");
  CLI::App* app = c.app;
  app->add_option("--trace", args->trace, "routing trace (moe-routing-trace JSONL)")->required();
  app->add_option("--kind", args->kind, "path | hybrid | affinity | frequency")
      ->capture_default_str()
      ->check(CLI::IsMember({"path", "hybrid", "affinity", "frequency"}));
  app->add_option("--out", args->out, "output predictor file (.safetensors)")->required()->check(kOutputFile);
  app->add_option("--train-seqs", args->train_seqs, "training sequence ids, e.g. 0-23 (default: first 75%)");
  app->add_option("--epochs", args->path.epochs, "maximum epochs (path, hybrid)")->capture_default_str();
  app->add_option("--seed", args->path.seed, "random seed (path, hybrid)")->check(kSeed)->capture_default_str();
  app->add_option("--hidden", args->path.hidden, "hidden units (path, hybrid)")->capture_default_str();
  app->add_option("--embed-dim", args->path.embed_dim, "token embedding width (path, hybrid)")->capture_default_str();
  app->add_option("--context", args->path.context_window, "context tokens averaged (path, hybrid)")
      ->capture_default_str();
  app->add_option("--lr", args->path.learning_rate, "Adam learning rate (path, hybrid)")->capture_default_str();
  app->add_option("--patience", args->path.patience, "early-stopping patience in epochs")->capture_default_str();
  app->add_option("--weight-decay", args->path.weight_decay, "L2 weight on all parameters (path, hybrid)")
      ->check(kNonNegative)
      ->capture_default_str();
  app->add_option("--token-dropout", args->path.token_dropout,
                  "probability a training token id is replaced by 'unknown' (path, hybrid)")
      ->check(CLI::Range(0.0, 0.99))
      ->capture_default_str();
  app->add_option("--path-samples", args->path.path_samples,
                  "observed path prefixes per token and epoch (path, hybrid; 0: a-priori training only)")
      ->check(kNonNegative)
      ->capture_default_str();
  app->add_option("--path-window", args->path.path_window,
                  "most recent observed layers a corrected forecast reads (path, hybrid; 0: all)")
      ->check(kNonNegative)
      ->capture_default_str();
  app->add_option("--batch-size", args->path.batch_size, "tokens per Adam step (path, hybrid)")
      ->check(kPositive)
      ->capture_default_str();
  app->add_option("--threads", args->path.num_threads, "training threads, 1..64 (results depend on it)")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  app->add_option("--model", args->model,
                  "served model directory; accepted for the future use of its input embeddings (not used yet)");
  c.run = [args] {
    Status s = RunTrain(*args);
    return s.ok() ? 0 : ReportError(s);
  };
  return c;
}

}  // namespace ef::launch
