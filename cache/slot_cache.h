// SlotCache: residency bookkeeping for fixed-size expert slots, driven by a CachePolicy.
//
// Slots are grouped in partitions, each with a fixed capacity; an expert of layer l can only live
// in the partition of l, and a miss evicts only within that partition. Three layouts:
//   - per-layer caches: `slots_per_layer` N -> one partition of N slots per layer;
//   - per-layer quotas: `layer_quotas` q_l -> one partition of q_l slots per layer;
//   - global budget:    `global_slots` M   -> one partition of M slots shared by all layers.
// Slot ids are global, 0..num_slots()-1, partitions laid out in layer order.
//
// Pins: a pinned expert (pin count > 0) is never evicted. Pinning a non-resident expert is a no-op
// that returns false. A miss whose partition has no unpinned resident to evict (or whose policy
// refuses every candidate) fails with ResourceExhausted and changes nothing.
//
// Not thread-safe: the owner (ExpertStore, Replay) serialises calls.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "cache/cache_policy.h"
#include "cache/expert_key.h"
#include "runtime/core/status.h"

namespace ef::cache {

struct SlotCacheOptions {
  int num_layers = 0;
  int num_experts = 0;
  // Experts one token uses per layer; every partition must hold at least this many slots.
  int top_k = 1;
  // Exactly one of the following three is set (> 0 / non-empty).
  int slots_per_layer = 0;
  std::vector<int> layer_quotas;  // size num_layers; 0 for a dense layer (no routed experts)
  int global_slots = 0;
};

class SlotCache {
 public:
  struct Result {
    bool hit = false;                  // the expert was already resident
    int slot = -1;                     // where it lives now
    std::optional<ExpertKey> evicted;  // the expert that left `slot` to make room, if any
  };

  // Validates the layout: a partition smaller than top_k, a per-layer budget above num_experts or
  // a global budget above num_layers * num_experts -> InvalidArgument naming both numbers.
  static StatusOr<std::unique_ptr<SlotCache>> Create(const SlotCacheOptions& options,
                                                     std::unique_ptr<CachePolicy> policy);

  // A demand access at `time`: a hit, or a miss that makes the expert resident (evicting if full).
  StatusOr<Result> Access(const ExpertKey& key, int64_t time);
  // A prefetch at `time`: makes the expert resident without counting a use (hit = already resident).
  StatusOr<Result> Insert(const ExpertKey& key, int64_t time);
  // Drops a resident, unpinned expert (e.g. after a failed load). No-op otherwise.
  void Remove(const ExpertKey& key);

  bool IsResident(const ExpertKey& key) const { return slot_of_[Index(key)] >= 0; }
  int SlotOf(const ExpertKey& key) const { return slot_of_[Index(key)]; }
  bool Pin(const ExpertKey& key);
  void Unpin(const ExpertKey& key);
  int pin_count(const ExpertKey& key) const { return pins_[Index(key)]; }

  int num_slots() const { return num_slots_; }
  int num_partitions() const { return static_cast<int>(partitions_.size()); }
  int partition_capacity(int layer) const { return partitions_[partition_of_layer_[layer]].capacity; }
  // Unused slots of the partition of `layer` (an expert loading holds its slot).
  int free_slots(int layer) const {
    return static_cast<int>(partitions_[partition_of_layer_[layer]].free_slots.size());
  }
  // The unpinned residents of the partition of `layer`: the candidates a miss there would offer
  // the policy (to ask it which one a load would evict, without evicting).
  std::vector<ExpertKey> Evictable(int layer) const;
  CachePolicy& policy() { return *policy_; }
  const SlotCacheOptions& options() const { return options_; }

 private:
  struct Partition {
    int capacity = 0;
    std::vector<int> free_slots;       // unused slot ids (popped from the back)
    std::vector<ExpertKey> residents;  // resident experts, any order
  };
  SlotCache(const SlotCacheOptions& options, std::unique_ptr<CachePolicy> policy);
  size_t Index(const ExpertKey& k) const { return k.Index(options_.num_experts); }
  StatusOr<Result> Place(const ExpertKey& key, int64_t time, bool demand);

  SlotCacheOptions options_;
  std::unique_ptr<CachePolicy> policy_;
  std::vector<Partition> partitions_;
  std::vector<int> partition_of_layer_;
  std::vector<int> slot_of_;  // per (layer, expert): slot id or -1
  std::vector<int> pins_;     // per (layer, expert)
  int num_slots_ = 0;
};

}  // namespace ef::cache
