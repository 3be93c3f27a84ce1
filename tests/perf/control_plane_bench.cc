// The control plane at scale, no processes: for batches of 256 tokens of recorded routing (the
// FLAME-MoE trace) and of a synthetic DeepSeek-V3 shape (58 MoE layers x 256 experts, top-8, Zipf
// skew 1.0), at 8, 64 and 256 simulated ranks, times the planner (placement::Planner::Plan), the
// forecast -> expert paths step (ExpertPathSet::FromForecast), the request->rank assigner
// (scheduler::RankAssigner::Assign, one unit per token) and the token regrouper
// (scheduler::TokenRegrouper, a window of 2 batches), and counts the all-to-all traffic
// under the assigner's model: hidden-state copies a token sends to other ranks, dispatch + combine,
// summed over layers, for round-robin vs locality assignment. Bytes per token = copies x hidden x
// 2 (bf16). Single thread.
//   ef_control_plane_bench TRACE.jsonl [--json]
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "placement/planner.h"
#include "placement/routing_trace.h"
#include "scheduler/expert_path_set.h"
#include "scheduler/rank_assigner.h"
#include "scheduler/token_regrouper.h"
#include "tests/scheduler/control_plane_workload.h"

namespace {

using Clock = std::chrono::steady_clock;
double Ms(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); }

struct Row {
  std::string workload;
  int ranks = 0;
  double plan_ms = 0, paths_ms = 0, assign_ms = 0, regroup_ms = 0;
  double replicas = 0;                   // the plan's copies beyond one per needed expert, per batch
  double rr_copies = 0, loc_copies = 0;  // per token, dispatch + combine, all layers
  double plan_imbalance = 0, token_imbalance = 0;
  int hidden = 0;
};

double Copies(const ef::scheduler::ExpertPathSet& paths, const std::vector<int>& rank,
              const ef::placement::BatchPlan& p) {
  long sends = 0;
  for (int t = 0; t < paths.num_tokens(); ++t) sends += ef::scheduler::RankAssigner::TokenSends(paths, t, rank[t], p);
  return 2.0 * sends / paths.num_tokens();
}

Row Measure(const std::string& name, const std::vector<ef::placement::RoutingForecast>& batches, int top_k, int ranks,
            int hidden) {
  Row row{name, ranks};
  row.hidden = hidden;
  ef::placement::Planner planner;
  ef::scheduler::RankAssigner assigner;
  ef::scheduler::TokenRegrouper regrouper;
  ef::placement::Topology topo;
  topo.num_ranks = ranks;
  const int n = static_cast<int>(batches.size());
  for (int b = 0; b < n; ++b) {
    const auto& f = batches[b];
    auto t0 = Clock::now();
    auto plan = planner.Plan(f, {}, topo);
    auto t1 = Clock::now();
    auto paths = ef::scheduler::ExpertPathSet::FromForecast(f, top_k);
    auto t2 = Clock::now();
    auto loc = assigner.Assign(*paths, *plan);
    auto t3 = Clock::now();
    if (!plan.ok() || !paths.ok() || !loc.ok()) {
      std::fprintf(stderr, "control_plane_bench: %s\n",
                   (!plan.ok()    ? plan.status()
                    : !paths.ok() ? paths.status()
                                  : loc.status())
                       .ToString()
                       .c_str());
      std::exit(1);
    }
    row.plan_ms += Ms(t0, t1);
    row.paths_ms += Ms(t1, t2);
    row.assign_ms += Ms(t2, t3);
    row.replicas += plan->num_replicas;
    const auto rr = ef::scheduler::RankAssigner::RoundRobin(f.num_tokens, ranks);
    row.rr_copies += Copies(*paths, rr, *plan);
    row.loc_copies += Copies(*paths, *loc, *plan);
    row.plan_imbalance = std::max(row.plan_imbalance, plan->MaxLoadImbalance());
    std::vector<int> per(ranks, 0);
    for (int r : *loc) ++per[r];
    row.token_imbalance =
        std::max(row.token_imbalance, *std::max_element(per.begin(), per.end()) / (double(f.num_tokens) / ranks));
    // Regrouping: this batch and the next as one window of two (rank-independent).
    if (ranks == 8 && b + 1 < n) {
      ef::placement::RoutingForecast two(2 * f.num_tokens, f.num_layers, f.num_experts);
      std::copy(f.prob.begin(), f.prob.end(), two.prob.begin());
      std::copy(batches[b + 1].prob.begin(), batches[b + 1].prob.end(), two.prob.begin() + f.prob.size());
      auto wp = ef::scheduler::ExpertPathSet::FromForecast(two, top_k);
      const int caps[2] = {f.num_tokens, f.num_tokens};
      auto r0 = Clock::now();
      auto res = regrouper.Regroup(*wp, caps);
      auto r1 = Clock::now();
      row.regroup_ms += Ms(r0, r1) / 2;
    }
  }
  row.plan_ms /= n;
  row.paths_ms /= n;
  row.assign_ms /= n;
  row.replicas /= n;
  row.regroup_ms /= std::max(1, n - 1);
  row.rr_copies /= n;
  row.loc_copies /= n;
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: ef_control_plane_bench TRACE.jsonl [--json]\n");
    return 2;
  }
  const bool json = argc > 2 && std::string(argv[2]) == "--json";
  auto trace = ef::placement::ReadRoutingTrace(argv[1]);
  if (!trace.ok()) {
    std::fprintf(stderr, "%s\n", trace.status().ToString().c_str());
    return 1;
  }
  constexpr int kTokens = 256;
  std::vector<ef::placement::RoutingForecast> flame, dsv3;
  for (size_t first = 0; first + kTokens <= trace->tokens.size(); first += kTokens)
    flame.push_back(ef::scheduler::testing::ForecastFromTrace(*trace, first, kTokens));
  for (int b = 0; b < 4; ++b) dsv3.push_back(ef::scheduler::testing::SkewedForecast(kTokens, 58, 256, 8, 1.0, 1 + b));
  std::vector<Row> rows;
  for (int ranks : {8, 64, 256}) {
    rows.push_back(Measure("flame-moe-290m", flame, trace->header.top_k, ranks, 1024));
    rows.push_back(Measure("deepseek-v3-skew", dsv3, 8, ranks, 7168));
  }
  std::printf(
      "# control plane per batch of %d tokens, one thread; copies = hidden states a token sends to other\n"
      "# ranks, dispatch + combine, all MoE layers; KB/token = copies x hidden x 2 B\n",
      kTokens);
  std::printf("%-18s %6s %9s %9s %9s %10s %9s %9s %9s %10s %10s %8s %9s %9s\n", "workload", "ranks", "plan_ms",
              "paths_ms", "assign_ms", "regroup_ms", "replicas", "rr_copies", "loc_copies", "rr_KB/tok", "loc_KB/tok",
              "saved", "plan_imb", "tok_imb");
  for (const Row& r : rows) {
    const double kb = r.hidden * 2 / 1024.0;
    std::printf("%-18s %6d %9.3f %9.3f %9.3f %10.3f %9.0f %9.1f %9.1f %10.1f %10.1f %7.1f%% %9.2f %9.2f\n",
                r.workload.c_str(), r.ranks, r.plan_ms, r.paths_ms, r.assign_ms, r.regroup_ms, r.replicas, r.rr_copies,
                r.loc_copies, r.rr_copies * kb, r.loc_copies * kb, 100.0 * (1 - r.loc_copies / r.rr_copies),
                r.plan_imbalance, r.token_imbalance);
  }
  if (json)
    for (const Row& r : rows)
      std::printf(
          "{\"workload\":\"%s\",\"ranks\":%d,\"plan_ms\":%.4f,\"paths_ms\":%.4f,\"assign_ms\":%.4f,"
          "\"regroup_ms\":%.4f,\"replicas_per_batch\":%.1f,\"rr_copies_per_token\":%.2f,"
          "\"loc_copies_per_token\":%.2f,\"hidden\":%d,\"plan_imbalance\":%.3f,\"token_imbalance\":%.3f}\n",
          r.workload.c_str(), r.ranks, r.plan_ms, r.paths_ms, r.assign_ms, r.regroup_ms, r.replicas, r.rr_copies,
          r.loc_copies, r.hidden, r.plan_imbalance, r.token_imbalance);
  return 0;
}
