// PeerExpertSource: the peer tier of an expert's memory. A rank computes the experts the
// placement assigns it; those it is home for come from `local` (its own host mapping or cache),
// the others are read from a home rank's host shard with a UCX get into local host memory, then
// made usable by the backend (UploadWeight; the CPU backend uses the bytes in place).
//
// Each rank's host shard packs the experts it is home for (layer-major, expert order; gate, up,
// down bytes back to back), so every rank can compute any peer's offsets from the placement and
// the model alone. The shard is copied once from the checkpoint mapping at Create and registered
// with UcxRemoteMemory; with replication r the cluster keeps about r copies of the experts.
//
// As the engine's ExpertSource (no expert cache), fetched experts are kept until destruction.
// Under a per-rank expert cache the source is not installed: the cache's tiers read the shard
// (HostCopy) and peers' shards (Fetch) into its own bounded slots.
//
// host_budget_bytes bounds the shard: experts are taken in (layer, expert) order while they fit,
// the same on every rank (every rank computes every rank's offsets), so an expert past a home's
// budget is in no shard and is read from the checkpoint mapping instead.
// Not thread-safe: the engine's thread drives it.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "comm/expert_placement.h"
#include "comm/ucx_remote_memory.h"
#include "runtime/engine/expert_source.h"

namespace ef::comm {

class PeerExpertSource final : public runtime::ExpertSource {
 public:
  // Collective (registers shards, exchanges rkeys). `local` serves home experts; all pointers
  // must outlive this object.
  static StatusOr<std::unique_ptr<PeerExpertSource>> Create(MpiContext* ctx, const ExpertPlacement* placement,
                                                            const runtime::ModelWeights* weights,
                                                            runtime::Backend* backend, runtime::ExpertSource* local,
                                                            const UcxOptions& ucx, uint64_t host_budget_bytes = 0);
  ~PeerExpertSource() override;

  void OnRouting(int layer, std::vector<int32_t>& experts) override { local_->OnRouting(layer, experts); }
  StatusOr<runtime::ExpertWeights> Acquire(int layer, int expert) override;
  void Release(int layer, int expert) override;

  // The packed bytes (gate | up | down) of (layer, expert) in this rank's shard; null when this rank
  // is not its home or its host budget left the expert out.
  const std::byte* HostCopy(int layer, int expert) const;
  // Reads the packed bytes of (layer, expert) from the first home rank whose shard keeps it into
  // dst (exactly its size). NotFound when no shard keeps it; UCX errors name the rank.
  Status Fetch(int layer, int expert, std::span<std::byte> dst);

  UcxRemoteMemory& remote() { return *remote_; }
  int64_t shard_bytes() const { return static_cast<int64_t>(shard_bytes_); }
  int64_t experts_fetched() const { return static_cast<int64_t>(fetched_.size()); }
  // Collective: see UcxRemoteMemory::Shutdown.
  Status Shutdown() { return remote_->Shutdown(); }

 private:
  PeerExpertSource() = default;
  // Offset of (layer, expert) in `rank`'s shard; -1 when rank is not home for it.
  int64_t ShardOffset(int rank, int layer, int expert) const;

  MpiContext* ctx_ = nullptr;
  const ExpertPlacement* placement_ = nullptr;
  const runtime::ModelWeights* weights_ = nullptr;
  runtime::Backend* backend_ = nullptr;
  runtime::ExpertSource* local_ = nullptr;
  std::vector<std::vector<int64_t>> offsets_;  // [rank][layer * E + expert]
  char* shard_ = nullptr;
  size_t shard_bytes_ = 0;
  std::unique_ptr<UcxRemoteMemory> remote_;
  struct Fetched {
    std::unique_ptr<char[]> bytes;
    runtime::ExpertWeights weights;
  };
  std::map<std::pair<int, int>, Fetched> fetched_;
};

}  // namespace ef::comm
