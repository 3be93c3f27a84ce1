// ExpertStore: the expert cache of one device. Fixed-size slots (each the size of the model's
// largest expert) in a capacity-limited SlotArena hold the resident experts; a residency table per
// (layer, expert) says which slot holds what; a CachePolicy (via SlotCache) picks victims; a source
// callback fills a slot from the next tier (pinned host copy, mmap'd checkpoint, peer rank).
//
// Use from the forward pass, one layer at a time:
//
//   ExpertStoreOptions o;  o.num_layers = L; o.num_experts = E; o.top_k = K;
//   o.slot_bytes = largest_expert_bytes; o.slots_per_layer = 4; o.policy = "expertflow";
//   EF_ASSIGN_OR_RETURN(auto store, ExpertStore::Create(o, [&](int l, int e, std::span<std::byte> dst) {
//     return CopyExpertFromHost(l, e, dst);   // fills dst (slot_bytes bytes; extra tail bytes unused)
//   }));
//   store->SetForecast(forecast);             // per batch, optional (expertflow policy)
//   for each layer l:
//     store->SetCurrentLayer(l);
//     for (e : predicted experts of layer l+1) store->Prefetch(l + 1, e, Priority::kPrefetch);
//     for (e : experts the router picked at l) refs.push_back(store->Acquire(l, e));  // pins
//     ... compute with refs[i].data ...
//     for (ref : refs) store->Release(ref);                                            // unpins
//
// Contracts:
//   - Acquire(l, e): a hit returns at once; a miss evicts (policy; never a pinned slot) and loads
//     through the source before returning. The returned slot stays pinned, hence resident and
//     unchanged, until Release. Every Acquire needs exactly one Release. If every slot the layer
//     may use is pinned, Acquire fails with ResourceExhausted (nothing changes). A source error is
//     returned (the slot is freed again).
//   - Prefetch(l, e, priority): makes (l, e) resident without pinning it. Synchronous by default
//     (the load is done on return; an already resident expert is a no-op). With async_prefetch a
//     worker thread loads queued requests, correction requests before prefetch requests, in FIFO
//     order within a class; Prefetch then only enqueues, and an Acquire of an expert being loaded
//     waits for that load (the wait counts as stall time). Prefetch is advisory: with every slot
//     pinned it returns ResourceExhausted (sync) or drops the request (async; a dropped prefetch is
//     counted).
//   - Loads reach the arena with their priority (Acquire and Prefetch kCorrection: correction;
//     Prefetch kPrefetch and Refill: prefetch), so a device arena copies corrections first.
//   - Counters per (layer, expert): hits, misses, prefetches issued / used (first Acquire after a
//     prefetch load) / wasted (evicted before any Acquire), bytes loaded from the host tier, bytes
//     served from the device tier (hits x slot_bytes), stall time (Acquire time spent waiting for
//     a load).
//   - A correction (Prefetch kCorrection: the router picked an expert the forecast did not load)
//     is a miss however it loads: its load counts as bytes loaded, never as a prefetch, and its
//     first Acquire as the miss, not a hit (an Acquire that loads the expert itself counts the
//     same), so the counters of one access sequence do not depend on async_prefetch. A correction
//     of an expert queued as a prefetch is such a correction; one whose prefetch is already
//     loading adds nothing (the prefetch was issued: its Acquire waits, and is a hit).
//   - The policy's `time` is the store's own operation counter (one per Acquire / Prefetch load),
//     so `belady` (PolicyConfig::future) is only meaningful when that sequence is known up front.
//
// Thread safety: every public method may be called from any thread; one mutex guards the state and
// is not held while the source callback runs (loads of different experts overlap). The source is
// called from the calling thread (Acquire, sync Prefetch) or the worker thread (async Prefetch) and
// must be thread-safe when async_prefetch is on or several threads Acquire.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "cache/cache_policy.h"
#include "cache/expert_key.h"
#include "cache/slot_arena.h"
#include "cache/slot_cache.h"
#include "placement/routing_forecast.h"
#include "runtime/core/status.h"

namespace ef::cache {

// Fills dst (one slot, slot_bytes long) with expert (layer, expert) from the next tier.
using ExpertSource = std::function<Status(int layer, int expert, std::span<std::byte> dst)>;

struct ExpertStoreOptions {
  int num_layers = 0;
  int num_experts = 0;
  int top_k = 1;          // experts per token per layer; a layer's budget must hold at least this many
  size_t slot_bytes = 0;  // bytes of the largest expert; every slot has this size
  // Budget, exactly one of (see SlotCache): per-layer caches, per-layer quotas, one shared budget.
  int slots_per_layer = 0;
  std::vector<int> layer_quotas;
  int global_slots = 0;
  std::string policy = "lru";  // a MakeCachePolicy name
  // Extra policy inputs (belady's future, static's counts, expertflow's threshold); num_layers and
  // num_experts are filled in from above.
  PolicyConfig policy_config;
  bool async_prefetch = false;  // load Prefetch requests on a worker thread
  // Bytes a load of (layer, expert) moves, for the counters (unset: slot_bytes). An expert cache
  // whose loads vary in precision says what the last fill of that expert wrote.
  std::function<size_t(int layer, int expert)> loaded_bytes;
  size_t alignment = 256;  // slot alignment of the default host arena
};

// A pinned, resident expert. Valid until passed to Release.
struct SlotRef {
  int layer = -1;
  int expert = -1;
  int slot = -1;
  void* data = nullptr;              // the arena's address (device pointer on a device arena)
  std::span<const std::byte> bytes;  // host view; empty on a non-host-addressable arena
};

struct ExpertCounters {
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t prefetch_issued = 0;   // prefetch loads started
  int64_t prefetch_used = 0;     // prefetched, then acquired before eviction
  int64_t prefetch_wasted = 0;   // prefetched, evicted without an Acquire
  int64_t prefetch_dropped = 0;  // async prefetch requests dropped (no evictable slot, or load failed)
  // PrefetchSet members not loaded: the resident they would evict was as needed. A layer is
  // forecast from each of the prefetch_layers layers before it, so one expert of one step may be
  // declined (and then issued) more than once.
  int64_t prefetch_declined = 0;
  int64_t bytes_from_host = 0;    // loaded into a slot through the source
  int64_t bytes_from_device = 0;  // served by hits
  int64_t stall_ns = 0;           // Acquire time spent waiting for loads
  int64_t refills = 0;            // resident slots reloaded in place (Refill: precision upgrades)

  ExpertCounters& operator+=(const ExpertCounters& o);
};

struct ExpertStoreStats {
  int num_layers = 0;
  int num_experts = 0;
  std::vector<ExpertCounters> per_expert;  // [layer * num_experts + expert]
  ExpertCounters total;
  ExpertCounters Layer(int layer) const;
  double hit_rate() const {
    const int64_t a = total.hits + total.misses;
    return a ? static_cast<double>(total.hits) / a : 0.0;
  }
};

class ExpertStore {
 public:
  // Validates the options (shape, a budget smaller than top_k names both numbers, slot_bytes > 0,
  // unknown policy) and allocates the arena: a HostSlotArena when `arena` is null, else `arena`,
  // which must have exactly the budget's slot count and at least slot_bytes per slot.
  static StatusOr<std::unique_ptr<ExpertStore>> Create(const ExpertStoreOptions& options, ExpertSource source,
                                                       std::unique_ptr<SlotArena> arena = nullptr);
  ~ExpertStore();  // stops the worker (pending requests are dropped); slots must be released
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  StatusOr<SlotRef> Acquire(int layer, int expert);
  void Release(const SlotRef& ref);
  Status Prefetch(int layer, int expert, Priority priority);
  // Prefetches a forecast set of one layer as a group: its members already resident are held
  // (pinned) while the missing ones load, so loading one member never evicts another (a recency
  // policy would otherwise pick an older member of the very set it is filling, and the layer would
  // miss it); members it loads are held too, so a set larger than the layer's slots loads what
  // fits and skips the rest (advisory, like Prefetch). In async mode the loads run later on the
  // worker, after the hold: there it is per expert.
  //
  // `need` (optional, num_experts values): the probability that the layer's next run uses each of
  // its experts. Once the layer's free slots are taken, loading a member evicts a resident, which
  // costs a load of its own if that resident is needed after all. In expected loads a prefetch of
  // e over victim v costs (1 - need[e]) + need[v] more than loading on demand, so a member loads
  // only when need[e] - need[v] >= min_gain, v being the resident the policy would evict (with a
  // free slot need[v] = 0: the plain min_prob gate; a victim of another layer, under a shared
  // budget, counts as 0). Members are tried in order; a declined one is counted and skipped.
  // Empty `need`: every member loads.
  void PrefetchSet(int layer, std::span<const int32_t> experts, Priority priority, std::span<const float> need = {},
                   double min_gain = 0);
  // Reloads the slot of a resident, loaded expert that no one holds through the source, in the
  // calling thread (e.g. to replace a low-precision copy by the checkpoint's): counted as a refill
  // and its bytes, not as a miss. Nothing happens when the expert is not resident, is loading or is
  // held (pinned) elsewhere; a source error evicts it (the next Acquire loads it again).
  Status Refill(int layer, int expert);
  // Blocks until the async prefetch queue is empty and no load is in flight (no-op when sync).
  void WaitForPrefetches();
  // Drops a resident, loaded expert that no one holds, so that the next miss of its partition (its
  // layer's, under per-layer budgets) takes its slot instead of the policy's victim (e.g. an
  // admission rule that chose the victim itself). Returns whether it did; an expert that is not
  // resident, is loading or is held stays.
  bool Evict(int layer, int expert);

  bool IsResident(int layer, int expert) const;  // resident and loaded
  int FreeSlots(int layer) const;                // unused slots the layer's experts may take
  ExpertStoreStats stats() const;
  // Zeroes the counters (after a warm-up); residency and the policy's state stay.
  void ResetCounters();
  int num_slots() const { return num_slots_; }
  int num_layers() const { return options_.num_layers; }
  int num_experts() const { return options_.num_experts; }
  size_t slot_bytes() const { return options_.slot_bytes; }

  // Forwarded to the policy (expertflow uses them; others ignore them).
  void SetForecast(const placement::RoutingForecast& forecast);
  void SetCurrentLayer(int layer);

 private:
  ExpertStore(const ExpertStoreOptions& options, ExpertSource source, std::unique_ptr<SlotArena> arena,
              std::unique_ptr<SlotCache> cache);
  size_t Index(const ExpertKey& k) const { return k.Index(options_.num_experts); }
  Status CheckKey(int layer, int expert) const;
  // Called with mu_ held (lock); releases it around the source call. The slot of `key` must be
  // resident, pinned and marked loading.
  Status Fill(std::unique_lock<std::mutex>& lock, const ExpertKey& key, int slot, Priority priority);
  void NoteEviction(const std::optional<ExpertKey>& evicted);
  // Loads `key` ahead of its Acquire (lock held): a prefetch, or a correction at kCorrection.
  // Already resident or loading -> OK, nothing counted.
  Status PrefetchLocked(std::unique_lock<std::mutex>& lock, const ExpertKey& key, Priority priority);
  // The members of PrefetchSet that pass its `need` rule, in order (lock held; counts the others).
  std::vector<int32_t> AdmitLocked(int layer, std::span<const int32_t> experts, std::span<const float> need,
                                   double min_gain);
  void WorkerLoop();

  const ExpertStoreOptions options_;
  const ExpertSource source_;
  const std::unique_ptr<SlotArena> arena_;
  const int num_slots_;

  mutable std::mutex mu_;
  std::condition_variable cv_;  // a load finished, or the queue changed
  std::unique_ptr<SlotCache> cache_;
  std::vector<uint8_t> loading_;  // per (layer, expert): a load into its slot is in flight
  // What loaded an expert ahead of its Acquire, until that first Acquire or its eviction: a
  // prefetch (then used or wasted) or a correction (that Acquire is the miss).
  enum class LoadedAhead : uint8_t { kNo, kPrefetch, kCorrection };
  std::vector<LoadedAhead> loaded_ahead_;  // per (layer, expert)
  std::vector<uint8_t> queued_;            // per (layer, expert): in an async queue
  std::vector<ExpertCounters> counters_;
  int64_t time_ = 0;
  int in_flight_ = 0;
  std::deque<ExpertKey> queues_[2];  // indexed by Priority
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace ef::cache
