#include "comm/expert_parallel_executor.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <thread>

#include "runtime/core/logging.h"
#include "runtime/core/params.h"

EF_PARAM(DebugFaultRank, int64_t, "EF_DEBUG_FAULT_RANK", 1,
         "testing: the rank that EF_DEBUG_DIE_AT_LAYER / EF_DEBUG_STALL_AT_LAYER act on");
EF_PARAM(DebugDieAtLayer, int64_t, "EF_DEBUG_DIE_AT_LAYER", -1,
         "testing: the fault rank kills itself (SIGKILL) on reaching this decoder layer's token exchange (-1: never)");
EF_PARAM(
    DebugStallAtLayer, int64_t, "EF_DEBUG_STALL_AT_LAYER", -1,
    "testing: the fault rank stops responding (sleeps) on reaching this decoder layer's token exchange (-1: never)");

EF_PARAM(ShareForecasts, int64_t, "EF_SHARE_FORECASTS", 1,
         "testing: 0 keeps each rank's expert-cache forecast to itself (A/B of the shared forecast; every rank "
         "must see the same value)");

namespace ef::comm {
namespace {

// Grows a backend buffer to at least `bytes` (contents not kept).
Status Reserve(runtime::Backend* backend, runtime::Buffer* b, size_t bytes) {
  if (b->bytes() >= bytes && b->data()) return Status::Ok();
  EF_ASSIGN_OR_RETURN(*b, backend->Allocate(std::max<size_t>(bytes + bytes / 2, 64)));
  return Status::Ok();
}

constexpr double kNeedOne = static_cast<double>(int64_t{1} << 30);  // a need of 1 in fixed point
constexpr int64_t kListed = int64_t{1} << 32;

}  // namespace

int64_t PackForecast(float need, bool listed) {
  const double p = need >= 0.f ? std::min(static_cast<double>(need), 1.0) : 0.0;  // NaN: 0
  return std::llround(p * kNeedOne) | (listed ? kListed : 0);
}

StatusOr<CombinedForecast> CombineForecasts(std::span<const int64_t> entries, int num_ranks, int me,
                                            const std::function<bool(int rank, int expert)>& routes_here) {
  if (num_ranks <= 0 || entries.size() % static_cast<size_t>(num_ranks) != 0)
    return Internal("shared forecast: " + std::to_string(entries.size()) + " entries for " + std::to_string(num_ranks) +
                    " ranks");
  const size_t E = entries.size() / static_cast<size_t>(num_ranks);
  CombinedForecast f;
  std::vector<double> idle(E, 1.0);  // the probability that no rank's batch routes to e
  std::vector<char> listed(E, 0);
  for (int r = 0; r < num_ranks; ++r) {
    const std::span<const int64_t> v = entries.subspan(static_cast<size_t>(r) * E, E);
    if (E == 0 || v[0] == kNoForecast) continue;
    for (size_t e = 0; e < E; ++e) {
      const int64_t need = v[e] & (kListed - 1);
      if (v[e] < 0 || (v[e] & ~(kListed | (kListed - 1))) != 0 || need > static_cast<int64_t>(kNeedOne))
        return Internal("rank " + std::to_string(r) + " sent a malformed forecast entry for expert " +
                        std::to_string(e) + " (" + std::to_string(v[e]) + ")");
      if (routes_here && !routes_here(r, static_cast<int>(e))) continue;
      idle[e] *= 1.0 - static_cast<double>(need) / kNeedOne;
      listed[e] |= (v[e] & kListed) != 0;
    }
    ++f.senders;
    f.mine |= r == me;
  }
  if (f.senders == 0) return f;
  f.need.resize(E);
  for (size_t e = 0; e < E; ++e) {
    f.need[e] = static_cast<float>(1.0 - idle[e]);
    if (listed[e]) f.listed.push_back(static_cast<int32_t>(e));
  }
  std::stable_sort(f.listed.begin(), f.listed.end(), [&](int32_t a, int32_t b) { return f.need[a] > f.need[b]; });
  return f;
}

ExpertParallelExecutor::ExpertParallelExecutor(MpiContext* ctx, TokenExchange* exchange,
                                               const ExpertPlacement* placement, runtime::Engine* engine,
                                               bool sum_on_compute_rank)
    : ctx_(ctx),
      exchange_(exchange),
      placement_(placement),
      engine_(engine),
      backend_(&engine->backend()),
      summed_(sum_on_compute_rank) {
  const auto& c = engine->config();
  hidden_ = c.hidden_size;
  num_experts_ = c.num_experts;
  top_k_ = c.top_k;
  num_layers_ = c.num_layers;
  forecast_targets_.assign(num_layers_, {});
  layer_sent_ = std::make_unique<StatCounter[]>(num_layers_);
  layer_received_ = std::make_unique<StatCounter[]>(num_layers_);
  for (int l = 0; l < c.num_layers; ++l) {
    if (c.IsMoeLayer(l)) {
      first_moe_layer_ = l;
      break;
    }
  }
}

Status ExpertParallelExecutor::MaybeInjectFault(int layer) {
  if (ctx_->rank() != params::DebugFaultRank()) return Status::Ok();
  if (layer == params::DebugDieAtLayer()) {
    std::fprintf(stderr, "rank %d: EF_DEBUG_DIE_AT_LAYER=%d, killing this rank\n", ctx_->rank(), layer);
    std::fflush(stderr);
    raise(SIGKILL);
  }
  if (layer == params::DebugStallAtLayer()) {
    std::fprintf(stderr, "rank %d: EF_DEBUG_STALL_AT_LAYER=%d, stalling\n", ctx_->rank(), layer);
    std::fflush(stderr);
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  return Status::Ok();
}

StatusOr<int64_t> ExpertParallelExecutor::SyncFlags(StepFlag mine) {
  EF_ASSIGN_OR_RETURN(auto flags, ctx_->AllGatherInt(mine, kTagStep, "the start of a step"));
  return *std::max_element(flags.begin(), flags.end());
}

Status ExpertParallelExecutor::SyncStep(bool has_work, bool* any) {
  EF_ASSIGN_OR_RETURN(int64_t top, SyncFlags(has_work ? kWork : kIdle));
  if (top == kStop) return FailedPrecondition("a rank stopped serving while this one still had work");
  *any = top == kWork;
  return Status::Ok();
}

Status ExpertParallelExecutor::KeepAlive() {
  bool any = false;
  EF_RETURN_IF_ERROR(SyncStep(false, &any));
  // Only the serving rank has work; if another did, it would wait for a step that never comes.
  if (any) return FailedPrecondition("a following rank reported work during a keep-alive");
  return Status::Ok();
}

Status ExpertParallelExecutor::Stop() { return SyncFlags(kStop).status(); }

Status ExpertParallelExecutor::Follow() {
  for (;;) {
    EF_ASSIGN_OR_RETURN(int64_t top, SyncFlags(kIdle));
    if (top == kStop) return Status::Ok();
    if (top == kWork) {
      step_synced_ = true;
      EF_RETURN_IF_ERROR(RunIdleStep());
    }
  }
}

StatusOr<bool> ExpertParallelExecutor::SyncIdle() {
  bool any = false;
  EF_RETURN_IF_ERROR(SyncStep(false, &any));
  step_synced_ = any;
  return any;
}

Status ExpertParallelExecutor::RunIdleStep() {
  const auto& c = engine_->config();
  for (int l : c.MoeLayers()) {
    EF_RETURN_IF_ERROR(Run(l, 0, top_k_, nullptr, {}, {}, nullptr));
  }
  return Status::Ok();
}

Status ExpertParallelExecutor::Drain() {
  for (;;) {
    EF_ASSIGN_OR_RETURN(bool any, SyncIdle());
    if (!any) return Status::Ok();
    EF_RETURN_IF_ERROR(RunIdleStep());
  }
}

Status ExpertParallelExecutor::Move(const float* send, std::span<const int64_t> send_rows, float* recv,
                                    std::span<const int64_t> recv_rows, const std::string& what) {
  const size_t row_bytes = static_cast<size_t>(hidden_) * sizeof(float);
  const bool host_backend = backend_->kind() == runtime::BackendKind::kCpu;
  if (exchange_->device_memory() != host_backend)
    return exchange_->AllToAllV(send, send_rows, recv, recv_rows, row_bytes, what);
  if (exchange_->device_memory())
    return FailedPrecondition("the " + std::string(exchange_->name()) + " exchange needs a backend with device memory");
  // A host exchange serving a device backend: stage through host memory.
  size_t sb = 0, rb = 0;
  for (int64_t c : send_rows) sb += static_cast<size_t>(c) * row_bytes;
  for (int64_t c : recv_rows) rb += static_cast<size_t>(c) * row_bytes;
  stage_send_.resize(sb / sizeof(float));
  stage_recv_.resize(rb / sizeof(float));
  if (sb > 0) backend_->CopyToHost(stage_send_.data(), send, sb);
  EF_RETURN_IF_ERROR(
      exchange_->AllToAllV(stage_send_.data(), send_rows, stage_recv_.data(), recv_rows, row_bytes, what));
  if (rb > 0) backend_->CopyToDevice(recv, stage_recv_.data(), rb);
  return Status::Ok();
}

Status ExpertParallelExecutor::MoveInts(std::span<const int32_t> send, std::span<const int64_t> send_rows,
                                        std::span<int32_t> recv, std::span<const int64_t> recv_rows, int ints_per_row,
                                        const std::string& what) {
  const size_t row_bytes = sizeof(int32_t) * static_cast<size_t>(ints_per_row);
  if (!exchange_->device_memory())
    return exchange_->AllToAllV(send.data(), send_rows, recv.data(), recv_rows, row_bytes, what);
  // A device exchange (NCCL): through backend memory.
  EF_RETURN_IF_ERROR(Reserve(backend_, &int_send_dev_, std::max<size_t>(send.size_bytes(), 4)));
  EF_RETURN_IF_ERROR(Reserve(backend_, &int_recv_dev_, std::max<size_t>(recv.size_bytes(), 4)));
  if (!send.empty()) backend_->CopyToDevice(int_send_dev_.data(), send.data(), send.size_bytes());
  EF_RETURN_IF_ERROR(
      exchange_->AllToAllV(int_send_dev_.data(), send_rows, int_recv_dev_.data(), recv_rows, row_bytes, what));
  if (!recv.empty()) backend_->CopyToHost(recv.data(), int_recv_dev_.data(), recv.size_bytes());
  return Status::Ok();
}

Status ExpertParallelExecutor::SumOnComputeRank(int64_t R, int64_t RU, int per_pair) {
  const int H = hidden_;
  const size_t row_bytes = static_cast<size_t>(H) * sizeof(float);
  EF_RETURN_IF_ERROR(Reserve(backend_, &partial_dev_, std::max<int64_t>(RU, 1) * row_bytes));
  if (RU > 0) backend_->SetZero(partial_dev_.data(), static_cast<size_t>(RU) * row_bytes);
  if (R == 0) return Status::Ok();
  // Group the pairs by their rank among the pairs of their row (pairs arrive by source, then
  // expert, then token: a row's k-th pair is its k-th smallest expert), so each group adds to
  // distinct rows and every row receives its experts in increasing id.
  std::vector<int32_t> seen(RU, 0), group(R);
  std::vector<int64_t> group_size;
  for (int64_t i = 0; i < R; ++i) {
    const int32_t k = seen[expand_idx_[i]]++;
    group[i] = k;
    if (static_cast<size_t>(k) >= group_size.size()) group_size.resize(k + 1, 0);
    ++group_size[k];
  }
  std::vector<int64_t> start(group_size.size() + 1, 0);
  for (size_t k = 0; k < group_size.size(); ++k) start[k + 1] = start[k] + group_size[k];
  // sum_idx_: [0, R) pair rows by group; [R, 2R) their distinct rows; [2R, 3R) weights (bits).
  sum_idx_.resize(3 * static_cast<size_t>(R));
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < R; ++i) {
    const int64_t at = cursor[group[i]]++;
    sum_idx_[at] = static_cast<int32_t>(i);
    sum_idx_[R + at] = expand_idx_[i];
    sum_idx_[2 * R + at] = recv_local_[i * per_pair + 1];
  }
  EF_RETURN_IF_ERROR(Reserve(backend_, &sum_idx_dev_, sum_idx_.size() * sizeof(int32_t)));
  EF_RETURN_IF_ERROR(Reserve(backend_, &tmp_dev_, static_cast<size_t>(R) * row_bytes));
  backend_->CopyToDevice(sum_idx_dev_.data(), sum_idx_.data(), sum_idx_.size() * sizeof(int32_t));
  const int32_t* si = sum_idx_dev_.i32();
  backend_->GatherRows(y_dev_.f32(), si, R, H, tmp_dev_.f32());
  const float* w = reinterpret_cast<const float*>(si + 2 * R);
  for (size_t k = 0; k < group_size.size(); ++k)
    backend_->ScatterAddRows(tmp_dev_.f32() + start[k] * H, si + R + start[k], w + start[k], group_size[k], H,
                             partial_dev_.f32());
  return Status::Ok();
}

Status ExpertParallelExecutor::PlanLayer(int layer, std::span<const int32_t> ids, const std::string& where) {
  const int N = ctx_->size(), E = num_experts_;
  my_rows_.assign(E, 0);
  for (int32_t e : ids) {
    if (e < 0 || e >= E) return Internal("routing chose expert " + std::to_string(e) + " out of range");
    ++my_rows_[e];
  }
  all_rows_.resize(static_cast<size_t>(N) * E);
  EF_RETURN_IF_ERROR(ctx_->AllGatherInts(my_rows_, all_rows_, kTagPlan, "the " + where + " row counts"));
  static_compute_.resize(static_cast<size_t>(N) * E);
  for (int s = 0; s < N; ++s)
    for (int e = 0; e < E; ++e) static_compute_[static_cast<size_t>(s) * E + e] = placement_->ComputeRank(layer, e, s);
  plan_ = RowBalancer::Plan(all_rows_, static_compute_, N, E, placement_->max_imbalance());
  ++planned_layers_;
  planned_max_rows_sum_ += plan_.max_rows;
  static_max_rows_sum_ += plan_.static_max_rows;
  total_rows_sum_ += plan_.total_rows;
  rows_moved_ += plan_.rows_moved;
  return Status::Ok();
}

void ExpertParallelExecutor::SetForecastShare(runtime::ForecastShare* share, int depth) {
  share_ = share;
  const std::vector<int> moe = engine_->config().MoeLayers();
  forecast_depth_ = params::ShareForecasts() ? std::clamp(depth, 0, std::max(0, static_cast<int>(moe.size()) - 1)) : 0;
  forecast_targets_.assign(num_layers_, {});
  for (size_t i = 0; i < moe.size(); ++i)
    for (size_t j = i + 1; j < moe.size() && j <= i + static_cast<size_t>(forecast_depth_); ++j)
      forecast_targets_[moe[i]].push_back(moe[j]);
}

Status ExpertParallelExecutor::ForecastDepthsAgree() {
  EF_ASSIGN_OR_RETURN(const std::vector<int64_t> depths,
                      ctx_->AllGatherInt(forecast_depth_, kTagGather, "the shared forecast depths"));
  for (size_t r = 0; r < depths.size(); ++r)
    if (depths[r] != forecast_depth_)
      return FailedPrecondition("rank " + std::to_string(r) + " shares forecasts of " + std::to_string(depths[r]) +
                                " MoE layers ahead, rank " + std::to_string(ctx_->rank()) + " of " +
                                std::to_string(forecast_depth_) +
                                " (cache.prefetch_layers, predictor.kind and EF_SHARE_FORECASTS must be the same "
                                "on every rank)");
  return Status::Ok();
}

void ExpertParallelExecutor::PackForecasts(int layer, int64_t T, size_t K) {
  const int N = ctx_->size(), E = num_experts_;
  const std::vector<int>& targets = forecast_targets_[layer];
  own_need_.resize(E);
  for (int j = 0; j < forecast_depth_; ++j) {
    // Only a rank with tokens of this step ran its predictor for them (a rank without tokens still
    // holds the forecasts of its last step).
    const bool own = T > 0 && share_ && j < static_cast<int>(targets.size()) &&
                     share_->OwnForecast(targets[j], own_need_, &own_listed_);
    const size_t at = static_cast<size_t>(E) + 1 + static_cast<size_t>(j) * E;
    for (int e = 0; e < E; ++e) {
      int64_t v = kNoForecast;
      if (own)
        v = PackForecast(own_need_[e], std::find(own_listed_.begin(), own_listed_.end(), e) != own_listed_.end());
      for (int d = 0; d < N; ++d) send_counts_[d * K + at + e] = v;
    }
  }
}

Status ExpertParallelExecutor::ShareForecasts(int layer, size_t K) {
  const int N = ctx_->size(), E = num_experts_;
  const std::vector<int>& targets = forecast_targets_[layer];
  for (int j = 0; j < forecast_depth_ && j < static_cast<int>(targets.size()); ++j) {
    const size_t at = static_cast<size_t>(E) + 1 + static_cast<size_t>(j) * E;
    forecast_entries_.resize(static_cast<size_t>(N) * E);
    for (int r = 0; r < N; ++r)
      std::copy_n(recv_counts_.begin() + static_cast<ptrdiff_t>(r * K + at), E,
                  forecast_entries_.begin() + static_cast<ptrdiff_t>(r) * E);
    // Only the experts whose rows from the sender come here (replicas serve some ranks only).
    const int target = targets[j], me = ctx_->rank();
    auto f = CombineForecasts(forecast_entries_, N, me,
                              [&](int r, int e) { return placement_->ComputeRank(target, e, r) == me; });
    if (!f.ok()) return Status(f.status()).Prepend("layer " + std::to_string(targets[j]) + ": ");
    // Nobody forecast the layer, or only this rank did (its cache has its own forecast already).
    if (f->senders == 0 || (f->senders == 1 && f->mine)) continue;
    if (!share_) continue;
    share_->SharedForecast(targets[j], f->need, f->listed);
    ++forecasts_received_;
  }
  return Status::Ok();
}

Status ExpertParallelExecutor::Run(int layer, int64_t T, int top_k, const float* h, std::span<const int32_t> ids,
                                   std::span<const float> weights, float* out) {
  if (layer == first_moe_layer_) {
    if (!step_synced_) {
      bool any = false;
      EF_RETURN_IF_ERROR(SyncStep(true, &any));
    }
    step_synced_ = false;
    ++steps_;
  }
  EF_RETURN_IF_ERROR(MaybeInjectFault(layer));
  const int N = ctx_->size(), me = ctx_->rank(), H = hidden_, E = num_experts_;
  const int64_t P = T * top_k;
  const std::string where = "layer " + std::to_string(layer);
  if (layer < 0 || layer >= num_layers_)
    return Internal("expert-parallel step for " + where + " of a model of " + std::to_string(num_layers_) + " layers");
  // This layer's share of the exchange's byte counters, whichever way the layer returns.
  struct LayerBytes {
    const TokenExchange* x;
    StatCounter *sent, *received;
    int64_t sent0 = x->bytes_sent(), received0 = x->bytes_received();
    ~LayerBytes() {
      *sent += x->bytes_sent() - sent0;
      *received += x->bytes_received() - received0;
    }
  } layer_bytes{exchange_, &layer_sent_[layer], &layer_received_[layer]};

  // 1. Each expert's computing rank; pairs ordered by (destination, expert), stable so tokens stay
  // in increasing order within an expert. send_counts_ holds, per destination, the pairs per expert
  // and (entry E) the distinct tokens: a token's hidden row travels once to each rank computing
  // any of its experts, not once per expert.
  dest_.resize(E);
  const bool planned = placement_->planned();
  if (planned) EF_RETURN_IF_ERROR(PlanLayer(layer, ids.first(P), where));
  for (int e = 0; e < E; ++e)
    dest_[e] = planned ? plan_.compute[static_cast<size_t>(me) * E + e] : placement_->ComputeRank(layer, e, me);
  // Count entries per rank: pairs per expert, distinct rows, then the shared forecast's.
  const size_t K = static_cast<size_t>(E) + 1 + static_cast<size_t>(forecast_depth_) * E;
  key_offset_.assign(static_cast<size_t>(N) * E + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    const int32_t e = ids[p];
    if (e < 0 || e >= E) return Internal("routing chose expert " + std::to_string(e) + " out of range");
    ++key_offset_[static_cast<size_t>(dest_[e]) * E + e + 1];
  }
  send_counts_.assign(static_cast<size_t>(N) * K, 0);
  for (int d = 0; d < N; ++d)
    for (int e = 0; e < E; ++e) send_counts_[d * K + e] = key_offset_[static_cast<size_t>(d) * E + e + 1];
  for (size_t k = 0; k + 1 < key_offset_.size(); ++k) key_offset_[k + 1] += key_offset_[k];
  PackForecasts(layer, T, K);
  // Distinct tokens per destination, in token order: local_[d * T + t] is token t's row within
  // the block sent to d, or -1.
  local_.assign(static_cast<size_t>(N) * T, -1);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t q = t * top_k; q < (t + 1) * top_k; ++q) {
      const int d = dest_[ids[q]];
      if (local_[static_cast<size_t>(d) * T + t] < 0)
        local_[static_cast<size_t>(d) * T + t] = static_cast<int32_t>(send_counts_[d * K + E]++);
    }
  uniq_rows_.assign(N, 0);
  uniq_offset_.assign(N + 1, 0);
  for (int d = 0; d < N; ++d) {
    uniq_rows_[d] = send_counts_[d * K + E];
    uniq_offset_[d + 1] = uniq_offset_[d] + uniq_rows_[d];
  }
  const int64_t U = uniq_offset_[N];
  // pair_idx_, uploaded in one copy: [0, U) the token of each dispatched row (the dispatch
  // gather); [U, U + P) for combine row c = j * T + t, which holds token t's j-th smallest expert,
  // that pair's position in (destination, expert) order (the combine gather); [U + P, U + 2P)
  // combine row c's weight (float bits); [U + 2P, U + 2P + T) 0..T-1 (the combine scatter's rows).
  // pair_local_ (per pair, in (destination, expert) order): its token's row within the block sent.
  pair_idx_.resize(U + 2 * P + T + (summed_ ? U : 0));
  pair_local_.resize(summed_ ? 2 * P : P);
  for (int d = 0; d < N; ++d)
    for (int64_t t = 0; t < T; ++t)
      if (const int32_t u = local_[static_cast<size_t>(d) * T + t]; u >= 0)
        pair_idx_[uniq_offset_[d] + u] = static_cast<int32_t>(t);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t t = p / top_k;
    const int d = dest_[ids[p]];
    const int64_t i = key_offset_[static_cast<size_t>(d) * E + ids[p]]++;
    int64_t j = 0;
    for (int64_t q = t * top_k; q < (t + 1) * top_k; ++q) j += ids[q] < ids[p] || (ids[q] == ids[p] && q < p);
    if (summed_) {
      pair_local_[2 * i] = local_[static_cast<size_t>(d) * T + t];
      pair_local_[2 * i + 1] = std::bit_cast<int32_t>(weights[p]);
    } else {
      pair_local_[i] = local_[static_cast<size_t>(d) * T + t];
    }
    pair_idx_[U + j * T + t] = static_cast<int32_t>(i);
    pair_idx_[U + P + j * T + t] = std::bit_cast<int32_t>(weights[p]);
  }
  for (int64_t t = 0; t < T; ++t) pair_idx_[U + 2 * P + t] = static_cast<int32_t>(t);
  // Summed combine: [U + 2P + T, + U) ones (float bits), the scale of the partial sums' add.
  if (summed_) std::fill_n(pair_idx_.begin() + U + 2 * P + T, U, std::bit_cast<int32_t>(1.f));
  send_rows_.assign(N, 0);  // pairs per destination
  for (int d = 0; d < N; ++d)
    for (int e = 0; e < E; ++e) send_rows_[d] += send_counts_[d * K + e];

  // 2. Gather the distinct rows on the backend (enqueued; the exchange orders after it).
  const size_t row_bytes = static_cast<size_t>(H) * sizeof(float);
  EF_RETURN_IF_ERROR(Reserve(backend_, &send_dev_, std::max(U, P) * row_bytes));
  EF_RETURN_IF_ERROR(Reserve(backend_, &back_dev_, P * row_bytes));
  EF_RETURN_IF_ERROR(Reserve(backend_, &pair_idx_dev_, pair_idx_.size() * sizeof(int32_t)));
  const int32_t* idx = pair_idx_dev_.i32();
  if (P > 0) {
    backend_->CopyToDevice(pair_idx_dev_.data(), pair_idx_.data(), pair_idx_.size() * sizeof(int32_t));
    backend_->GatherRows(h, idx, U, H, send_dev_.f32());
  }

  // 3. Counts per (rank, expert) and distinct rows per rank; then the rows, and each pair's row
  // within its block. Pairs from one rank arrive ordered by expert.
  recv_counts_.assign(static_cast<size_t>(N) * K, 0);
  EF_RETURN_IF_ERROR(exchange_->ExchangeCounts(send_counts_, recv_counts_, "the " + where + " token counts"));
  EF_RETURN_IF_ERROR(ShareForecasts(layer, K));
  recv_rows_.assign(N, 0);
  recv_uniq_.assign(N, 0);
  recv_uniq_offset_.assign(N + 1, 0);
  recv_expert_.clear();
  for (int r = 0; r < N; ++r) {
    for (int e = 0; e < E; ++e) {
      const int64_t c = recv_counts_[r * K + e];
      if (c < 0) return Internal("rank " + std::to_string(r) + " sent a negative row count");
      if (planned && c != (plan_.compute[static_cast<size_t>(r) * E + e] == me ? all_rows_[r * E + e] : 0))
        return Internal("rank " + std::to_string(r) + " sent rows the plan does not give this rank");
      recv_rows_[r] += c;
      recv_expert_.insert(recv_expert_.end(), static_cast<size_t>(c), static_cast<int32_t>(e));
    }
    recv_uniq_[r] = recv_counts_[r * K + E];
    if (recv_uniq_[r] < 0 || recv_uniq_[r] > recv_rows_[r])
      return Internal("rank " + std::to_string(r) + " sent an impossible distinct row count");
    recv_uniq_offset_[r + 1] = recv_uniq_offset_[r] + recv_uniq_[r];
  }
  const int64_t R = static_cast<int64_t>(recv_expert_.size()), RU = recv_uniq_offset_[N];
  EF_RETURN_IF_ERROR(Reserve(backend_, &recv_dev_, std::max(R, RU) * row_bytes));
  EF_RETURN_IF_ERROR(Reserve(backend_, &y_dev_, std::max(R, RU) * row_bytes));
  EF_RETURN_IF_ERROR(Move(send_dev_.f32(), uniq_rows_, y_dev_.f32(), recv_uniq_, "the " + where + " token dispatch"));
  const int per_pair = summed_ ? 2 : 1;  // ints per pair: the row within the block (and the weight)
  recv_local_.resize(static_cast<size_t>(R) * per_pair);
  EF_RETURN_IF_ERROR(
      MoveInts(pair_local_, send_rows_, recv_local_, recv_rows_, per_pair, "the " + where + " row indices"));
  rows_dispatched_ += U - uniq_rows_[me];
  // Each received pair's row: its block's offset plus its row within the block; rows of the
  // distinct block (in y_dev_) are expanded to one per pair (in recv_dev_).
  if (R > 0) {
    expand_idx_.resize(R);
    int64_t i = 0;
    for (int r = 0; r < N; ++r)
      for (int64_t k = 0; k < recv_rows_[r]; ++k, ++i) {
        const int32_t u = recv_local_[i * per_pair];
        if (u < 0 || u >= recv_uniq_[r])
          return Internal("rank " + std::to_string(r) + " sent a row index out of range");
        expand_idx_[i] = static_cast<int32_t>(recv_uniq_offset_[r] + u);
      }
    EF_RETURN_IF_ERROR(Reserve(backend_, &recv_idx_dev_, static_cast<size_t>(R) * sizeof(int32_t)));
    backend_->CopyToDevice(recv_idx_dev_.data(), expand_idx_.data(), static_cast<size_t>(R) * sizeof(int32_t));
    backend_->GatherRows(y_dev_.f32(), recv_idx_dev_.i32(), R, H, recv_dev_.f32());
  }

  // 4. Compute every received row with its expert, unscaled.
  if (R > 0) {
    ones_.assign(R, 1.f);
    EF_RETURN_IF_ERROR(engine_->local_moe().ComputeRows(layer, R, recv_dev_.f32(), recv_expert_, ones_, y_dev_.f32()));
    rows_computed_ += R;
  } else if (share_ && forecast_depth_ > 0) {
    share_->ComputesNothing(layer);
  }

  // 5. Results return to the tokens' ranks: one row per pair, in the order the pairs were sent, or
  // (summed) one per distinct row, w * y added over the row's experts here.
  if (summed_) {
    EF_RETURN_IF_ERROR(SumOnComputeRank(R, RU, per_pair));
    EF_RETURN_IF_ERROR(
        Move(partial_dev_.f32(), recv_uniq_, back_dev_.f32(), uniq_rows_, "the " + where + " expert results"));
    if (P == 0) return Status::Ok();
    // Each destination's block adds its partial sums (tokens are distinct within a block).
    const float* ones = reinterpret_cast<const float*>(idx + U + 2 * P + T);
    for (int d = 0; d < N; ++d)
      if (uniq_rows_[d] > 0)
        backend_->ScatterAddRows(back_dev_.f32() + uniq_offset_[d] * H, idx + uniq_offset_[d], ones + uniq_offset_[d],
                                 uniq_rows_[d], H, out);
    return Status::Ok();
  }
  EF_RETURN_IF_ERROR(Move(y_dev_.f32(), recv_rows_, back_dev_.f32(), send_rows_, "the " + where + " expert results"));
  if (P == 0) return Status::Ok();

  // 6. Combine with the result of LocalMoeExecutor::Run: each element out[t] += w * y over the
  // token's experts in increasing id. Run adds expert by expert; here the j-th ScatterAddRows adds
  // every token's j-th smallest expert (one row per token, so no conflicts): the same additions in
  // the same order per element, in top_k launches rather than one per expert. The rows are first
  // gathered into combine order, into send_dev_ (the dispatch is done with it).
  backend_->GatherRows(back_dev_.f32(), idx + U, P, H, send_dev_.f32());
  const float* w = reinterpret_cast<const float*>(idx + U + P);
  for (int j = 0; j < top_k; ++j)
    backend_->ScatterAddRows(send_dev_.f32() + j * T * H, idx + U + 2 * P, w + j * T, T, H, out);
  return Status::Ok();
}

}  // namespace ef::comm
