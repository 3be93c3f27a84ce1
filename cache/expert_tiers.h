// ExpertTiers: where a rank's expert cache reads an expert that is not in its device slots. The
// tiers, nearest first:
//   host        this rank's host copy: on one process the checkpoint mapping (CPU) or the pinned
//               host tier (CUDA); under expert parallelism the experts homed on this rank (its
//               host shard, which peers read too);
//   peer        another rank's host shard, read with a UCX get (comm::PeerExpertSource);
//   checkpoint  the safetensors mapping (an expert no host tier keeps: past cache.host_budget, or
//               homed on a rank that keeps no copy of it).
// The hooks come from the deployment (launch/), so cache/ does not depend on the transport.
// Bytes are "packed": gate | up | down back to back in the checkpoint's dtype, as the CPU slots
// and the host shards lay them out.
//
// Counters are per tier (loads and bytes), atomic: counters() may be read from any thread while
// FillPacked runs on the engine's or the store's worker thread. FillPacked is thread-safe when the
// hooks are.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>

#include "runtime/core/status.h"
#include "runtime/engine/model_weights.h"

namespace ef::cache {

enum class Tier { kHost = 0, kPeer = 1, kCheckpoint = 2 };
inline constexpr int kNumTiers = 3;
const char* TierName(Tier t);  // "host", "peer", "checkpoint"

struct TierHooks {
  // The packed host copy of (layer, expert) this rank keeps, or null: read from a peer or the
  // checkpoint. Unset: every expert has a host copy (one process: the checkpoint mapping is host
  // memory, CUDA pins it).
  std::function<const std::byte*(int layer, int expert)> host;
  // Reads the packed expert from a peer rank into `dst` (its exact size). NotFound when no peer
  // keeps a copy; any other error is returned to the load that needed it (a dead peer is named).
  std::function<Status(int layer, int expert, std::span<std::byte> dst)> peer;
  // Whether this rank computes (layer, expert) for its own tokens (prefetches are filtered by it:
  // under expert parallelism a rank loads only experts it computes). Unset: every expert.
  std::function<bool(int layer, int expert)> computes;
};

struct TierCounters {
  std::array<int64_t, kNumTiers> loads{};
  std::array<int64_t, kNumTiers> bytes{};
};

class ExpertTiers {
 public:
  // `model` must outlive this object.
  ExpertTiers(const runtime::ModelWeights* model, TierHooks hooks);

  // Fills dst (at least the expert's packed size) from the nearest tier that keeps the expert.
  Status FillPacked(int layer, int expert, std::span<std::byte> dst);
  // Fills dst from the peer or checkpoint tier only (CUDA: the pinned host tier serves the rest).
  Status FillPackedBeyondHost(int layer, int expert, std::span<std::byte> dst);
  bool HasHostCopy(int layer, int expert) const { return !hooks_.host || hooks_.host(layer, expert) != nullptr; }
  bool Computes(int layer, int expert) const { return !hooks_.computes || hooks_.computes(layer, expert); }
  const TierHooks& hooks() const { return hooks_; }
  TierCounters counters() const;

 private:
  void Count(Tier t, size_t bytes);
  Status CopyFromCheckpoint(int layer, int expert, std::span<std::byte> dst);

  const runtime::ModelWeights* model_;
  TierHooks hooks_;
  std::array<std::atomic<int64_t>, kNumTiers> loads_{};
  std::array<std::atomic<int64_t>, kNumTiers> bytes_{};
};

}  // namespace ef::cache
