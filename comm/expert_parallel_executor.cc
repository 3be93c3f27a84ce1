#include "comm/expert_parallel_executor.h"

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
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

namespace ef::comm {
namespace {

// Grows a backend buffer to at least `bytes` (contents not kept).
Status Reserve(runtime::Backend* backend, runtime::Buffer* b, size_t bytes) {
  if (b->bytes() >= bytes && b->data()) return Status::Ok();
  EF_ASSIGN_OR_RETURN(*b, backend->Allocate(std::max<size_t>(bytes + bytes / 2, 64)));
  return Status::Ok();
}

}  // namespace

ExpertParallelExecutor::ExpertParallelExecutor(MpiContext* ctx, TokenExchange* exchange,
                                               const ExpertPlacement* placement, runtime::Engine* engine)
    : ctx_(ctx), exchange_(exchange), placement_(placement), engine_(engine), backend_(&engine->backend()) {
  const auto& c = engine->config();
  hidden_ = c.hidden_size;
  num_experts_ = c.num_experts;
  top_k_ = c.top_k;
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

Status ExpertParallelExecutor::SyncStep(bool has_work, bool* any) {
  EF_ASSIGN_OR_RETURN(auto flags, ctx_->AllGatherInt(has_work ? 1 : 0, kTagStep, "the start of a step"));
  *any = false;
  for (int64_t f : flags) *any = *any || f != 0;
  return Status::Ok();
}

StatusOr<bool> ExpertParallelExecutor::SyncIdle() {
  bool any = false;
  EF_RETURN_IF_ERROR(SyncStep(false, &any));
  step_synced_ = any;
  return any;
}

Status ExpertParallelExecutor::RunIdleStep() {
  const auto& c = engine_->config();
  for (int l = 0; l < c.num_layers; ++l) {
    if (!c.IsMoeLayer(l)) continue;
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

Status ExpertParallelExecutor::Move(const float* send, std::span<const int64_t> send_counts, float* recv,
                                    std::span<const int64_t> recv_counts, size_t row_bytes, const std::string& what) {
  if (!exchange_->device_memory()) return exchange_->AllToAllV(send, send_counts, recv, recv_counts, row_bytes, what);
  // Host staging: correct on any backend; a device-side pack/unpack would avoid the round trip.
  size_t sb = 0, rb = 0;
  for (int64_t c : send_counts) sb += static_cast<size_t>(c) * row_bytes;
  for (int64_t c : recv_counts) rb += static_cast<size_t>(c) * row_bytes;
  EF_RETURN_IF_ERROR(Reserve(backend_, &stage_send_, sb));
  EF_RETURN_IF_ERROR(Reserve(backend_, &stage_recv_, rb));
  if (sb > 0) backend_->CopyToDevice(stage_send_.data(), send, sb);
  EF_RETURN_IF_ERROR(
      exchange_->AllToAllV(stage_send_.data(), send_counts, stage_recv_.data(), recv_counts, row_bytes, what));
  if (rb > 0) backend_->CopyToHost(recv, stage_recv_.data(), rb);
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

  // 1. Destination of each (token, slot) pair; order pairs by (destination, expert), stable so
  // tokens stay in increasing order within an expert.
  std::vector<int64_t> key_offset(static_cast<size_t>(N) * E + 1, 0);
  send_counts_.assign(N, 0);
  for (int64_t p = 0; p < P; ++p) {
    const int32_t e = ids[p];
    if (e < 0 || e >= E) return Internal("routing chose expert " + std::to_string(e) + " out of range");
    const int d = placement_->ComputeRank(layer, e, me);
    ++send_counts_[d];
    ++key_offset[static_cast<size_t>(d) * E + e + 1];
  }
  for (size_t k = 0; k + 1 < key_offset.size(); ++k) key_offset[k + 1] += key_offset[k];
  pair_order_.resize(P);
  for (int64_t p = 0; p < P; ++p) {
    const int d = placement_->ComputeRank(layer, ids[p], me);
    pair_order_[key_offset[static_cast<size_t>(d) * E + ids[p]]++] = static_cast<int32_t>(p);
  }

  // 2. Pack rows: hidden state + the expert id's bits in one extra float.
  const size_t S = static_cast<size_t>(H) + 1;
  if (T > 0) {
    h_host_.resize(static_cast<size_t>(T) * H);
    backend_->CopyToHost(h_host_.data(), h, h_host_.size() * sizeof(float));
  }
  send_.resize(static_cast<size_t>(P) * S);
  for (int64_t i = 0; i < P; ++i) {
    const int32_t p = pair_order_[i];
    std::memcpy(&send_[i * S], &h_host_[static_cast<size_t>(p / top_k) * H], sizeof(float) * H);
    std::memcpy(&send_[i * S + H], &ids[p], sizeof(int32_t));
  }
  recv_counts_.assign(N, 0);
  EF_RETURN_IF_ERROR(exchange_->ExchangeCounts(send_counts_, recv_counts_, "the " + where + " token counts"));
  int64_t R = 0;
  for (int64_t c : recv_counts_) R += c;
  recv_.resize(static_cast<size_t>(R) * S);
  EF_RETURN_IF_ERROR(Move(send_.data(), send_counts_, recv_.data(), recv_counts_, S * sizeof(float),
                          "the " + where + " token dispatch"));
  rows_dispatched_ += P - send_counts_[me];

  // 3. Compute every received row with its expert, unscaled.
  y_host_.resize(static_cast<size_t>(R) * H);
  if (R > 0) {
    std::vector<float>& x = combined_;  // scratch for the unpacked rows
    x.resize(static_cast<size_t>(R) * H);
    recv_expert_.resize(R);
    for (int64_t i = 0; i < R; ++i) {
      std::memcpy(&x[i * H], &recv_[i * S], sizeof(float) * H);
      std::memcpy(&recv_expert_[i], &recv_[i * S + H], sizeof(int32_t));
    }
    const size_t bytes = static_cast<size_t>(R) * H * sizeof(float);
    EF_RETURN_IF_ERROR(Reserve(backend_, &x_dev_, bytes));
    EF_RETURN_IF_ERROR(Reserve(backend_, &y_dev_, bytes));
    backend_->CopyToDevice(x_dev_.data(), x.data(), bytes);
    ones_.assign(R, 1.f);
    EF_RETURN_IF_ERROR(engine_->local_moe().ComputeRows(layer, R, x_dev_.f32(), recv_expert_, ones_, y_dev_.f32()));
    backend_->CopyToHost(y_host_.data(), y_dev_.f32(), bytes);
    rows_computed_ += R;
  }

  // 4. Results return to the tokens' ranks, in the order the pairs were sent.
  back_.resize(static_cast<size_t>(P) * H);
  EF_RETURN_IF_ERROR(Move(y_host_.data(), recv_counts_, back_.data(), send_counts_, sizeof(float) * H,
                          "the " + where + " expert results"));
  if (P == 0) return Status::Ok();

  // 5. Combine as LocalMoeExecutor::Run does: experts in increasing id, tokens in increasing
  // order within an expert, out[t] += w * y via ScatterAddRows.
  std::vector<int64_t> offset(E + 1, 0);
  for (int64_t p = 0; p < P; ++p) ++offset[ids[p] + 1];
  for (int e = 0; e < E; ++e) offset[e + 1] += offset[e];
  std::vector<int64_t> cursor(offset.begin(), offset.end() - 1);
  combined_.resize(static_cast<size_t>(P) * H);
  combine_tok_.resize(P);
  combine_scale_.resize(P);
  for (int64_t i = 0; i < P; ++i) {  // send order: for a fixed expert, tokens ascend
    const int32_t p = pair_order_[i];
    const int64_t j = cursor[ids[p]]++;
    std::memcpy(&combined_[j * H], &back_[i * H], sizeof(float) * H);
    combine_tok_[j] = p / top_k;
    combine_scale_[j] = weights[p];
  }
  const size_t bytes = static_cast<size_t>(P) * H * sizeof(float);
  EF_RETURN_IF_ERROR(Reserve(backend_, &z_dev_, bytes));
  EF_RETURN_IF_ERROR(Reserve(backend_, &idx_dev_, P * sizeof(int32_t)));
  EF_RETURN_IF_ERROR(Reserve(backend_, &scale_dev_, P * sizeof(float)));
  backend_->CopyToDevice(z_dev_.data(), combined_.data(), bytes);
  backend_->CopyToDevice(idx_dev_.data(), combine_tok_.data(), P * sizeof(int32_t));
  backend_->CopyToDevice(scale_dev_.data(), combine_scale_.data(), P * sizeof(float));
  for (int e = 0; e < E; ++e) {
    const int64_t begin = offset[e], cnt = offset[e + 1] - offset[e];
    if (cnt == 0) continue;
    backend_->ScatterAddRows(z_dev_.f32() + begin * H, idx_dev_.i32() + begin, scale_dev_.f32() + begin, cnt, H, out);
  }
  return Status::Ok();
}

}  // namespace ef::comm
