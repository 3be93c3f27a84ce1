// TraceRoutingOverride: stream keying replays the trace in order; sequence keying gives each
// (sequence, position) the same routing however the rows are batched.
#include "placement/trace_routing_override.h"

#include <gtest/gtest.h>

#include <map>
#include <utility>

namespace ef::placement {
namespace {

// 2 MoE layers x 8 experts, top-1; token i routes to expert i % 8 at layer 0, (i + 3) % 8 at layer 1.
RoutingTrace MakeTrace(int n) {
  RoutingTrace t;
  t.header.num_layers = 2;
  t.header.num_experts = 8;
  t.header.top_k = 1;
  for (int i = 0; i < n; ++i) {
    TraceToken tok;
    tok.seq = i / 10;
    tok.pos = i % 10;
    tok.experts = {static_cast<int16_t>(i % 8), static_cast<int16_t>((i + 3) % 8)};
    t.tokens.push_back(tok);
  }
  return t;
}

runtime::ModelConfig MakeConfig() {
  runtime::ModelConfig c;
  c.num_layers = 2;
  c.num_experts = 8;
  c.top_k = 1;
  return c;
}

// Runs the hook on one layer for rows (seq, pos); returns the chosen experts.
std::vector<int32_t> Route(runtime::RoutingHook& hook, int moe_layer, const std::vector<int64_t>& seq,
                           const std::vector<int32_t>& pos) {
  const int n = static_cast<int>(seq.size());
  std::vector<int32_t> ids(n, -1), tok(n, 0);
  std::vector<float> w(n, 0.f);
  runtime::LayerRouting r{moe_layer, runtime::MoeLayer(moe_layer), n, 1, ids, w, seq, pos, tok, {}};
  EXPECT_TRUE(hook(r).ok());
  for (float x : w) EXPECT_FLOAT_EQ(x, 1.0f);
  return ids;
}

TEST(TraceRoutingOverrideTest, StreamKeyingConsumesTheTraceInOrder) {
  auto ov = TraceRoutingOverride::Create(MakeTrace(40), MakeConfig());
  ASSERT_TRUE(ov.ok()) << ov.status().ToString();
  auto hook = (*ov)->Hook();
  EXPECT_EQ(Route(hook, 0, {7, 7, 9}, {0, 1, 0}), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(Route(hook, 1, {7, 7, 9}, {0, 1, 0}), (std::vector<int32_t>{3, 4, 5}));
  // The next forward continues where this one ended, whatever its sequences.
  EXPECT_EQ(Route(hook, 0, {1}, {0}), (std::vector<int32_t>{3}));
}

TEST(TraceRoutingOverrideTest, SequenceKeyingDependsOnlyOnSequenceAndPosition) {
  const int n = 40;
  auto a = TraceRoutingOverride::Create(MakeTrace(n), MakeConfig(), TraceKeying::kSequence);
  auto b = TraceRoutingOverride::Create(MakeTrace(n), MakeConfig(), TraceKeying::kSequence);
  ASSERT_TRUE(a.ok() && b.ok());
  auto ha = (*a)->Hook(), hb = (*b)->Hook();
  // Engine A runs sequences 5 and 6 together (prefill of 3 tokens each); engine B runs them one
  // after the other, 6 first, one token at a time.
  const auto together = Route(ha, 1, {5, 5, 5, 6, 6, 6}, {0, 1, 2, 0, 1, 2});
  std::map<std::pair<int64_t, int32_t>, int32_t> apart;
  for (int64_t s : {6, 5})
    for (int32_t p = 0; p < 3; ++p) apart[std::make_pair(s, p)] = Route(hb, 1, {s}, {p})[0];
  const std::vector<std::pair<int64_t, int32_t>> rows = {{5, 0}, {5, 1}, {5, 2}, {6, 0}, {6, 1}, {6, 2}};
  for (size_t i = 0; i < rows.size(); ++i) {
    const int32_t got = apart[rows[i]];
    EXPECT_EQ(together[i], got) << "row " << i;
  }
  // Each sequence reads a contiguous stretch of the trace from its own start.
  for (int64_t s : {5, 6}) {
    const size_t start = (*a)->SequenceStart(s);
    EXPECT_LT(start, static_cast<size_t>(n));
    for (int32_t p = 0; p < 3; ++p) {
      const int32_t got = apart[{s, p}];
      EXPECT_EQ(got, static_cast<int32_t>(((start + p) % n + 3) % 8));
    }
  }
  EXPECT_NE((*a)->SequenceStart(5), (*a)->SequenceStart(6));
}

TEST(TraceRoutingOverrideTest, RejectsATraceOfAnotherShape) {
  runtime::ModelConfig c = MakeConfig();
  c.num_experts = 16;
  auto ov = TraceRoutingOverride::Create(MakeTrace(10), c, TraceKeying::kSequence);
  ASSERT_FALSE(ov.ok());
  EXPECT_NE(ov.status().message().find("16"), std::string::npos) << ov.status().message();
}

}  // namespace
}  // namespace ef::placement
