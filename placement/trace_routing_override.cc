#include "placement/trace_routing_override.h"

namespace ef::placement {

StatusOr<std::unique_ptr<TraceRoutingOverride>> TraceRoutingOverride::Create(RoutingTrace trace,
                                                                             const runtime::ModelConfig& config) {
  EF_RETURN_IF_ERROR(CheckTraceShape(trace, config.num_moe_layers(), config.num_experts, config.top_k));
  trace.SortBySeqPos();
  auto o = std::make_unique<TraceRoutingOverride>();
  o->trace_ = std::move(trace);
  o->num_moe_layers_ = config.num_moe_layers();
  return o;
}

runtime::RoutingHook TraceRoutingOverride::Hook() {
  return [this](runtime::LayerRouting& r) -> Status {
    const int k = r.top_k;
    const size_t n = trace_.tokens.size();
    for (int t = 0; t < r.num_tokens; ++t) {
      const TraceToken& tok = trace_.tokens[(cursor_ + t) % n];
      for (int j = 0; j < k; ++j) {
        const size_t i = static_cast<size_t>(r.moe_layer) * k + j;
        r.ids[t * k + j] = tok.experts[i];
        r.weights[t * k + j] = tok.weights.empty() ? 1.0f / k : tok.weights[i];
      }
    }
    if (on_override_) on_override_(r.moe_layer, cursor_, r.num_tokens);
    if (r.moe_layer == num_moe_layers_ - 1) cursor_ += r.num_tokens;
    return Status::Ok();
  };
}

}  // namespace ef::placement
