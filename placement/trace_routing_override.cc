#include "placement/trace_routing_override.h"

namespace ef::placement {

StatusOr<std::unique_ptr<TraceRoutingOverride>> TraceRoutingOverride::Create(RoutingTrace trace,
                                                                             const runtime::ModelConfig& config,
                                                                             TraceKeying keying) {
  EF_RETURN_IF_ERROR(CheckTraceShape(trace, config.num_moe_layers(), config.num_experts, config.top_k));
  trace.SortBySeqPos();
  auto o = std::make_unique<TraceRoutingOverride>();
  o->trace_ = std::move(trace);
  o->keying_ = keying;
  o->num_moe_layers_ = config.num_moe_layers();
  return o;
}

size_t TraceRoutingOverride::SequenceStart(int64_t seq) const {
  // A fixed odd multiplier spreads consecutive ids over the trace (splitmix64's first step); the
  // start depends on nothing but the id, so every rank and every batching agrees.
  uint64_t z = static_cast<uint64_t>(seq) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z ^= z >> 31;
  return static_cast<size_t>(z % trace_.tokens.size());
}

runtime::RoutingHook TraceRoutingOverride::Hook() {
  return [this](runtime::LayerRouting& r) -> Status {
    const int k = r.top_k;
    const size_t n = trace_.tokens.size();
    for (int t = 0; t < r.num_tokens; ++t) {
      const size_t index = keying_ == TraceKeying::kSequence ? TokenFor(r.seq[t], r.pos[t]) : (cursor_ + t) % n;
      const TraceToken& tok = trace_.tokens[index];
      for (int j = 0; j < k; ++j) {
        const size_t i = static_cast<size_t>(r.moe_layer.index) * k + j;
        r.ids[t * k + j] = tok.experts[i];
        r.weights[t * k + j] = tok.weights.empty() ? 1.0f / k : tok.weights[i];
      }
    }
    if (on_override_ && keying_ == TraceKeying::kStream) on_override_(r.moe_layer.index, cursor_, r.num_tokens);
    if (r.moe_layer.index == num_moe_layers_ - 1) cursor_ += r.num_tokens;
    return Status::Ok();
  };
}

}  // namespace ef::placement
