// Fuzzes ParseRoutingTrace (placement/routing_trace.cc): moe-routing-trace v1 JSON Lines. An
// accepted trace must hold, for every token, num_layers x top_k expert ids in range.
#include <cstddef>
#include <cstdint>
#include <string>

#include "placement/routing_trace.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  auto trace = ef::placement::ParseRoutingTrace(text, "fuzz.jsonl");
  if (!trace.ok()) return 0;
  const auto& h = trace->header;
  EF_FUZZ_CHECK(h.num_layers > 0 && h.num_experts > 0 && h.top_k > 0 && h.top_k <= h.num_experts);
  EF_FUZZ_CHECK(!trace->tokens.empty());
  const size_t per_token = static_cast<size_t>(h.num_layers) * h.top_k;
  for (const auto& t : trace->tokens) {
    EF_FUZZ_CHECK(t.experts.size() == per_token);
    EF_FUZZ_CHECK(t.weights.empty() || t.weights.size() == per_token);
    for (int16_t e : t.experts) EF_FUZZ_CHECK(e >= 0 && e < h.num_experts);
  }
  EF_FUZZ_CHECK(ef::placement::CheckTraceShape(*trace, h.num_layers, h.num_experts, h.top_k).ok());
  trace->SortBySeqPos();
  EF_FUZZ_CHECK(!trace->SequenceIds().empty());
  return 0;
}
