// TraceRoutingOverride: makes every MoE layer of an engine take its expert choice from a routing
// trace (`routing.replay: TRACE`), so a synthetic-weight model of any real shape runs with a real
// model's routing. Token rows consume trace tokens in order: the first row of the first forward
// takes trace token 0, and so on (the trace is used in its (seq, pos) order); after the last trace
// token it wraps around. Gate weights come from the trace when it has them, else 1/k each.
#pragma once

#include <functional>

#include "placement/routing_trace.h"
#include "runtime/engine/engine.h"

namespace ef::placement {

class TraceRoutingOverride {
 public:
  // The trace's shape must match the model's MoE layers, experts and top-k (error names both).
  static StatusOr<std::unique_ptr<TraceRoutingOverride>> Create(RoutingTrace trace, const runtime::ModelConfig& config);

  // The hook to add to the engine (runtime::Engine::AddRoutingHook). Keeps a pointer to this.
  runtime::RoutingHook Hook();
  // Trace index of the next token row.
  size_t cursor() const { return cursor_; }
  const RoutingTrace& trace() const { return trace_; }
  // Called after each layer's override with (layer, next tokens' experts) so a cache can use the
  // trace's future as an oracle forecast of the next layer(s): the experts the current rows use
  // at `layer`. Optional.
  void set_on_override(std::function<void(int moe_layer, size_t first_token, int num_tokens)> f) {
    on_override_ = std::move(f);
  }

 private:
  RoutingTrace trace_;
  int num_moe_layers_ = 0;
  size_t cursor_ = 0;
  std::function<void(int, size_t, int)> on_override_;
};

}  // namespace ef::placement
