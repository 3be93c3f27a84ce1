#include "cache/slot_cache.h"

#include <algorithm>
#include <string>

namespace ef::cache {

StatusOr<std::unique_ptr<SlotCache>> SlotCache::Create(const SlotCacheOptions& o, std::unique_ptr<CachePolicy> policy) {
  if (o.num_layers <= 0 || o.num_experts <= 0 || o.top_k <= 0 || o.top_k > o.num_experts)
    return InvalidArgument("expert cache: bad model shape (" + std::to_string(o.num_layers) + " layers x " +
                           std::to_string(o.num_experts) + " experts, top-" + std::to_string(o.top_k) + ")");
  if (!policy) return InvalidArgument("expert cache: no policy given");
  const int modes = (o.slots_per_layer > 0) + !o.layer_quotas.empty() + (o.global_slots > 0);
  if (modes != 1)
    return InvalidArgument("expert cache: give exactly one of slots per layer, per-layer quotas or a global budget");
  if (o.slots_per_layer > 0) {
    if (o.slots_per_layer < o.top_k)
      return InvalidArgument("expert cache budget of " + std::to_string(o.slots_per_layer) +
                             " slots per layer is smaller than top_k = " + std::to_string(o.top_k) +
                             " (one token's experts of a layer must be resident together)");
    if (o.slots_per_layer > o.num_experts)
      return InvalidArgument("expert cache budget of " + std::to_string(o.slots_per_layer) +
                             " slots per layer exceeds the " + std::to_string(o.num_experts) + " experts of a layer");
  }
  if (!o.layer_quotas.empty()) {
    if (static_cast<int>(o.layer_quotas.size()) != o.num_layers)
      return InvalidArgument("expert cache: " + std::to_string(o.layer_quotas.size()) + " layer quotas for " +
                             std::to_string(o.num_layers) + " layers");
    for (int l = 0; l < o.num_layers; ++l) {
      const int q = o.layer_quotas[l];
      // 0: a dense layer (mlp_only, DeepSeek's first_k_dense_replace), which routes to no expert.
      if (q != 0 && (q < o.top_k || q > o.num_experts))
        return InvalidArgument("expert cache quota of layer " + std::to_string(l) + " is " + std::to_string(q) +
                               " slots, outside [top_k = " + std::to_string(o.top_k) +
                               ", num_experts = " + std::to_string(o.num_experts) + "]");
    }
  }
  if (o.global_slots > 0) {
    if (o.global_slots < o.top_k)
      return InvalidArgument("expert cache budget of " + std::to_string(o.global_slots) +
                             " slots is smaller than top_k = " + std::to_string(o.top_k) +
                             " (one token's experts of a layer must be resident together)");
    if (static_cast<int64_t>(o.global_slots) > static_cast<int64_t>(o.num_layers) * o.num_experts)
      return InvalidArgument("expert cache budget of " + std::to_string(o.global_slots) + " slots exceeds the " +
                             std::to_string(o.num_layers * o.num_experts) + " experts of the model");
  }
  return std::unique_ptr<SlotCache>(new SlotCache(o, std::move(policy)));
}

SlotCache::SlotCache(const SlotCacheOptions& o, std::unique_ptr<CachePolicy> policy)
    : options_(o),
      policy_(std::move(policy)),
      partition_of_layer_(o.num_layers, 0),
      slot_of_(static_cast<size_t>(o.num_layers) * o.num_experts, -1),
      pins_(slot_of_.size(), 0) {
  auto add_partition = [&](int capacity) {
    Partition p;
    p.capacity = capacity;
    // Free list popped from the back: slots fill in increasing id order.
    for (int i = capacity - 1; i >= 0; --i) p.free_slots.push_back(num_slots_ + i);
    num_slots_ += capacity;
    partitions_.push_back(std::move(p));
  };
  if (o.global_slots > 0) {
    add_partition(o.global_slots);
  } else {
    for (int l = 0; l < o.num_layers; ++l) {
      partition_of_layer_[l] = l;
      add_partition(o.slots_per_layer > 0 ? o.slots_per_layer : o.layer_quotas[l]);
    }
  }
}

StatusOr<SlotCache::Result> SlotCache::Place(const ExpertKey& key, int64_t time, bool demand) {
  if (key.layer < 0 || key.layer >= options_.num_layers || key.expert < 0 || key.expert >= options_.num_experts)
    return OutOfRange("expert (layer " + std::to_string(key.layer) + ", expert " + std::to_string(key.expert) +
                      ") outside the model's " + std::to_string(options_.num_layers) + " layers x " +
                      std::to_string(options_.num_experts) + " experts");
  Result r;
  if (int slot = slot_of_[Index(key)]; slot >= 0) {
    if (demand) policy_->OnHit(key, time);
    r.hit = true;
    r.slot = slot;
    return r;
  }
  Partition& p = partitions_[partition_of_layer_[key.layer]];
  if (p.free_slots.empty()) {
    std::vector<ExpertKey> candidates;
    candidates.reserve(p.residents.size());
    for (const ExpertKey& k : p.residents)
      if (pins_[Index(k)] == 0) candidates.push_back(k);
    std::optional<ExpertKey> victim;
    if (!candidates.empty()) victim = policy_->ChooseVictim(candidates, time);
    if (!victim)
      return ResourceExhausted("expert cache: all " + std::to_string(p.capacity) + " slots available to layer " +
                               std::to_string(key.layer) + " are pinned; cannot load expert " +
                               std::to_string(key.expert));
    const int slot = slot_of_[Index(*victim)];
    slot_of_[Index(*victim)] = -1;
    p.residents.erase(std::find(p.residents.begin(), p.residents.end(), *victim));
    p.free_slots.push_back(slot);
    policy_->OnEvict(*victim);
    r.evicted = victim;
  }
  r.slot = p.free_slots.back();
  p.free_slots.pop_back();
  slot_of_[Index(key)] = r.slot;
  p.residents.push_back(key);
  policy_->OnInsert(key, time, demand);
  return r;
}

StatusOr<SlotCache::Result> SlotCache::Access(const ExpertKey& key, int64_t time) { return Place(key, time, true); }
StatusOr<SlotCache::Result> SlotCache::Insert(const ExpertKey& key, int64_t time) { return Place(key, time, false); }

std::vector<ExpertKey> SlotCache::Evictable(int layer) const {
  std::vector<ExpertKey> candidates;
  for (const ExpertKey& k : partitions_[partition_of_layer_[layer]].residents)
    if (pins_[Index(k)] == 0) candidates.push_back(k);
  return candidates;
}

void SlotCache::Remove(const ExpertKey& key) {
  const int slot = slot_of_[Index(key)];
  if (slot < 0 || pins_[Index(key)] > 0) return;
  Partition& p = partitions_[partition_of_layer_[key.layer]];
  slot_of_[Index(key)] = -1;
  p.residents.erase(std::find(p.residents.begin(), p.residents.end(), key));
  p.free_slots.push_back(slot);
  policy_->OnEvict(key);
}

bool SlotCache::Pin(const ExpertKey& key) {
  if (slot_of_[Index(key)] < 0) return false;
  ++pins_[Index(key)];
  return true;
}

void SlotCache::Unpin(const ExpertKey& key) {
  int& p = pins_[Index(key)];
  if (p > 0) --p;
}

}  // namespace ef::cache
