// Routing traces in the moe-routing-trace v1 format (JSON Lines; see docs/traces.md):
// line 1 is a header object, every further line one token's experts at every layer.
//
// ReadRoutingTrace validates as it reads: a malformed line is an error naming the file and the
// line number, and nothing partial is returned. Tokens keep file order; SortBySeqPos() gives the
// (seq, pos) order the cache-simulation convention uses.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/core/status.h"

namespace ef::placement {

struct TraceHeader {
  std::string model;
  int num_layers = 0;
  int num_experts = 0;
  int top_k = 0;
  std::string phase;    // "prefill", "decode", "mixed", ...
  std::string dataset;  // free text
  std::string source;   // free text
};

struct TraceToken {
  int64_t seq = 0;
  int64_t pos = 0;
  int64_t token = -1;  // -1 where the source did not record it (null)
  // experts[l * top_k + j]: the j-th expert of layer l, in the router's order.
  std::vector<int16_t> experts;
  // weights[l * top_k + j]; empty when the trace has no weights.
  std::vector<float> weights;
};

struct RoutingTrace {
  TraceHeader header;
  std::vector<TraceToken> tokens;

  int num_layers() const { return header.num_layers; }
  int num_experts() const { return header.num_experts; }
  int top_k() const { return header.top_k; }
  int expert(size_t token, int layer, int j) const {
    return tokens[token].experts[static_cast<size_t>(layer) * header.top_k + j];
  }
  // Stable sort by (seq, pos).
  void SortBySeqPos();
  // Distinct sequence ids in increasing order.
  std::vector<int64_t> SequenceIds() const;
  // The tokens whose seq satisfies keep(seq), header unchanged.
  template <typename Pred>
  RoutingTrace Filter(Pred keep) const {
    RoutingTrace out;
    out.header = header;
    for (const auto& t : tokens)
      if (keep(t.seq)) out.tokens.push_back(t);
    return out;
  }
};

StatusOr<RoutingTrace> ReadRoutingTrace(const std::string& path);
// The same on JSONL text held in memory; `origin` names it in errors.
StatusOr<RoutingTrace> ParseRoutingTrace(const std::string& text, const std::string& origin);
Status WriteRoutingTrace(const RoutingTrace& trace, const std::string& path);

// Checks that the trace's shape matches a model's (layers, experts, top-k), naming what differs.
Status CheckTraceShape(const RoutingTrace& trace, int num_layers, int num_experts, int top_k);

}  // namespace ef::placement
