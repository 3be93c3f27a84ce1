#include "scheduler/schedule_evaluator.h"

#include <algorithm>
#include <chrono>
#include <numeric>
#include <string>

#include "runtime/core/logging.h"

namespace ef::scheduler {

namespace {

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

// Copies rows `tokens` of `all` into a new set.
ExpertPathSet Gather(const ExpertPathSet& all, const std::vector<int>& tokens) {
  ExpertPathSet out(static_cast<int>(tokens.size()), all.num_layers(), all.num_experts());
  for (size_t i = 0; i < tokens.size(); ++i)
    std::copy(all.row(tokens[i]), all.row(tokens[i]) + all.num_words(), out.row(static_cast<int>(i)));
  return out;
}

placement::RoutingForecast ToForecast(const ExpertPathSet& paths) {
  placement::RoutingForecast f(paths.num_tokens(), paths.num_layers(), paths.num_experts());
  for (int t = 0; t < paths.num_tokens(); ++t)
    for (int l = 0; l < paths.num_layers(); ++l)
      for (int e = 0; e < paths.num_experts(); ++e)
        if (paths.Test(t, l, e)) f.row(t, l)[e] = 1.f;
  return f;
}

// The FCFS placement: each expert on its home rank only.
placement::BatchPlan StaticPlan(int layers, int experts, int ranks) {
  placement::BatchPlan plan;
  plan.num_layers = layers;
  plan.num_experts = experts;
  plan.num_ranks = ranks;
  plan.compute_ranks.resize(static_cast<size_t>(layers) * experts);
  placement::Topology topo;
  topo.num_ranks = ranks;
  for (int l = 0; l < layers; ++l)
    for (int e = 0; e < experts; ++e)
      plan.compute_ranks[static_cast<size_t>(l) * experts + e] = {topo.home(l, e, experts)};
  plan.rank_load.assign(static_cast<size_t>(layers) * ranks, 0.f);
  plan.prefetch.assign(ranks, {});
  return plan;
}

struct SideAccumulator {
  long distinct = 0;
  long sends = 0;
  long tokens = 0;
  double imbalance = 0, expert_imbalance = 0;
  int batches = 0;

  void Add(const ExpertPathSet& truth, const std::vector<int>& batch, const std::vector<int>& rank_of,
           const placement::BatchPlan& plan, int ranks) {
    distinct += truth.CountDistinct(batch);
    tokens += static_cast<long>(batch.size());
    ++batches;
    std::vector<long> per_rank(ranks, 0), expert_load(ranks, 0);
    const ExpertPathSet sub = Gather(truth, batch);
    for (size_t i = 0; i < batch.size(); ++i) {
      ++per_rank[rank_of[i]];
      if (ranks > 1) {
        sends += RankAssigner::TokenSends(sub, static_cast<int>(i), rank_of[i], plan);
        RankAssigner::AddExpertLoad(sub, static_cast<int>(i), rank_of[i], plan, expert_load);
      }
    }
    auto ratio = [ranks](const std::vector<long>& v) {
      const long sum = std::accumulate(v.begin(), v.end(), 0L);
      return sum > 0 ? static_cast<double>(*std::max_element(v.begin(), v.end())) * ranks / sum : 1.0;
    };
    imbalance += ratio(per_rank);
    expert_imbalance += ranks > 1 ? ratio(expert_load) : 1.0;
  }
  ScheduleEvalSide Finish(int layers, double bytes_per_token_hop) const {
    ScheduleEvalSide s;
    s.num_batches = batches;
    if (batches == 0) return s;
    s.distinct_experts_per_batch_layer = static_cast<double>(distinct) / batches / layers;
    s.a2a_bytes_per_token = tokens ? 2.0 * sends * bytes_per_token_hop / tokens : 0;
    s.load_imbalance = imbalance / batches;
    s.expert_load_imbalance = expert_imbalance / batches;
    return s;
  }
};

}  // namespace

StatusOr<ScheduleEvalResult> ScheduleEvaluator::Run(const placement::RoutingTrace& trace,
                                                    const ExpertPathSet& forecast) const {
  const int B = options_.batch_size, W = options_.window, R = options_.num_ranks;
  if (B < 1) return InvalidArgument("batch size must be >= 1, got " + std::to_string(B));
  if (W < 1) return InvalidArgument("window must be >= 1, got " + std::to_string(W));
  if (R < 1) return InvalidArgument("ranks must be >= 1, got " + std::to_string(R));
  if (R > 64) return InvalidArgument("at most 64 ranks are supported, got " + std::to_string(R));
  if (options_.hidden_size < 1) return InvalidArgument("hidden size must be >= 1");
  if (trace.tokens.empty()) return InvalidArgument("trace has no tokens");
  const int N = static_cast<int>(trace.tokens.size());
  if (forecast.num_tokens() != N || forecast.num_layers() != trace.num_layers() ||
      forecast.num_experts() != trace.num_experts())
    return InvalidArgument("forecast shape does not match the trace");
  std::vector<size_t> all(N);
  std::iota(all.begin(), all.end(), 0);
  EF_ASSIGN_OR_RETURN(ExpertPathSet truth, ExpertPathSet::FromTrace(trace, all));
  const int L = trace.num_layers(), E = trace.num_experts();
  const double hop_bytes = static_cast<double>(options_.hidden_size) * options_.bytes_per_value;
  const placement::BatchPlan static_plan = StaticPlan(L, E, R);

  ScheduleEvalResult result;
  result.num_tokens = N;

  // FCFS.
  SideAccumulator fcfs;
  for (int s = 0; s < N; s += B) {
    std::vector<int> batch(std::min(B, N - s));
    std::iota(batch.begin(), batch.end(), s);
    fcfs.Add(truth, batch, RankAssigner::RoundRobin(static_cast<int>(batch.size()), R), static_plan, R);
  }
  result.fcfs = fcfs.Finish(L, hop_bytes);

  // Regrouped, rolling horizon.
  TokenRegrouper regrouper(options_.regroup);
  placement::Planner planner(options_.planner);
  RankAssigner assigner(options_.assigner);
  placement::Topology topology;
  topology.num_ranks = R;
  const placement::CacheResidency empty_cache;
  SideAccumulator regrouped;
  std::vector<char> emitted(N, 0);
  std::vector<double> regroup_us, sched_us;
  long replicas = 0;
  int first_pending = 0;
  for (int k = 0;; ++k) {
    while (first_pending < N && emitted[first_pending]) ++first_pending;
    if (first_pending == N) break;
    const int horizon_end = static_cast<int>(std::min<long>(N, static_cast<long>(k + W) * B));
    std::vector<int> pool;
    for (int i = first_pending; i < horizon_end; ++i)
      if (!emitted[i]) pool.push_back(i);
    std::vector<int> deadline(pool.size()), caps;
    std::vector<int64_t> seq;
    for (size_t j = 0; j < pool.size(); ++j) deadline[j] = std::max(0, pool[j] / B + W - 1 - k);
    if (options_.keep_sequence_order)
      for (int i : pool) seq.push_back(trace.tokens[i].seq);
    for (size_t q = 0; q < pool.size(); q += B) caps.push_back(static_cast<int>(std::min<size_t>(B, pool.size() - q)));
    const ExpertPathSet cand = Gather(forecast, pool);

    const auto t0 = std::chrono::steady_clock::now();
    EF_ASSIGN_OR_RETURN(RegroupResult plan, regrouper.Regroup(cand, caps, seq, deadline));
    const auto t1 = std::chrono::steady_clock::now();
    std::vector<int> batch;
    for (int j : plan.batches[0]) batch.push_back(pool[j]);
    std::vector<int> rank_of(batch.size(), 0);
    placement::BatchPlan batch_plan = static_plan;
    if (R > 1) {
      const ExpertPathSet fb = Gather(forecast, batch);
      EF_ASSIGN_OR_RETURN(batch_plan, planner.Plan(ToForecast(fb), empty_cache, topology));
      EF_ASSIGN_OR_RETURN(rank_of, assigner.Assign(fb, batch_plan));
      replicas += batch_plan.num_replicas;
    }
    const auto t2 = std::chrono::steady_clock::now();
    regroup_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    sched_us.push_back(std::chrono::duration<double, std::micro>(t2 - t0).count());

    for (int i : batch) {
      emitted[i] = 1;
      result.regrouped.max_delay_batches = std::max(result.regrouped.max_delay_batches, k - i / B);
    }
    regrouped.Add(truth, batch, rank_of, batch_plan, R);
    result.regrouped_batches.push_back(std::move(batch));
  }
  const int max_delay = result.regrouped.max_delay_batches;
  result.regrouped = regrouped.Finish(L, hop_bytes);
  result.regrouped.max_delay_batches = max_delay;
  result.regroup_us_per_batch = Median(regroup_us);
  result.scheduler_us_per_batch = Median(sched_us);
  result.replicas_per_batch = regrouped.batches ? static_cast<double>(replicas) / regrouped.batches : 0;
  result.reduction =
      result.fcfs.distinct_experts_per_batch_layer > 0
          ? 1.0 - result.regrouped.distinct_experts_per_batch_layer / result.fcfs.distinct_experts_per_batch_layer
          : 0;
  EF_LOG(INFO, SCHED, "schedule-eval: %d tokens, batch %d, window %d, ranks %d: %.1f%% fewer distinct experts", N, B, W,
         R, 100 * result.reduction);
  return result;
}

}  // namespace ef::scheduler
