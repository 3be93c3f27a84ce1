// ExpertParallelExecutor: runs an MoE layer's routed experts across ranks (expert parallelism)
// while attention stays data-parallel (each rank runs its own sequences).
//
// Per MoE layer, on every rank, in lockstep:
//   1. each (token, expert) pair of this rank's batch goes to the rank the ExpertPlacement says
//      computes that expert. A token's hidden row travels once to each rank that computes any of
//      its experts (not once per expert: with top-6 routing over 4 ranks that halves the dispatch
//      bytes). The counts travel first (TokenExchange::ExchangeCounts, host): per destination, the
//      pairs per expert and the distinct rows; then the distinct rows (AllToAllV), and for each
//      pair, in (destination, expert, token) order, its token's row within the block sent (int32
//      per pair), so a receiver knows each pair's row and expert without them riding in the row;
//   2. the receiving rank expands the distinct rows to one per pair (GatherRows) and runs
//      LocalMoeExecutor::ComputeRows on them (unscaled);
//   3. results return by another all-to-all-v to the token's own rank, one row per pair, in the
//      order the pairs were listed (three all-to-all-v per layer in all: rows, row indices,
//      results);
//   4. the token's rank adds w * y for each of a token's experts in increasing expert id with the
//      backend's ScatterAddRows (one call per top-k slot): per output element the same operations
//      in the same order as LocalMoeExecutor::Run, so logits do not depend on the number of ranks
//      (bitwise on the CPU backend). With sum_on_compute_rank the computing rank adds w * y over the
//      token's experts it holds and returns one row per (token, rank) (fewer bytes, another order
//      of additions: within float rounding of one process).
// Planned mode (ExpertPlacement::planned()): at step 1 the ranks all-gather their rows per expert
// and each computes the same plan (comm/row_balancer.h): which rank computes each (source rank,
// expert)'s rows, the static plan with overloaded ranks' blocks moved to their source ranks. The
// counts received are checked against the plan. Outputs do not change: which rank computes a row
// does not change the row, nor the order of step 4.
// Hidden rows stay in backend memory throughout; only when a host exchange (mpi) serves a device
// backend (cuda) are they staged through host memory around each AllToAllV.
//
// Shared forecast (SetForecastShare, runtime/engine/forecast_share.h): the counts of step 1 also
// carry, per rank, its expert cache's forecast of the next `depth` MoE layers (per expert: the
// need, fixed point, and whether it is listed for prefetch; -1: no forecast), so a rank computing
// other ranks' tokens prefetches for them as the owning rank does. Every rank combines them the same
// way and hands its cache the result before computing the layer.
//
// Lockstep: every rank must join every MoE layer's exchange of every step. A step starts with a
// small all-gather of "has work" flags at the first MoE layer. A rank with no tokens calls
// SyncIdle(); if any rank has work it runs RunIdleStep() (each MoE layer with zero rows). When a
// rank's own work is done it calls Drain(), which idles until every rank is idle. Every wait
// times out (MpiContext::timeout_s) with an error naming the rank that did not respond.
//
// Host and backend buffers are reused across layers and steps. Not thread-safe: one thread drives it.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "comm/expert_placement.h"
#include "comm/mpi_context.h"
#include "comm/row_balancer.h"
#include "comm/stat_counter.h"
#include "comm/token_exchange.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/forecast_share.h"

namespace ef::comm {

// Shared forecast entries (one rank's forecast of one expert of one MoE layer): the need in fixed
// point with a flag when the rank prefetches the expert; kNoForecast from a rank that made none.
constexpr int64_t kNoForecast = -1;
int64_t PackForecast(float need, bool listed);
struct CombinedForecast {
  int senders = 0;              // ranks that forecast the layer
  bool mine = false;            // this rank among them
  std::vector<float> need;      // [E] 1 - prod over senders (1 - need), when senders > 0
  std::vector<int32_t> listed;  // listed by any sender, most needed first (ties: lower id)
};
// entries: num_ranks blocks of E packed entries, rank r's at [r * E, r * E + E). routes_here(r, e):
// whether rank r's rows for expert e come to this rank (unset: all do); a sender's forecast of an
// expert whose rows go elsewhere (replicas, another rank's experts) is left out. An entry that no
// PackForecast gives is an error naming its rank.
StatusOr<CombinedForecast> CombineForecasts(std::span<const int64_t> entries, int num_ranks, int me,
                                            const std::function<bool(int rank, int expert)>& routes_here = {});

class ExpertParallelExecutor final : public runtime::MoeExecutor {
 public:
  // The engine provides the config, the backend and the local executor for ComputeRows; all
  // pointers must outlive this object.
  // sum_on_compute_rank (cluster.combine summed): the computing rank adds w * y over each token's
  // experts it computed and returns one row per (token, rank) instead of one per pair: the results
  // travel like the dispatch (fewer bytes), but a token's experts are then added per rank, in rank
  // order, so logits match one process within float rounding (1e-5), not bitwise.
  ExpertParallelExecutor(MpiContext* ctx, TokenExchange* exchange, const ExpertPlacement* placement,
                         runtime::Engine* engine, bool sum_on_compute_rank = false);

  Status Run(int layer, int64_t T, int top_k, const float* h, std::span<const int32_t> ids,
             std::span<const float> weights, float* out) override;

  // For a rank without tokens for the next step: joins the step's start; true when some rank has
  // work (then call RunIdleStep()), false when every rank is idle.
  StatusOr<bool> SyncIdle();
  // Joins each MoE layer's exchanges with no rows of its own (still computes rows sent here).
  Status RunIdleStep();
  // Idles until every rank is idle. Call once this rank's work is done.
  Status Drain();

  // Serving (one rank takes requests, the others only compute experts):
  // The serving rank calls KeepAlive() whenever it has been idle for a while (well under the
  // timeout), so the followers' wait for the next step never times out, and Stop() once at the
  // end (it first finishes nothing: call it after the last step).
  Status KeepAlive();
  Status Stop();
  // A follower: joins every step the serving rank starts, until it calls Stop().
  Status Follow();

  // Shares the forecasts of the next `depth` MoE layers (0: none; at most the MoE layers after the
  // first) between the ranks' expert caches. Every rank must call it with the same depth before the
  // first step (the count exchange's size depends on it; ForecastDepthsAgree checks); `share` may
  // be null on a rank (it then sends no forecast and takes none) and must outlive the executor or be
  // detached with set_forecast_share(nullptr) first.
  void SetForecastShare(runtime::ForecastShare* share, int depth);
  void set_forecast_share(runtime::ForecastShare* share) { share_ = share; }
  // Collective: OK when every rank set the same forecast depth, else an error naming both.
  Status ForecastDepthsAgree();
  // MoE layers for which this rank was handed a forecast combined from other ranks'.
  int64_t forecasts_received() const { return forecasts_received_; }

  int64_t rows_dispatched() const { return rows_dispatched_; }  // distinct hidden rows sent to other ranks
  int64_t rows_computed() const { return rows_computed_; }      // rows this rank computed
  int64_t steps() const { return steps_; }
  // Planned mode, over every (step, MoE layer) so far, the same on every rank: sums of the busiest
  // rank's rows under the plan and under the static plan, of all ranks' rows, and the rows the
  // plan moved to their source rank. max/mean rows per rank = max_rows_sum * N / total_rows_sum.
  int64_t planned_layers() const { return planned_layers_; }
  int64_t planned_max_rows_sum() const { return planned_max_rows_sum_; }
  int64_t static_max_rows_sum() const { return static_max_rows_sum_; }
  int64_t total_rows_sum() const { return total_rows_sum_; }
  int64_t rows_moved() const { return rows_moved_; }
  // All-to-all payload bytes of decoder layer `layer` (dispatch and combine), sent / received by
  // this rank; 0 for dense layers. Readable from any thread.
  int64_t layer_bytes_sent(int layer) const { return layer_sent_[layer].load(); }
  int64_t layer_bytes_received(int layer) const { return layer_received_[layer].load(); }
  int num_layers() const { return num_layers_; }

 private:
  // Step flags (all-gathered at each step's start): kIdle, kWork, kStop; returns the largest.
  enum StepFlag : int64_t { kIdle = 0, kWork = 1, kStop = 2 };
  StatusOr<int64_t> SyncFlags(StepFlag mine);
  Status SyncStep(bool has_work, bool* any);
  // exchange_->AllToAllV of rows of hidden floats in backend memory; stages through host memory
  // when the exchange works on host memory and the backend on device memory.
  Status Move(const float* send, std::span<const int64_t> send_rows, float* recv, std::span<const int64_t> recv_rows,
              const std::string& what);
  Status MaybeInjectFault(int layer);
  // exchange_->AllToAllV of int32 rows held on the host (staged through backend memory for a
  // device exchange).
  Status MoveInts(std::span<const int32_t> send, std::span<const int64_t> send_rows, std::span<int32_t> recv,
                  std::span<const int64_t> recv_rows, int ints_per_row, const std::string& what);
  // Summed combine on the computing rank: partial_dev_[row] = sum of w * y over the row's pairs.
  Status SumOnComputeRank(int64_t R, int64_t RU, int per_pair);
  // Planned mode: gathers every rank's rows per expert of this layer (`ids`) and plans them into
  // plan_ (and all_rows_).
  Status PlanLayer(int layer, std::span<const int32_t> ids, const std::string& where);
  // Shared forecast: this rank's own forecasts of the MoE layers after `layer` into send_counts_
  // (entries [E + 1, K) of every destination), then, after the exchange, every rank's combined.
  void PackForecasts(int layer, int64_t T, size_t K);
  Status ShareForecasts(int layer, size_t K);

  MpiContext* ctx_;
  TokenExchange* exchange_;
  const ExpertPlacement* placement_;
  runtime::Engine* engine_;
  runtime::Backend* backend_;
  bool summed_ = false;  // sum_on_compute_rank
  // Summed combine, receiver side: per pair group k (the k-th of a row's pairs, so each group adds
  // to distinct rows, in increasing expert id per row): pair rows, their rows in the distinct
  // block, weights; uploaded in one copy.
  std::vector<int32_t> sum_idx_;
  runtime::Buffer sum_idx_dev_, partial_dev_, tmp_dev_;
  int hidden_ = 0, num_experts_ = 0, top_k_ = 0, first_moe_layer_ = -1, num_layers_ = 0;
  std::unique_ptr<StatCounter[]> layer_sent_, layer_received_;  // [decoder layer]
  bool step_synced_ = false;
  int64_t rows_dispatched_ = 0, rows_computed_ = 0, steps_ = 0;
  int64_t planned_layers_ = 0, planned_max_rows_sum_ = 0, static_max_rows_sum_ = 0, total_rows_sum_ = 0,
          rows_moved_ = 0;
  runtime::ForecastShare* share_ = nullptr;
  int forecast_depth_ = 0;
  std::vector<std::vector<int>> forecast_targets_;  // [decoder layer]: the next MoE layers, up to depth
  std::vector<float> own_need_;
  std::vector<int32_t> own_listed_;
  std::vector<int64_t> forecast_entries_;
  int64_t forecasts_received_ = 0;
  std::vector<int64_t> my_rows_, all_rows_;  // planned: rows per expert, mine and [rank * E + e]
  std::vector<int> static_compute_;          // planned: [rank * E + e] -> static compute rank
  RowPlan plan_;

  // Reused host buffers. Per (rank, expert) arrays are indexed rank * num_experts + expert.
  std::vector<int32_t> dest_, pair_idx_, recv_expert_, local_, pair_local_, recv_local_, expand_idx_;
  std::vector<int64_t> uniq_rows_, uniq_offset_, recv_uniq_, recv_uniq_offset_;
  std::vector<float> ones_, stage_send_, stage_recv_;
  std::vector<int64_t> key_offset_, send_counts_, recv_counts_, send_rows_, recv_rows_;
  // Reused backend buffers: rows sent (then the returned rows in combine order), received,
  // computed and returned; pair_idx_'s device copy.
  runtime::Buffer send_dev_, recv_dev_, y_dev_, back_dev_, pair_idx_dev_, recv_idx_dev_, int_send_dev_, int_recv_dev_;
};

}  // namespace ef::comm
