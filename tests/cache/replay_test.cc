#include "cache/replay.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "cache/cache_policy.h"

namespace ef::cache {
namespace {

const std::string kMixtral = std::string(EF_TEST_DATA) + "/traces/mixtral8x7b_gsm8k_decode.jsonl";
const std::string kFlame = std::string(EF_TEST_DATA) + "/traces/flame_moe_290m_prefill.jsonl";

placement::RoutingTrace LoadOrSkip(const std::string& path) {
  auto t = placement::ReadRoutingTrace(path);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return std::move(*t);
}

double Rate(const placement::RoutingTrace& t, const std::string& policy, int n) {
  ReplayOptions o;
  o.policy = policy;
  o.slots_per_layer = n;
  auto r = Replay(t, o);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? r->hit_rate : -1;
}

TEST(Replay, MixtralReferenceNumbers) {
  ASSERT_TRUE(std::filesystem::exists(kMixtral)) << kMixtral << " is missing (tests/data/traces)";
  auto t = LoadOrSkip(kMixtral);
  EXPECT_NEAR(Rate(t, "lru", 4), 0.601, 0.0005);
  EXPECT_NEAR(Rate(t, "belady", 4), 0.733, 0.0005);
}

TEST(Replay, CountsAddUpAndBeladyIsBest) {
  for (const std::string& path : {kMixtral, kFlame}) {
    ASSERT_TRUE(std::filesystem::exists(path)) << path << " is missing (tests/data/traces)";
    auto t = LoadOrSkip(path);
    for (int n : {t.top_k(), t.top_k() + 2}) {
      double belady = Rate(t, "belady", n);
      for (const auto& p : CachePolicyNames()) {
        ReplayOptions o;
        o.policy = p;
        o.slots_per_layer = n;
        auto r = Replay(t, o);
        ASSERT_TRUE(r.ok()) << r.status().ToString();
        EXPECT_EQ(r->hits + r->misses, r->accesses);
        EXPECT_EQ(r->accesses, static_cast<int64_t>(t.tokens.size()) * t.num_layers() * t.top_k());
        int64_t a = 0, h = 0;
        for (int l = 0; l < t.num_layers(); ++l) {
          a += r->layer_accesses[l];
          h += r->layer_hits[l];
        }
        EXPECT_EQ(a, r->accesses);
        EXPECT_EQ(h, r->hits);
        // No demand policy beats Belady (expertflow is checked too: its oracle only reorders victims).
        EXPECT_LE(r->hit_rate, belady + 1e-12) << p << " n=" << n << " " << path;
      }
    }
  }
}

placement::RoutingTrace TinyTrace() {
  // 1 layer, 4 experts, top-1, tokens out of (seq, pos) order in the file.
  placement::RoutingTrace t;
  t.header.model = "tiny";
  t.header.num_layers = 1;
  t.header.num_experts = 4;
  t.header.top_k = 1;
  auto tok = [](int64_t seq, int64_t pos, int16_t e) {
    placement::TraceToken k;
    k.seq = seq;
    k.pos = pos;
    k.experts = {e};
    return k;
  };
  t.tokens = {tok(0, 1, 1), tok(0, 0, 0), tok(0, 2, 2), tok(0, 3, 0), tok(0, 4, 1), tok(0, 5, 2)};
  return t;
}

TEST(Replay, SortsBySeqPosAndMatchesHand) {
  auto t = TinyTrace();  // order 0 1 2 0 1 2
  EXPECT_DOUBLE_EQ(Rate(t, "lru", 2), 0.0);
  EXPECT_DOUBLE_EQ(Rate(t, "belady", 2), 2.0 / 6);
  EXPECT_DOUBLE_EQ(Rate(t, "lru", 3), 3.0 / 6);
}

TEST(Replay, BadBudgetsAndPolicy) {
  auto t = TinyTrace();
  ReplayOptions o;
  o.policy = "nope";
  o.slots_per_layer = 2;
  EXPECT_FALSE(Replay(t, o).ok());
  o.policy = "lru";
  o.slots_per_layer = 5;
  EXPECT_FALSE(Replay(t, o).ok());
  o.slots_per_layer = 0;
  EXPECT_FALSE(Replay(t, o).ok());
  o.global_slots = 2;
  EXPECT_TRUE(Replay(t, o).ok());
}

}  // namespace
}  // namespace ef::cache
