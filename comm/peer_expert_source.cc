#include "comm/peer_expert_source.h"

#include <cstdlib>
#include <cstring>

#include "runtime/core/logging.h"
#include "runtime/core/progress.h"

namespace ef::comm {

StatusOr<std::unique_ptr<PeerExpertSource>> PeerExpertSource::Create(
    MpiContext* ctx, const ExpertPlacement* placement, const runtime::ModelWeights* weights, runtime::Backend* backend,
    runtime::ExpertSource* local, const UcxOptions& ucx, uint64_t host_budget_bytes) {
  auto s = std::unique_ptr<PeerExpertSource>(new PeerExpertSource());
  s->ctx_ = ctx;
  s->placement_ = placement;
  s->weights_ = weights;
  s->backend_ = backend;
  s->local_ = local;
  const auto& c = weights->config();
  const int n = ctx->size(), me = ctx->rank(), E = c.num_experts;
  s->offsets_.assign(n, std::vector<int64_t>(static_cast<size_t>(c.num_layers) * E, -1));
  std::vector<size_t> total(n, 0);
  for (int l : c.MoeLayers()) {
    for (int e = 0; e < E; ++e) {
      const size_t b = weights->host_expert(l, e).nbytes();
      const size_t padded = (b + 63) / 64 * 64;
      for (int r : placement->HomeRanks(l, e)) {
        if (host_budget_bytes > 0 && total[r] + padded > host_budget_bytes) continue;
        s->offsets_[r][static_cast<size_t>(l) * E + e] = static_cast<int64_t>(total[r]);
        total[r] += padded;
      }
    }
  }
  // Every rank computes every shard's offsets from its own budget: they must agree.
  EF_ASSIGN_OR_RETURN(auto budgets, ctx->AllGatherInt(static_cast<int64_t>(host_budget_bytes), kTagGather,
                                                      "the host budgets of the expert shards"));
  for (int r = 0; r < n; ++r)
    if (budgets[r] != static_cast<int64_t>(host_budget_bytes))
      return InvalidArgument("cache.host_budget differs between ranks (rank " + std::to_string(r) + ": " +
                             std::to_string(budgets[r]) + " bytes, rank " + std::to_string(me) + ": " +
                             std::to_string(host_budget_bytes) + "); every rank needs the same");
  s->shard_bytes_ = total[me];
  if (s->shard_bytes_ > 0) {
    s->shard_ = static_cast<char*>(std::aligned_alloc(64, s->shard_bytes_));
    if (!s->shard_)
      return ResourceExhausted("cannot allocate the host expert shard of " + std::to_string(s->shard_bytes_) +
                               " bytes");
    // Rank 0 speaks for the ranks, which fill their shards at the same time.
    Progress bar("rank 0 of " + std::to_string(n) + ": filling the host expert shard",
                 static_cast<int64_t>(s->shard_bytes_), me == 0 ? 2.0 : 1e30);
    for (int l : c.MoeLayers()) {
      for (int e = 0; e < E; ++e) {
        const int64_t off = s->offsets_[me][static_cast<size_t>(l) * E + e];
        if (off < 0) continue;
        const runtime::ExpertWeights& w = weights->host_expert(l, e);
        char* d = s->shard_ + off;
        for (const runtime::Weight* p : w.parts()) {  // ExpertWeights' packed layout
          std::memcpy(d, p->data, p->nbytes());
          d += p->nbytes();
        }
        bar.Advance(static_cast<int64_t>(w.nbytes()));
      }
    }
  }
  EF_ASSIGN_OR_RETURN(s->remote_, UcxRemoteMemory::Create(ctx, s->shard_, s->shard_bytes_, ucx));
  EF_LOG(INFO, COMM, "host expert shard: %zu bytes registered for peers", s->shard_bytes_);
  return s;
}

PeerExpertSource::~PeerExpertSource() {
  remote_.reset();
  std::free(shard_);
}

int64_t PeerExpertSource::ShardOffset(int rank, int layer, int expert) const {
  return offsets_[rank][static_cast<size_t>(layer) * weights_->config().num_experts + expert];
}

const std::byte* PeerExpertSource::HostCopy(int layer, int expert) const {
  const int64_t off = ShardOffset(ctx_->rank(), layer, expert);
  return off < 0 ? nullptr : reinterpret_cast<const std::byte*>(shard_ + off);
}

Status PeerExpertSource::Fetch(int layer, int expert, std::span<std::byte> dst) {
  const size_t bytes = weights_->host_expert(layer, expert).nbytes();
  if (dst.size() != bytes)
    return Internal("peer fetch of " + std::to_string(bytes) + " bytes into " + std::to_string(dst.size()));
  for (int home : placement_->HomeRanks(layer, expert)) {
    const int64_t off = ShardOffset(home, layer, expert);
    if (off < 0 || home == ctx_->rank()) continue;
    Status st = remote_->Get(home, static_cast<uint64_t>(off), dst.data(), bytes);
    if (!st.ok())
      return st.Prepend("fetching expert " + std::to_string(expert) + " of layer " + std::to_string(layer) +
                        " from rank " + std::to_string(home));
    return Status::Ok();
  }
  return NotFound("no rank keeps expert " + std::to_string(expert) + " of layer " + std::to_string(layer) +
                  " in its host shard");
}

StatusOr<runtime::ExpertWeights> PeerExpertSource::Acquire(int layer, int expert) {
  const int me = ctx_->rank();
  if (placement_->IsHome(me, layer, expert)) return local_->Acquire(layer, expert);
  auto it = fetched_.find({layer, expert});
  if (it != fetched_.end()) return it->second.weights;
  // Read from the first home rank (primary); replicas hold identical bytes.
  const int home = placement_->PrimaryHome(layer, expert);
  const int64_t off = ShardOffset(home, layer, expert);
  if (off < 0) return Internal("placement names rank " + std::to_string(home) + " home without a shard offset");
  const runtime::ExpertWeights& hw = weights_->host_expert(layer, expert);
  Fetched f;
  const size_t bytes = hw.nbytes();
  f.bytes.reset(new char[bytes]);
  Status st = remote_->Get(home, static_cast<uint64_t>(off), f.bytes.get(), bytes);
  if (!st.ok()) return st.Prepend("fetching expert " + std::to_string(expert) + " of layer " + std::to_string(layer));
  f.weights = hw.Rebased(f.bytes.get());
  for (runtime::Weight* w : f.weights.parts()) {
    EF_ASSIGN_OR_RETURN(*w, backend_->UploadWeight(w->dtype, w->data, w->rows, w->cols));
  }
  EF_LOG(DEBUG, COMM, "fetched expert %d of layer %d (%zu bytes) from rank %d", expert, layer, bytes, home);
  auto [pos, inserted] = fetched_.emplace(std::make_pair(layer, expert), std::move(f));
  return pos->second.weights;
}

void PeerExpertSource::Release(int layer, int expert) {
  if (placement_->IsHome(ctx_->rank(), layer, expert)) local_->Release(layer, expert);
}

}  // namespace ef::comm
