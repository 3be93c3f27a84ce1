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
// Fetched experts are kept until destruction (a bounded peer tier belongs to the expert cache).
// Not thread-safe: the engine's thread drives it.
#pragma once

#include <map>
#include <memory>
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
                                                            const UcxOptions& ucx);
  ~PeerExpertSource() override;

  void OnRouting(int layer, std::vector<int32_t>& experts) override { local_->OnRouting(layer, experts); }
  StatusOr<runtime::ExpertWeights> Acquire(int layer, int expert) override;
  void Release(int layer, int expert) override;

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
