#include "cache/expert_store.h"

#include <algorithm>
#include <chrono>
#include <optional>
#include <utility>

#include "cache/host_slot_arena.h"
#include "runtime/core/logging.h"

namespace ef::cache {
namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

ExpertCounters& ExpertCounters::operator+=(const ExpertCounters& o) {
  hits += o.hits;
  misses += o.misses;
  prefetch_issued += o.prefetch_issued;
  prefetch_used += o.prefetch_used;
  prefetch_wasted += o.prefetch_wasted;
  prefetch_dropped += o.prefetch_dropped;
  prefetch_declined += o.prefetch_declined;
  bytes_from_host += o.bytes_from_host;
  bytes_from_device += o.bytes_from_device;
  stall_ns += o.stall_ns;
  refills += o.refills;
  return *this;
}

ExpertCounters ExpertStoreStats::Layer(int layer) const {
  ExpertCounters c;
  for (int e = 0; e < num_experts; ++e) c += per_expert[static_cast<size_t>(layer) * num_experts + e];
  return c;
}

StatusOr<std::unique_ptr<ExpertStore>> ExpertStore::Create(const ExpertStoreOptions& options, ExpertSource source,
                                                           std::unique_ptr<SlotArena> arena) {
  if (options.slot_bytes == 0) return InvalidArgument("expert store: slot_bytes (largest expert) must be > 0");
  if (!source) return InvalidArgument("expert store: no source callback given");
  PolicyConfig pc = options.policy_config;
  pc.num_layers = options.num_layers;
  pc.num_experts = options.num_experts;
  EF_ASSIGN_OR_RETURN(auto policy, MakeCachePolicy(options.policy, pc));
  SlotCacheOptions so;
  so.num_layers = options.num_layers;
  so.num_experts = options.num_experts;
  so.top_k = options.top_k;
  so.slots_per_layer = options.slots_per_layer;
  so.layer_quotas = options.layer_quotas;
  so.global_slots = options.global_slots;
  EF_ASSIGN_OR_RETURN(auto cache, SlotCache::Create(so, std::move(policy)));
  if (!arena) {
    EF_ASSIGN_OR_RETURN(arena, HostSlotArena::Create(cache->num_slots(), options.slot_bytes, options.alignment));
  } else if (arena->num_slots() != cache->num_slots() || arena->slot_bytes() < options.slot_bytes) {
    return InvalidArgument("expert store: arena has " + std::to_string(arena->num_slots()) + " slots of " +
                           std::to_string(arena->slot_bytes()) + " bytes, the budget needs " +
                           std::to_string(cache->num_slots()) + " slots of " + std::to_string(options.slot_bytes));
  }
  EF_LOG(INFO, CACHE, "expert store: %d slots of %zu bytes on %s, policy %s%s", cache->num_slots(), options.slot_bytes,
         arena->tier(), options.policy.c_str(), options.async_prefetch ? ", async prefetch" : "");
  return std::unique_ptr<ExpertStore>(new ExpertStore(options, std::move(source), std::move(arena), std::move(cache)));
}

ExpertStore::ExpertStore(const ExpertStoreOptions& options, ExpertSource source, std::unique_ptr<SlotArena> arena,
                         std::unique_ptr<SlotCache> cache)
    : options_(options),
      source_(std::move(source)),
      arena_(std::move(arena)),
      num_slots_(cache->num_slots()),
      cache_(std::move(cache)) {
  const size_t n = static_cast<size_t>(options_.num_layers) * options_.num_experts;
  loading_.assign(n, 0);
  loaded_ahead_.assign(n, LoadedAhead::kNo);
  queued_.assign(n, 0);
  counters_.assign(n, {});
  if (options_.async_prefetch) worker_ = std::thread([this] { WorkerLoop(); });
}

ExpertStore::~ExpertStore() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

Status ExpertStore::CheckKey(int layer, int expert) const {
  if (layer < 0 || layer >= options_.num_layers || expert < 0 || expert >= options_.num_experts)
    return OutOfRange("expert store: (layer " + std::to_string(layer) + ", expert " + std::to_string(expert) +
                      ") outside " + std::to_string(options_.num_layers) + " layers x " +
                      std::to_string(options_.num_experts) + " experts");
  return Status::Ok();
}

void ExpertStore::NoteEviction(const std::optional<ExpertKey>& evicted) {
  if (!evicted) return;
  const size_t i = Index(*evicted);
  if (loaded_ahead_[i] == LoadedAhead::kPrefetch) ++counters_[i].prefetch_wasted;
  loaded_ahead_[i] = LoadedAhead::kNo;
  EF_LOG(TRACE, CACHE, "evicted expert %d of layer %d", evicted->expert, evicted->layer);
}

Status ExpertStore::Fill(std::unique_lock<std::mutex>& lock, const ExpertKey& key, int slot, Priority priority) {
  const size_t i = Index(key);
  ++in_flight_;
  lock.unlock();
  Status s = arena_->Load(slot, key.layer, key.expert, priority);
  std::span<std::byte> view = arena_->host_view(slot);
  if (s.code() != StatusCode::kUnimplemented) {
    // The arena loaded (or enqueued the load of) the slot from its own host tier.
  } else if (!view.empty()) {
    s = source_(key.layer, key.expert, view.first(std::min(view.size(), options_.slot_bytes)));
  } else {
    // Not host-addressable (device arena): stage on the host, then copy in (the slot's size: slots
    // may be smaller than the largest, SlotSpans).
    std::vector<std::byte> staging(std::min(arena_->slot_size(slot), options_.slot_bytes));
    s = source_(key.layer, key.expert, staging);
    if (s.ok()) s = arena_->CopyIn(slot, staging);
  }
  lock.lock();
  --in_flight_;
  loading_[i] = 0;
  if (s.ok()) {
    counters_[i].bytes_from_host += static_cast<int64_t>(
        options_.loaded_bytes ? options_.loaded_bytes(key.layer, key.expert) : options_.slot_bytes);
  } else {
    s.Prepend("loading expert " + std::to_string(key.expert) + " of layer " + std::to_string(key.layer) + ": ");
  }
  cv_.notify_all();
  return s;
}

StatusOr<SlotRef> ExpertStore::Acquire(int layer, int expert) {
  EF_RETURN_IF_ERROR(CheckKey(layer, expert));
  const ExpertKey key{layer, expert};
  const size_t i = Index(key);
  std::unique_lock<std::mutex> lock(mu_);
  const int64_t t0 = NowNs();
  bool waited = false;
  StatusOr<SlotCache::Result> placed = Internal("unplaced");
  while (true) {
    while (cache_->IsResident(key) && loading_[i]) {  // a prefetch is loading it: wait, then hit
      waited = true;
      cv_.wait(lock);
    }
    placed = cache_->Access(key, time_++);
    // A prefetch filling a slot holds it pinned until its copy ends: with every slot of the layer
    // pinned, wait for the loads in flight before calling the layer's slots exhausted.
    if (placed.ok() || placed.status().code() != StatusCode::kResourceExhausted || in_flight_ == 0) break;
    waited = true;
    cv_.wait(lock);
  }
  if (waited) counters_[i].stall_ns += NowNs() - t0;
  EF_ASSIGN_OR_RETURN(SlotCache::Result r, std::move(placed));
  cache_->Pin(key);
  const LoadedAhead ahead = std::exchange(loaded_ahead_[i], LoadedAhead::kNo);
  if (r.hit && ahead == LoadedAhead::kCorrection) {
    // Resident only because a correction loaded it ahead of this access (on the worker, or a
    // Prefetch at kCorrection): the miss it is.
    ++counters_[i].misses;
  } else if (r.hit) {
    ++counters_[i].hits;
    counters_[i].bytes_from_device += static_cast<int64_t>(
        options_.loaded_bytes ? options_.loaded_bytes(key.layer, key.expert) : options_.slot_bytes);
    if (ahead == LoadedAhead::kPrefetch) ++counters_[i].prefetch_used;
  } else {
    ++counters_[i].misses;
    NoteEviction(r.evicted);
    loading_[i] = 1;
    const int64_t t1 = NowNs();
    Status s = Fill(lock, key, r.slot, Priority::kCorrection);
    counters_[i].stall_ns += NowNs() - t1;
    if (!s.ok()) {
      cache_->Unpin(key);
      cache_->Remove(key);
      return s;
    }
  }
  SlotRef ref;
  ref.layer = layer;
  ref.expert = expert;
  ref.slot = r.slot;
  ref.data = arena_->data(r.slot);
  std::span<std::byte> view = arena_->host_view(r.slot);
  if (!view.empty()) ref.bytes = view.first(std::min(view.size(), options_.slot_bytes));
  return ref;
}

Status ExpertStore::Refill(int layer, int expert) {
  EF_RETURN_IF_ERROR(CheckKey(layer, expert));
  const ExpertKey key{layer, expert};
  const size_t i = Index(key);
  std::unique_lock<std::mutex> lock(mu_);
  if (!cache_->IsResident(key) || loading_[i] || cache_->pin_count(key) > 0) return Status::Ok();
  cache_->Pin(key);  // the loader's pin, as a prefetch's
  loading_[i] = 1;
  // Not needed by the layer computing now: behind the corrections.
  Status s = Fill(lock, key, cache_->SlotOf(key), Priority::kPrefetch);
  cache_->Unpin(key);
  if (!s.ok()) {
    cache_->Remove(key);
    return s;
  }
  ++counters_[i].refills;
  return Status::Ok();
}

void ExpertStore::Release(const SlotRef& ref) {
  if (ref.slot < 0 || !CheckKey(ref.layer, ref.expert).ok()) return;
  std::lock_guard<std::mutex> lock(mu_);
  cache_->Unpin({ref.layer, ref.expert});
}

Status ExpertStore::PrefetchLocked(std::unique_lock<std::mutex>& lock, const ExpertKey& key, Priority priority) {
  const size_t i = Index(key);
  if (cache_->IsResident(key)) return Status::Ok();
  EF_ASSIGN_OR_RETURN(SlotCache::Result r, cache_->Insert(key, time_++));
  NoteEviction(r.evicted);
  cache_->Pin(key);  // the loader's pin: the slot cannot be evicted while it fills
  loading_[i] = 1;
  const bool correction = priority == Priority::kCorrection;
  if (!correction) ++counters_[i].prefetch_issued;  // a correction counts as a miss, at its Acquire
  Status s = Fill(lock, key, r.slot, priority);
  cache_->Unpin(key);
  if (!s.ok()) {
    cache_->Remove(key);
    return s;
  }
  loaded_ahead_[i] = correction ? LoadedAhead::kCorrection : LoadedAhead::kPrefetch;
  return Status::Ok();
}

Status ExpertStore::Prefetch(int layer, int expert, Priority priority) {
  EF_RETURN_IF_ERROR(CheckKey(layer, expert));
  const ExpertKey key{layer, expert};
  std::unique_lock<std::mutex> lock(mu_);
  if (!options_.async_prefetch) return PrefetchLocked(lock, key, priority);
  const size_t i = Index(key);
  if (cache_->IsResident(key)) return Status::Ok();
  if (queued_[i]) {
    // Already queued; a correction of an expert waiting as a prefetch moves it ahead of them.
    auto& prefetches = queues_[static_cast<int>(Priority::kPrefetch)];
    auto it = std::find(prefetches.begin(), prefetches.end(), key);
    if (priority != Priority::kCorrection || it == prefetches.end()) return Status::Ok();
    prefetches.erase(it);
  }
  queued_[i] = 1;
  queues_[static_cast<int>(priority)].push_back(key);
  cv_.notify_all();
  return Status::Ok();
}

std::vector<int32_t> ExpertStore::AdmitLocked(int layer, std::span<const int32_t> experts, std::span<const float> need,
                                              double min_gain) {
  if (need.size() != static_cast<size_t>(options_.num_experts) || layer < 0 || layer >= options_.num_layers)
    return {experts.begin(), experts.end()};
  // Replays the loads ahead: the first members take the free slots, each later one the victim the
  // policy picks among the residents not yet taken (the set's resident members are held already,
  // so none of them is a candidate).
  std::vector<ExpertKey> candidates = cache_->Evictable(layer);
  int free = cache_->free_slots(layer);
  std::vector<int32_t> admitted;
  for (int32_t e : experts) {
    const ExpertKey key{layer, e};
    if (!CheckKey(layer, e).ok() || cache_->IsResident(key)) {  // Prefetch rejects it, or has nothing to do
      admitted.push_back(e);
      continue;
    }
    if (free > 0) {  // evicts nothing
      --free;
      admitted.push_back(e);
      continue;
    }
    const std::optional<ExpertKey> victim =
        candidates.empty() ? std::nullopt : cache_->policy().ChooseVictim(candidates, time_);
    if (!victim) {  // nothing evictable: Prefetch fails (or drops it) as it would have
      admitted.push_back(e);
      continue;
    }
    const double victim_need = victim->layer == layer ? need[victim->expert] : 0.0;
    if (need[e] - victim_need < min_gain) {
      ++counters_[Index(key)].prefetch_declined;
      continue;
    }
    admitted.push_back(e);
    candidates.erase(std::find(candidates.begin(), candidates.end(), *victim));
  }
  return admitted;
}

void ExpertStore::PrefetchSet(int layer, std::span<const int32_t> experts, Priority priority,
                              std::span<const float> need, double min_gain) {
  std::vector<ExpertKey> held;
  std::vector<int32_t> admitted;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int32_t e : experts) {
      const ExpertKey key{layer, e};
      // Not one still loading: its loader's pin holds it already, and a pin of ours would keep a
      // slot whose load fails from being removed (a later Acquire would hit bytes never written).
      if (CheckKey(layer, e).ok() && cache_->IsResident(key) && !loading_[Index(key)] && cache_->Pin(key))
        held.push_back(key);
    }
    admitted = AdmitLocked(layer, experts, need, min_gain);
  }
  for (int32_t e : admitted) {
    if (!Prefetch(layer, e, priority).ok()) continue;  // every slot held: the rest load on demand
    // Loaded (sync mode): hold it too, so the set's later members cannot evict it.
    std::lock_guard<std::mutex> lock(mu_);
    const ExpertKey key{layer, e};
    if (cache_->IsResident(key) && !loading_[Index(key)] && std::find(held.begin(), held.end(), key) == held.end() &&
        cache_->Pin(key))
      held.push_back(key);
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (const ExpertKey& key : held) cache_->Unpin(key);
}

void ExpertStore::WorkerLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return stop_ || !queues_[0].empty() || !queues_[1].empty(); });
    if (stop_) return;
    const Priority priority = !queues_[0].empty() ? Priority::kCorrection : Priority::kPrefetch;
    auto& q = queues_[static_cast<int>(priority)];
    const ExpertKey key = q.front();
    q.pop_front();
    queued_[Index(key)] = 0;
    ++in_flight_;  // keeps WaitForPrefetches waiting between dequeue and load
    Status s = PrefetchLocked(lock, key, priority);
    --in_flight_;
    if (!s.ok()) {
      // A dropped correction is no prefetch: its Acquire loads it (a miss, as it would have been).
      if (priority == Priority::kPrefetch) ++counters_[Index(key)].prefetch_dropped;
      EF_LOG(DEBUG, CACHE, "%s of expert %d of layer %d dropped: %s",
             priority == Priority::kPrefetch ? "prefetch" : "correction", key.expert, key.layer, s.message().c_str());
    }
    cv_.notify_all();
  }
}

void ExpertStore::WaitForPrefetches() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return stop_ || (queues_[0].empty() && queues_[1].empty() && in_flight_ == 0); });
}

bool ExpertStore::Evict(int layer, int expert) {
  if (!CheckKey(layer, expert).ok()) return false;
  std::lock_guard<std::mutex> lock(mu_);
  const ExpertKey key{layer, expert};
  if (!cache_->IsResident(key) || loading_[Index(key)] || cache_->pin_count(key) > 0) return false;
  cache_->Remove(key);
  NoteEviction(key);
  return true;
}

int ExpertStore::FreeSlots(int layer) const {
  if (layer < 0 || layer >= options_.num_layers) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  return cache_->free_slots(layer);
}

bool ExpertStore::IsResident(int layer, int expert) const {
  if (!CheckKey(layer, expert).ok()) return false;
  std::lock_guard<std::mutex> lock(mu_);
  const ExpertKey key{layer, expert};
  return cache_->IsResident(key) && !loading_[Index(key)];
}

ExpertStoreStats ExpertStore::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  ExpertStoreStats s;
  s.num_layers = options_.num_layers;
  s.num_experts = options_.num_experts;
  s.per_expert = counters_;
  for (const auto& c : counters_) s.total += c;
  return s;
}

void ExpertStore::ResetCounters() {
  std::lock_guard<std::mutex> lock(mu_);
  for (ExpertCounters& c : counters_) c = ExpertCounters{};
  // Prefetches loaded before the reset are not counted as used after it (used <= issued). A
  // correction loaded but not yet acquired stays one: its Acquire is a miss either way.
  for (LoadedAhead& a : loaded_ahead_)
    if (a == LoadedAhead::kPrefetch) a = LoadedAhead::kNo;
}

void ExpertStore::SetForecast(const placement::RoutingForecast& forecast) {
  std::lock_guard<std::mutex> lock(mu_);
  cache_->policy().SetForecast(forecast);
}

void ExpertStore::SetCurrentLayer(int layer) {
  std::lock_guard<std::mutex> lock(mu_);
  cache_->policy().SetCurrentLayer(layer);
}

}  // namespace ef::cache
