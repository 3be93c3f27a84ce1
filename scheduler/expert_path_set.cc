#include "scheduler/expert_path_set.h"

#include <string>

// The objective is all popcounts: use the instruction (every x86-64 server CPU since 2008 has it)
// rather than the generic libgcc fallback, without changing the project-wide flags.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__POPCNT__)
#pragma GCC target("popcnt")
#endif

namespace ef::scheduler {

ExpertPathSet::ExpertPathSet(int num_tokens, int num_layers, int num_experts)
    : num_tokens_(num_tokens),
      num_layers_(num_layers),
      num_experts_(num_experts),
      num_words_((num_layers * num_experts + 63) / 64),
      words_(static_cast<size_t>(num_tokens) * num_words_, 0) {}

namespace {
Status CheckShape(int layers, int experts) {
  if (layers < 1 || layers > kMaxLayers)
    return InvalidArgument("scheduler supports 1.." + std::to_string(kMaxLayers) + " layers, got " +
                           std::to_string(layers));
  if (experts < 1 || experts > kMaxExpertsPerLayer)
    return InvalidArgument("scheduler supports 1.." + std::to_string(kMaxExpertsPerLayer) + " experts per layer, got " +
                           std::to_string(experts));
  return Status::Ok();
}
}  // namespace

StatusOr<ExpertPathSet> ExpertPathSet::FromTrace(const placement::RoutingTrace& trace,
                                                 std::span<const size_t> indices) {
  EF_RETURN_IF_ERROR(CheckShape(trace.num_layers(), trace.num_experts()));
  ExpertPathSet set(static_cast<int>(indices.size()), trace.num_layers(), trace.num_experts());
  for (size_t i = 0; i < indices.size(); ++i) {
    if (indices[i] >= trace.tokens.size()) return OutOfRange("trace token index " + std::to_string(indices[i]));
    const auto& t = trace.tokens[indices[i]];
    for (int l = 0; l < trace.num_layers(); ++l) {
      for (int j = 0; j < trace.top_k(); ++j) {
        const int e = t.experts[static_cast<size_t>(l) * trace.top_k() + j];
        if (e < 0 || e >= trace.num_experts())
          return InvalidArgument("trace token seq " + std::to_string(t.seq) + " pos " + std::to_string(t.pos) +
                                 " has expert " + std::to_string(e) + " out of range");
        set.Set(static_cast<int>(i), l, e);
      }
    }
  }
  return set;
}

StatusOr<ExpertPathSet> ExpertPathSet::FromForecast(const placement::RoutingForecast& forecast, int top_k) {
  EF_RETURN_IF_ERROR(CheckShape(forecast.num_layers, forecast.num_experts));
  if (top_k < 1) return InvalidArgument("top_k must be >= 1");
  ExpertPathSet set(forecast.num_tokens, forecast.num_layers, forecast.num_experts);
  for (int t = 0; t < forecast.num_tokens; ++t)
    for (int l = 0; l < forecast.num_layers; ++l)
      for (int e : forecast.TopK(t, l, top_k)) set.Set(t, l, e);
  return set;
}

int ExpertPathSet::CountDistinct(std::span<const int> tokens) const {
  int total = 0;
  for (int w = 0; w < num_words_; ++w) {
    uint64_t u = 0;
    for (int t : tokens) u |= row(t)[w];
    total += std::popcount(u);
  }
  return total;
}

int ExpertPathSet::CountDistinctInLayer(std::span<const int> tokens, int layer) const {
  int n = 0;
  for (int e = 0; e < num_experts_; ++e) {
    for (int t : tokens) {
      if (Test(t, layer, e)) {
        ++n;
        break;
      }
    }
  }
  return n;
}

}  // namespace ef::scheduler
