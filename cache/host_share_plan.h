// PlanHostShare: which of a layer's missed experts the host CPU computes (cache.cpu_compute), so
// that the layer's two miss paths, the copy engine loading experts into device slots and the host
// computing them from their pinned copies, finish as early as possible.
//
// Misses are taken in compute order; each goes whole to the path that would finish it first (the
// rule of `whole`). Then, unless told not to, one expert of the path that finishes last is split:
// the GPU computes the first f of its intermediate rows from a partial copy (f of the copy time),
// the host the remaining 1 - f (that share of its host time), with f chosen so both paths end
// together. At batch 1 a layer typically misses one expert: whole, it costs min(copy, host); split,
// copy * host / (copy + host) (bf16 Mixtral expert on an H200 host: 6.3 and 3.3 ms -> 2.2 ms).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

namespace ef::cache {

// One miss of a layer, in compute order.
struct MissCost {
  int32_t expert = -1;
  double copy_ms = 0;       // loading it whole into a slot
  double part_copy_ms = 0;  // loading all of it as a split's partial copy would (0: copy_ms)
  double host_ms = 0;       // computing it whole on the host for its rows
  bool eligible = false;    // the host may compute it (pinned copy, few rows)
};

struct HostSharePlan {
  std::vector<int32_t> copy;                  // loaded into slots, in compute order
  std::vector<int32_t> host;                  // computed whole on the host
  int32_t split_expert = -1;                  // or -1
  double split_fraction = 0;                  // of the split expert's intermediate rows the GPU computes, in (0, 1)
  double copy_done_ms = 0, host_done_ms = 0;  // when each path ends, as planned
};

struct HostShareOptions {
  bool all_on_host = false;   // every eligible miss on the host (cache.cpu_compute on)
  bool split = true;          // split one expert between the paths when that ends the layer sooner
  double max_fraction = 0.5;  // the largest copied share of a split expert (the staging area)
  double min_gain = 0.03;     // split only when it shortens the layer by this fraction
  // > 0 (cache.cpu_compute split, for tests): the first eligible miss is split at this fraction,
  // every other eligible miss goes to the host.
  double force_fraction = 0;
};

HostSharePlan PlanHostShare(std::span<const MissCost> misses, const HostShareOptions& options);

// Admission of misses into the slots while the host takes misses (cache.cpu_compute_admit = M). Host-
// computed and split experts never enter the slots, so without it the slots keep what they held
// when the host started taking misses: whatever the warm-up and the prompts loaded. With it each
// layer counts its steps' expert uses (one per expert and step, never decayed: Mixtral's routing is
// close to stationary), and a miss the host could take, with at least M more uses than the least
// used resident expert the step does not need, is loaded whole into that expert's slot instead (one
// per layer and step: the layer pays a whole copy once; later steps hit). A free slot takes a miss
// as it would without the rule. Replaying the Mixtral GSM8K trace through the
// split's cost model (scripts/bench/host_admission_sim.py) put 32 layers at 50% at 69 ms per token
// with M = 3 against 83-87 ms without (33 -> 26 misses per token); a decayed count against the
// policy's own victim was slower on an H200 at 4 layers (docs/results/cpu_compute).
class MissAdmission {
 public:
  MissAdmission(int num_layers, int num_experts, int margin);
  // One step of `layer`: each distinct expert of `used` (ids out of range ignored) gains one use.
  void Note(int layer, std::span<const int32_t> used);
  // The expert of `evictable` (resident, unheld, not used by this step) whose slot a miss of
  // `expert` takes, or -1 when the miss stays out of the slots. `free_slot`: the layer has an unused
  // slot, which any miss takes (the caller evicts nothing then; the result is `expert` itself).
  int32_t Victim(int layer, int32_t expert, std::span<const int32_t> evictable, bool free_slot) const;
  int64_t uses(int layer, int expert) const { return uses_[static_cast<size_t>(layer) * num_experts_ + expert]; }
  int margin() const { return margin_; }

 private:
  int num_layers_, num_experts_, margin_;
  std::vector<int64_t> uses_;  // per (layer, expert)
  std::vector<uint8_t> seen_;  // Note's scratch
};

class ExpertStore;

// What one step of the rule did.
struct AdmittedMiss {
  int32_t expert = -1;   // the miss sent whole to the copy path, or -1
  bool evicted = false;  // it takes the slot of an expert the rule evicted (else a free slot)
};

// One step of `layer` under the rule, over `store`: notes the step's uses (experts, in compute
// order, with their rows), then finds the first miss the host could take (1..max_rows rows, and
// host_copy(layer, expert)) that the rule admits, and evicts its victim from `store` (trying the
// next least used when that one is held), so the miss's Acquire takes the freed slot. At most one
// per step.
AdmittedMiss AdmitMiss(MissAdmission& admission, int layer, std::span<const int32_t> experts,
                       std::span<const int64_t> rows, int64_t max_rows, const std::function<bool(int, int)>& host_copy,
                       ExpertStore& store);

}  // namespace ef::cache
