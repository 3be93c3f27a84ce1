// TraceRoutingOverride: makes every MoE layer of an engine take its expert choice from a routing
// trace (`routing.replay: TRACE`), so a synthetic-weight model of any real shape runs with a real
// model's routing. Two ways to map token rows to trace tokens (the trace in its (seq, pos) order):
//   kStream    rows consume trace tokens in order: the first row of the first forward takes trace
//              token 0, and so on, wrapping after the last (cache replay equivalence: the engine
//              sees exactly the trace's access sequence);
//   kSequence  a row's trace token depends only on its (engine sequence id, position): sequence s
//              reads the trace from a fixed start SequenceStart(s) onwards, position p takes token
//              (start + p) mod n. Routing is then a property of the request, not of how requests
//              were batched, interleaved or spread over ranks — what a scheduler that regroups or
//              places requests needs (each request keeps a contiguous, real stretch of routing).
// Gate weights come from the trace when it has them, else 1/k each.
#pragma once

#include <functional>

#include "placement/routing_trace.h"
#include "runtime/engine/engine.h"

namespace ef::placement {

enum class TraceKeying { kStream, kSequence };

class TraceRoutingOverride {
 public:
  // The trace's shape must match the model's MoE layers, experts and top-k (error names both).
  static StatusOr<std::unique_ptr<TraceRoutingOverride>> Create(RoutingTrace trace, const runtime::ModelConfig& config,
                                                                TraceKeying keying = TraceKeying::kStream);

  // The hook to add to the engine (runtime::Engine::AddRoutingHook). Keeps a pointer to this.
  runtime::RoutingHook Hook();
  // Trace index of the next token row (kStream).
  size_t cursor() const { return cursor_; }
  // kSequence: the trace index of token `pos` of engine sequence `seq`, and that sequence's start.
  size_t SequenceStart(int64_t seq) const;
  size_t TokenFor(int64_t seq, int32_t pos) const {
    return (SequenceStart(seq) + static_cast<size_t>(pos)) % trace_.tokens.size();
  }
  TraceKeying keying() const { return keying_; }
  const RoutingTrace& trace() const { return trace_; }
  // Called after each layer's override with (layer, next tokens' experts) so a cache can use the
  // trace's future as an oracle forecast of the next layer(s): the experts the current rows use
  // at `layer`. Optional; kStream only (rows of one forward are trace tokens first..first+n-1).
  void set_on_override(std::function<void(int moe_layer, size_t first_token, int num_tokens)> f) {
    on_override_ = std::move(f);
  }

 private:
  RoutingTrace trace_;
  TraceKeying keying_ = TraceKeying::kStream;
  int num_moe_layers_ = 0;
  size_t cursor_ = 0;
  std::function<void(int, size_t, int)> on_override_;
};

}  // namespace ef::placement
