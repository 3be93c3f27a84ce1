// ExpertSource: where the engine gets the weights of an expert it is about to compute.
//
// The engine calls OnRouting() with a layer's true routing as soon as the router has run (so a
// cache can correct its prefetches and load misses at high priority while hits compute), then
// Acquire()/Release() around each expert's GEMMs. Acquired weights stay valid (pinned) until
// Release. ResidentExpertSource keeps every expert usable by the backend (no cache); the expert
// cache (cache/) provides a bounded-memory implementation.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "runtime/engine/model_weights.h"

namespace ef::runtime {

class ExpertSource {
 public:
  virtual ~ExpertSource() = default;
  // The experts `layer` will compute in this step, in the order the engine will acquire them
  // (first appearance in the routing). The source may reorder them (results do not depend on
  // the order) and start loads for the ones it lacks.
  virtual void OnRouting(int layer, std::vector<int32_t>& experts) {}
  virtual StatusOr<ExpertWeights> Acquire(int layer, int expert) = 0;
  virtual void Release(int layer, int expert) {}
  // How many experts may be acquired (held) at once: the engine acquires up to this many, computes
  // them together (Backend::ExpertMlps) and releases them. A bounded cache says 1.
  virtual int MaxAcquired() const { return 1; }

  // Optional (cache.cpu_compute): called before OnRouting with each expert's row count this step
  // (rows[i] for experts[i]); moves into `host` the experts this source computes on the host CPU
  // instead of loading them into the backend. The engine computes those with ComputeOnHost while
  // the backend computes the rest, and never acquires them.
  struct HostShare {
    std::vector<int32_t> whole;  // computed whole on the host
    // At most one expert split between the two: the backend computes its intermediate rows
    // [0, split) from a partial copy (StartPart, AcquirePart), the host rows [split, inter).
    int32_t split_expert = -1;
    int64_t split = 0;
  };
  virtual void TakeHostExperts(int layer, std::vector<int32_t>& experts, std::span<const int64_t> rows,
                               HostShare& host) {}
  // y[rows, hidden] = the expert's MLP over intermediate rows [inter_begin, inter) of x[rows, hidden]
  // (not scaled by the gate; inter_begin 0: the whole expert), x and y in host memory.
  virtual Status ComputeOnHost(int layer, int expert, int64_t rows, const float* x, float* y, int64_t inter_begin = 0) {
    return Unimplemented("this expert source computes no expert on the host");
  }
  // The split expert of the last TakeHostExperts: StartPart (after OnRouting) starts loading its
  // first `split` intermediate rows (gate and up rows, down columns) into backend memory;
  // AcquirePart orders the backend's work after that load and returns them as an expert of
  // intermediate size `split`, valid until the next StartPart.
  virtual Status StartPart(int layer, int expert, int64_t split) {
    return Unimplemented("this expert source splits no expert");
  }
  virtual StatusOr<ExpertWeights> AcquirePart() { return Unimplemented("this expert source splits no expert"); }
};

// Every routed expert uploaded to the backend once (CPU: the checkpoint mapping, no copy).
class ResidentExpertSource final : public ExpertSource {
 public:
  static StatusOr<std::unique_ptr<ResidentExpertSource>> Create(const ModelWeights& model, Backend* backend);
  StatusOr<ExpertWeights> Acquire(int layer, int expert) override;

 private:
  int num_experts_ = 0;
  std::vector<ExpertWeights> experts_;
};

}  // namespace ef::runtime
