// CachePolicy: decides which resident expert leaves a full cache. Policies only rank; they do not
// own residency. SlotCache (slot_cache.h) owns slots, residency, pins and partitions and calls the
// policy's hooks; the ExpertStore and the trace replay both drive a SlotCache.
//
// Hook contract (all called by one owner; a policy is not thread-safe on its own):
//   - `time` is a nondecreasing access counter supplied by the owner. For `belady` it must be the
//     index of the current access in PolicyConfig::future.
//   - OnHit(k, t) for a demand access to a resident expert; OnInsert(k, t, demand) when k becomes
//     resident (demand = loaded for an access, false = prefetched); OnEvict(k) when k leaves.
//   - ChooseVictim(candidates, t): candidates are resident, unpinned and in the partition that needs
//     a slot (never empty). Returns one of them, or nullopt when the policy refuses to evict any
//     (the owner then reports ResourceExhausted).
//   - SetForecast / SetCurrentLayer: forecast input (used by `expertflow`, ignored by others).
//
// Policies (MakeCachePolicy names):
//   lru        least recently used (demand accesses and inserts refresh recency).
//   lfu        least frequently used; counts every demand access seen so far (they survive eviction),
//              ties -> least recently used.
//   belady     offline optimal (MIN): evicts the candidate whose next use in `future` is furthest
//              (never used again = infinitely far), ties -> least recently used.
//   static     frequency known up front (`counts`): the most frequent experts stay; the victim is the
//              candidate with the lowest count, ties -> least recently used. With N slots the N most
//              frequent experts of a partition, once loaded, are only displaced when a pin forces it.
//   expertflow ExpertFlow's policy: evicts what the routing forecast does not need, furthest
//              predicted need first; candidates the current plan (forecast token 0 at the current and
//              later layers) needs are taken only when no other candidate exists; pinned experts are
//              never candidates; ties -> fewest demand accesses (as lfu), then least recently used.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cache/expert_key.h"
#include "placement/routing_forecast.h"
#include "runtime/core/status.h"

namespace ef::cache {

struct PolicyConfig {
  int num_layers = 0;   // > 0
  int num_experts = 0;  // > 0
  // belady: the complete access sequence, in access order (access `time` is future[time]). Required.
  std::vector<ExpertKey> future;
  // static: access counts per (layer, expert), layer-major (size num_layers * num_experts). Required.
  std::vector<int64_t> counts;
  // expertflow: a forecast probability >= this counts as a predicted need.
  float need_threshold = 0.5f;
};

class CachePolicy {
 public:
  virtual ~CachePolicy() = default;
  virtual std::string_view name() const = 0;

  virtual void OnHit(const ExpertKey& key, int64_t time) = 0;
  virtual void OnInsert(const ExpertKey& key, int64_t time, bool demand) = 0;
  virtual void OnEvict(const ExpertKey& key) = 0;
  virtual std::optional<ExpertKey> ChooseVictim(std::span<const ExpertKey> candidates, int64_t time) = 0;

  // The routing forecast of the tokens about to run: forecast token 0 is the token (batch) now
  // running, tokens 1.. the ones after it. Shape must be [*, num_layers, num_experts].
  virtual void SetForecast(const placement::RoutingForecast& forecast) {}
  // The layer now running (accesses of forecast token 0 at earlier layers are in the past).
  virtual void SetCurrentLayer(int layer) {}
};

// "lru", "lfu", "belady", "static", "expertflow".
const std::vector<std::string>& CachePolicyNames();

// Unknown name -> InvalidArgument listing the valid names; missing required config (belady without
// future, static without counts) -> InvalidArgument.
StatusOr<std::unique_ptr<CachePolicy>> MakeCachePolicy(std::string_view name, const PolicyConfig& config);

}  // namespace ef::cache
