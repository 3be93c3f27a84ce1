// `expertflow place`: an offline expert placement fitted on a routing trace
// (placement/placement_optimizer.h), written as the placement file that `cluster.placement` /
// `--placement` read, and scored against contiguous and round-robin placements on held-out
// sequences.
//
//   expertflow place --trace T.jsonl --ranks R [--train-seqs A-B] [--test-seqs C-D] [--replicate N]
//                    --out placement.json [--json]
//
// Cost (placement/expert_layout.h): remote ranks per token-layer = distinct ranks among a token's
// top-k experts at a layer, minus one, averaged over the test tokens' (token, MoE layer) pairs;
// a2a bytes per token-layer are that times 2 (dispatch and combine) x the hidden state's bytes.
// "pinned" is the same count when each test sequence lives on one rank for all layers (assigned
// by locality, balanced), the case where consecutive-layer affinity pays.
// Default split: the first three quarters of the trace's sequence ids train, the rest test.
// Output: a `#` header and a fixed-width table, or with --json one JSON object on stdout.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "launch/cli_checks.h"
#include "launch/command.h"
#include "placement/expert_layout.h"
#include "placement/placement_optimizer.h"
#include "placement/predictor_io.h"
#include "placement/routing_trace.h"
#include "runtime/core/build_info.h"

namespace ef::launch {
namespace {

struct PlaceArgs {
  std::string trace, out, train_seqs, test_seqs;
  placement::PlacementOptimizerOptions optimizer;
  bool json = false;
};

// The training and test sequence ids (see the file comment for the default split).
Status SplitSequences(const PlaceArgs& a, const placement::RoutingTrace& trace, std::vector<int64_t>* train,
                      std::vector<int64_t>* test) {
  const std::vector<int64_t> all = trace.SequenceIds();
  auto parse = [&](const std::string& text, const char* flag, std::vector<int64_t>* out) -> Status {
    auto s = placement::ParseSeqList(text);
    if (!s.ok()) return InvalidArgument(std::string(flag) + " " + text + ": " + s.status().message());
    out->clear();
    for (int64_t id : *s)
      if (std::binary_search(all.begin(), all.end(), id)) out->push_back(id);
    if (out->empty())
      return InvalidArgument(std::string(flag) + " " + text + " selects no sequence of trace " + a.trace +
                             " (its sequences: " + placement::FormatSeqList(all) + ")");
    return Status::Ok();
  };
  if (!a.train_seqs.empty()) {
    EF_RETURN_IF_ERROR(parse(a.train_seqs, "--train-seqs", train));
  } else {
    if (all.size() < 2)
      return InvalidArgument("trace " + a.trace + " has one sequence (\"seq\" " + std::to_string(all[0]) +
                             "): a held-out split needs two or more, or give --train-seqs and --test-seqs");
    train->assign(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(all.size() * 3 / 4));
  }
  if (!a.test_seqs.empty()) return parse(a.test_seqs, "--test-seqs", test);
  test->clear();
  for (int64_t s : all)
    if (!std::binary_search(train->begin(), train->end(), s)) test->push_back(s);
  if (test->empty())
    return InvalidArgument("--train-seqs " + a.train_seqs + " leaves no sequence of trace " + a.trace +
                           " to score on; give --test-seqs");
  return Status::Ok();
}

struct Scores {
  double remote = 0, pinned = 0;
};

Scores Score(const placement::RoutingTrace& test, const placement::ExpertLayout& layout) {
  return {placement::RemoteRanksPerTokenLayer(test, layout), placement::PinnedRemoteRanks(test, layout)};
}

Status RunPlace(const PlaceArgs& a) {
  EF_ASSIGN_OR_RETURN(placement::RoutingTrace trace, placement::ReadRoutingTrace(a.trace));
  trace.SortBySeqPos();
  std::vector<int64_t> train_ids, test_ids;
  EF_RETURN_IF_ERROR(SplitSequences(a, trace, &train_ids, &test_ids));
  std::sort(train_ids.begin(), train_ids.end());
  std::sort(test_ids.begin(), test_ids.end());
  auto in = [](const std::vector<int64_t>& ids) {
    return [&ids](int64_t s) { return std::binary_search(ids.begin(), ids.end(), s); };
  };
  const placement::RoutingTrace train = trace.Filter(in(train_ids)), test = trace.Filter(in(test_ids));

  const auto t0 = std::chrono::steady_clock::now();
  EF_ASSIGN_OR_RETURN(placement::ExpertLayout placed, placement::PlacementOptimizer(a.optimizer).Fit(train));
  const double fit_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  {
    std::ofstream out(a.out);
    if (!out) return NotFound("cannot write placement file " + a.out);
    out << placed.ToJson().dump() << "\n";
    if (!out) return DataLoss("error writing placement file " + a.out);
  }
  const int L = trace.num_layers(), E = trace.num_experts(), R = a.optimizer.num_ranks;
  const Scores contiguous = Score(test, placement::ExpertLayout::Contiguous(L, E, R));
  const Scores round_robin = Score(test, placement::ExpertLayout::RoundRobin(L, E, R));
  const Scores mine = Score(test, placed);
  const double train_cost = placement::RemoteRanksPerTokenLayer(train, placed);
  const double reduction = contiguous.remote > 0 ? 1 - mine.remote / contiguous.remote : 0;
  if (a.json) {
    nlohmann::json j = {
        {"contiguous", contiguous.remote},
        {"round_robin", round_robin.remote},
        {"placed", mine.remote},
        {"reduction_vs_contiguous", reduction},
        {"placed_train", train_cost},
        {"pinned", {{"contiguous", contiguous.pinned}, {"round_robin", round_robin.pinned}, {"placed", mine.pinned}}},
        {"ranks", R},
        {"replicate", a.optimizer.replicate},
        {"train_seqs", placement::FormatSeqList(train_ids)},
        {"test_seqs", placement::FormatSeqList(test_ids)},
        {"test_tokens", test.tokens.size()},
        {"trace", a.trace},
        {"out", a.out},
        {"fit_s", fit_s}};
    std::printf("%s\n", j.dump().c_str());
    return Status::Ok();
  }
  std::printf("# expertflow place (git %s, %s build)\n", EF_GIT_SHA, EF_BUILD_TYPE);
  std::printf("# trace %s: %s, %d MoE layers x %d experts, top-%d\n", a.trace.c_str(), trace.header.model.c_str(), L, E,
              trace.top_k());
  std::printf("# %d ranks, replicate %d; fitted on sequences %s (%zu tokens) in %.2f s, scored on %s (%zu tokens)\n", R,
              a.optimizer.replicate, placement::FormatSeqList(train_ids).c_str(), train.tokens.size(), fit_s,
              placement::FormatSeqList(test_ids).c_str(), test.tokens.size());
  std::printf(
      "# remote = distinct ranks among a token's experts - 1, per token-layer; pinned = ranks other than the "
      "sequence's own (one rank per sequence, locality-assigned)\n");
  std::printf("%-12s %12s %14s %12s\n", "placement", "remote/tl", "vs_contiguous", "pinned/tl");
  auto row = [&](const char* name, const Scores& s) {
    std::printf("%-12s %12.4f %13.1f%% %12.4f\n", name, s.remote,
                contiguous.remote > 0 ? 100 * (s.remote / contiguous.remote - 1) : 0.0, s.pinned);
  };
  row("contiguous", contiguous);
  row("round_robin", round_robin);
  row("placed", mine);
  std::printf("# wrote %s (placed on the training sequences: %.4f)\n", a.out.c_str(), train_cost);
  return Status::Ok();
}

}  // namespace

Command AddPlaceCommand(CLI::App& root) {
  auto a = std::make_shared<PlaceArgs>();
  Command c;
  c.app = root.add_subcommand("place", "Fit an expert placement that cuts all-to-all traffic on a routing trace");
  c.app->add_option("--trace", a->trace, "routing trace (moe-routing-trace JSONL)")->required();
  c.app->add_option("--ranks", a->optimizer.num_ranks, "ranks of the placement (1..64)")->required();
  c.app->add_option("--out", a->out, "placement file to write (cluster.placement)")->required()->check(kOutputFile);
  c.app->add_option("--train-seqs", a->train_seqs, "sequence ids to fit on, e.g. 0-23 (default: the first 3/4)");
  c.app->add_option("--test-seqs", a->test_seqs, "sequence ids to score on (default: the others)");
  c.app->add_option("--replicate", a->optimizer.replicate, "per MoE layer, give the N hottest experts a second copy")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app->add_option("--restarts", a->optimizer.restarts, "local-search starts per layer")
      ->check(kPositive)
      ->capture_default_str();
  c.app->add_option("--perturbations", a->optimizer.perturbations, "iterated-local-search kicks per start")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app->add_option("--seed", a->optimizer.seed, "seed of the random starts and kicks")
      ->check(kSeed)
      ->capture_default_str();
  c.app->add_flag(
      "--no-align", [a](int64_t) { a->optimizer.align_layers = false; },
      "do not number each layer's groups for consecutive-layer affinity");
  c.app->add_flag("--json", a->json, "print one JSON object instead of the table");
  c.run = [a] {
    Status s = RunPlace(*a);
    return s.ok() ? 0 : ReportError(s);
  };
  return c;
}

}  // namespace ef::launch
