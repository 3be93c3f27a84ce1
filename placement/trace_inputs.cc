#include "placement/trace_inputs.h"

namespace ef::placement {

TraceInputs::TraceInputs(const RoutingTrace& trace) {
  // Pass 1: per-sequence token lists (a run of equal seq ids is one sequence).
  std::vector<std::pair<size_t, size_t>> where(trace.tokens.size());  // (sequence index, index within)
  for (size_t i = 0; i < trace.tokens.size(); ++i) {
    const TraceToken& t = trace.tokens[i];
    if (i == 0 || t.seq != trace.tokens[i - 1].seq) seq_tokens_.emplace_back();
    seq_tokens_.back().push_back(static_cast<int32_t>(t.token));
    where[i] = {seq_tokens_.size() - 1, seq_tokens_.back().size() - 1};
  }
  // Pass 2: inputs whose contexts point into the now stable per-sequence vectors.
  inputs_.resize(trace.tokens.size());
  for (size_t i = 0; i < trace.tokens.size(); ++i) {
    const TraceToken& t = trace.tokens[i];
    PredictorInput& in = inputs_[i];
    in.seq = t.seq;
    in.pos = t.pos;
    in.token = t.token;
    const auto& toks = seq_tokens_[where[i].first];
    in.context = std::span<const int32_t>(toks.data(), where[i].second);
  }
}

}  // namespace ef::placement
