// TraceInputs: the PredictorInput of every token of a routing trace, with each token's context
// (the token ids that precede it in its sequence, in (seq, pos) order). Owns the token-id
// storage the contexts point into; not copyable (the spans would dangle), movable.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "placement/predictor.h"
#include "placement/routing_trace.h"

namespace ef::placement {

class TraceInputs {
 public:
  // `trace` must be sorted by (seq, pos) (RoutingTrace::SortBySeqPos); inputs follow its order.
  explicit TraceInputs(const RoutingTrace& trace);
  TraceInputs(const TraceInputs&) = delete;
  TraceInputs& operator=(const TraceInputs&) = delete;
  TraceInputs(TraceInputs&&) = default;
  TraceInputs& operator=(TraceInputs&&) = default;

  std::span<const PredictorInput> inputs() const { return inputs_; }
  size_t size() const { return inputs_.size(); }

 private:
  std::vector<std::vector<int32_t>> seq_tokens_;  // per sequence, its token ids (-1 unknown)
  std::vector<PredictorInput> inputs_;
};

}  // namespace ef::placement
