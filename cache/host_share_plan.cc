#include "cache/host_share_plan.h"

#include <algorithm>

#include "cache/expert_store.h"

namespace ef::cache {

HostSharePlan PlanHostShare(std::span<const MissCost> misses, const HostShareOptions& options) {
  HostSharePlan p;
  if (options.force_fraction > 0) {
    for (const MissCost& m : misses) {
      if (!m.eligible) {
        p.copy_done_ms += m.copy_ms;
        p.copy.push_back(m.expert);
      } else if (p.split_expert < 0) {
        p.split_expert = m.expert;
        p.split_fraction = options.force_fraction;
        p.copy_done_ms += (m.part_copy_ms > 0 ? m.part_copy_ms : m.copy_ms) * options.force_fraction;
        p.host_done_ms += m.host_ms * (1 - options.force_fraction);
      } else {
        p.host_done_ms += m.host_ms;
        p.host.push_back(m.expert);
      }
    }
    return p;
  }
  for (const MissCost& m : misses) {
    if (m.eligible && (options.all_on_host || p.host_done_ms + m.host_ms < p.copy_done_ms + m.copy_ms)) {
      p.host_done_ms += m.host_ms;
      p.host.push_back(m.expert);
    } else {
      p.copy_done_ms += m.copy_ms;
      p.copy.push_back(m.expert);
    }
  }
  if (!options.split || options.all_on_host || options.max_fraction <= 0) return p;
  // The candidate: the last eligible expert of the path that ends last.
  const bool from_copy = p.copy_done_ms >= p.host_done_ms;
  std::vector<int32_t>& path = from_copy ? p.copy : p.host;
  const MissCost* cand = nullptr;
  size_t at = 0;
  for (size_t i = path.size(); i-- > 0 && !cand;) {
    for (const MissCost& m : misses)
      if (m.expert == path[i] && m.eligible) {
        cand = &m;
        at = i;
        break;
      }
  }
  if (!cand) return p;
  const double copy_rest = p.copy_done_ms - (from_copy ? cand->copy_ms : 0);
  const double host_rest = p.host_done_ms - (from_copy ? 0 : cand->host_ms);
  // copy_rest + f c = host_rest + (1 - f) h, with c the copy time at the partial copies' rate.
  const double c = cand->part_copy_ms > 0 ? cand->part_copy_ms : cand->copy_ms;
  double f = (host_rest + cand->host_ms - copy_rest) / (c + cand->host_ms);
  f = std::min(f, options.max_fraction);
  if (f <= 0) return p;
  const double copy_end = copy_rest + f * c, host_end = host_rest + (1 - f) * cand->host_ms;
  const double before = std::max(p.copy_done_ms, p.host_done_ms), after = std::max(copy_end, host_end);
  if (after > before * (1 - options.min_gain)) return p;
  path.erase(path.begin() + static_cast<std::ptrdiff_t>(at));
  p.split_expert = cand->expert;
  p.split_fraction = f;
  p.copy_done_ms = copy_end;
  p.host_done_ms = host_end;
  return p;
}

MissAdmission::MissAdmission(int num_layers, int num_experts, int margin)
    : num_layers_(num_layers),
      num_experts_(num_experts),
      margin_(margin),
      uses_(static_cast<size_t>(std::max(num_layers, 0)) * std::max(num_experts, 0), 0),
      seen_(static_cast<size_t>(std::max(num_experts, 0)), 0) {}

void MissAdmission::Note(int layer, std::span<const int32_t> used) {
  if (layer < 0 || layer >= num_layers_) return;
  std::fill(seen_.begin(), seen_.end(), 0);
  for (int32_t e : used) {
    if (e < 0 || e >= num_experts_ || seen_[e]) continue;
    seen_[e] = 1;
    ++uses_[static_cast<size_t>(layer) * num_experts_ + e];
  }
}

int32_t MissAdmission::Victim(int layer, int32_t expert, std::span<const int32_t> evictable, bool free_slot) const {
  if (layer < 0 || layer >= num_layers_ || expert < 0 || expert >= num_experts_) return -1;
  if (free_slot) return expert;
  int32_t victim = -1;
  for (int32_t e : evictable) {
    if (e < 0 || e >= num_experts_) continue;
    if (victim < 0 || uses(layer, e) < uses(layer, victim)) victim = e;  // ties: the first listed
  }
  if (victim < 0) return -1;
  return uses(layer, expert) >= uses(layer, victim) + margin_ ? victim : -1;
}

AdmittedMiss AdmitMiss(MissAdmission& admission, int layer, std::span<const int32_t> experts,
                       std::span<const int64_t> rows, int64_t max_rows, const std::function<bool(int, int)>& host_copy,
                       ExpertStore& store) {
  admission.Note(layer, experts);
  // The resident experts this step does not use: the candidates for a victim.
  std::vector<int32_t> evictable;
  for (int e = 0; e < store.num_experts(); ++e)
    if (store.IsResident(layer, e) && std::find(experts.begin(), experts.end(), e) == experts.end())
      evictable.push_back(e);
  const bool free_slot = store.FreeSlots(layer) > 0;
  for (size_t i = 0; i < experts.size(); ++i) {
    const int32_t e = experts[i];
    const int64_t r = i < rows.size() ? rows[i] : 1;
    // Misses the host cannot take are copied anyway (evicting the policy's victim).
    if (store.IsResident(layer, e) || r <= 0 || r > max_rows || !host_copy(layer, e)) continue;
    for (;;) {
      const int32_t victim = admission.Victim(layer, e, evictable, free_slot);
      if (victim < 0) break;
      if (victim == e) return {e, false};  // a free slot
      if (store.Evict(layer, victim)) return {e, true};
      std::erase(evictable, victim);  // held or loading after all: the next least used
    }
  }
  return {};
}

}  // namespace ef::cache
