// ScheduleEvaluator: trace-driven comparison of FCFS batching against ExpertFlow's regrouping, the
// engine of `expertflow schedule-eval`.
//
// Workload: the trace's tokens in (seq, pos) order form the arrival stream; every token is an
// independent unit (a prefill workload) unless `keep_sequence_order` is set.
//   FCFS: the stream chunked into batches of B; with R ranks tokens go round-robin to ranks and
//     experts are computed on their home ranks (contiguous blocks per layer), no replicas.
//   Regrouped (rolling horizon): before batch k the candidates are the not-yet-emitted tokens of
//     FCFS batches 0..k+W-1 (at most W*B); TokenRegrouper plans W batches over them, with each
//     token's deadline set so it leaves no later than FCFS batch index + W - 1, and batch 0 of the
//     plan is emitted. So no token is delayed more than W - 1 batches (starvation bound), and the
//     deadlines are always feasible (at most B tokens fall due per batch). With R ranks the batch
//     goes through Planner (forecast -> plan with replicas, load bound) and RankAssigner.
// Metrics always use the trace's true routing; grouping and planning use the forecast (the trace
// itself for "oracle", or a predictor's top-k).
#pragma once

#include <string>
#include <vector>

#include "placement/planner.h"
#include "placement/routing_trace.h"
#include "runtime/core/status.h"
#include "scheduler/expert_path_set.h"
#include "scheduler/rank_assigner.h"
#include "scheduler/token_regrouper.h"

namespace ef::scheduler {

struct ScheduleEvalOptions {
  int batch_size = 16;
  int window = 2;
  int num_ranks = 1;
  int hidden_size = 4096;   // bytes per token crossing the network = hidden_size * bytes_per_value
  int bytes_per_value = 2;  // bf16
  bool keep_sequence_order = false;
  RegroupOptions regroup;
  placement::PlannerOptions planner;
  RankAssignerOptions assigner;
};

struct ScheduleEvalSide {
  int num_batches = 0;
  double distinct_experts_per_batch_layer = 0;  // mean over batches and layers, true routing
  double a2a_bytes_per_token = 0;               // dispatch + combine
  double load_imbalance = 1;                    // mean over batches of max/mean tokens per rank
  double expert_load_imbalance = 1;             // mean over batches of max/mean token-expert pairs per rank
  int max_delay_batches = 0;                    // emitted batch index - FCFS batch index, max over tokens
};

struct ScheduleEvalResult {
  ScheduleEvalSide fcfs;
  ScheduleEvalSide regrouped;
  double regroup_us_per_batch = 0;    // median, TokenRegrouper only
  double scheduler_us_per_batch = 0;  // median, regroup + plan + rank assignment
  double replicas_per_batch = 0;      // planner's extra expert copies, mean
  double reduction = 0;               // 1 - regrouped / fcfs distinct experts
  int num_tokens = 0;
  // batches[k]: trace token indices (into the sorted trace) of regrouped batch k, kept for tests.
  std::vector<std::vector<int>> regrouped_batches;
};

class ScheduleEvaluator {
 public:
  explicit ScheduleEvaluator(ScheduleEvalOptions options) : options_(options) {}

  // trace: sorted by (seq, pos). forecast: one row per trace token, same order.
  StatusOr<ScheduleEvalResult> Run(const placement::RoutingTrace& trace, const ExpertPathSet& forecast) const;

 private:
  ScheduleEvalOptions options_;
};

}  // namespace ef::scheduler
