// ExpertTiers: a miss reads the nearest tier that keeps the expert (host copy, then a peer, then
// the checkpoint), the bytes are the checkpoint's packed gate | up | down whichever tier served
// them, the counters add up per tier, and a peer error other than NotFound reaches the caller.
#include "cache/expert_tiers.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "cache/cached_expert_source.h"
#include "runtime/engine/engine.h"
#include "tests/cache/tiny_engine.h"
#include "tests/runtime/prompt_run.h"

namespace ef::cache {
namespace {

using testing::TinyEngine;

std::vector<std::byte> Packed(const runtime::ModelWeights& m, int l, int e) {
  const runtime::ExpertWeights& w = m.host_expert(l, e);
  std::vector<std::byte> b(w.nbytes());
  size_t off = 0;
  for (const runtime::Weight* p : {&w.gate, &w.up, &w.down}) {
    std::memcpy(b.data() + off, p->data, p->nbytes());
    off += p->nbytes();
  }
  return b;
}

TEST(ExpertTiers, NearestTierServesEachExpertWithTheSameBytes) {
  auto engine = TinyEngine();
  const runtime::ModelWeights& m = engine->weights();
  const int E = engine->config().num_experts;
  // Host copies of even experts; a peer keeps experts 1 and 5; the rest only the checkpoint.
  std::vector<std::vector<std::byte>> host(E);
  for (int e = 0; e < E; e += 2) host[e] = Packed(m, 0, e);
  TierHooks h;
  h.host = [&](int l, int e) -> const std::byte* { return l == 0 && !host[e].empty() ? host[e].data() : nullptr; };
  int peer_calls = 0;
  h.peer = [&](int l, int e, std::span<std::byte> dst) -> Status {
    ++peer_calls;
    if (e != 1 && e != 5) return NotFound("no peer");
    const std::vector<std::byte> b = Packed(m, l, e);
    if (dst.size() != b.size()) return Internal("size");
    std::memcpy(dst.data(), b.data(), b.size());
    return Status::Ok();
  };
  ExpertTiers tiers(&m, h);
  const size_t n = m.host_expert(0, 0).nbytes();
  for (int e = 0; e < E; ++e) {
    std::vector<std::byte> dst(n + 64, std::byte{0x5a});
    ASSERT_TRUE(tiers.FillPacked(0, e, dst).ok()) << e;
    const std::vector<std::byte> want = Packed(m, 0, e);
    EXPECT_EQ(0, std::memcmp(dst.data(), want.data(), n)) << "expert " << e;
  }
  const TierCounters c = tiers.counters();
  EXPECT_EQ(c.loads[static_cast<int>(Tier::kHost)], E / 2);
  EXPECT_EQ(c.loads[static_cast<int>(Tier::kPeer)], 2);
  EXPECT_EQ(c.loads[static_cast<int>(Tier::kCheckpoint)], E / 2 - 2);
  EXPECT_EQ(c.bytes[static_cast<int>(Tier::kPeer)], static_cast<int64_t>(2 * n));
  EXPECT_EQ(peer_calls, E / 2);  // only experts without a host copy ask a peer
}

TEST(ExpertTiers, PeerFailureIsReturnedNotHidden) {
  auto engine = TinyEngine();
  TierHooks h;
  h.host = [](int, int) -> const std::byte* { return nullptr; };
  h.peer = [](int, int, std::span<std::byte>) { return DeadlineExceeded("rank 1 did not answer within 30 s"); };
  ExpertTiers tiers(&engine->weights(), h);
  std::vector<std::byte> dst(engine->weights().host_expert(0, 0).nbytes());
  const Status s = tiers.FillPacked(0, 3, dst);
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(s.ToString().find("rank 1"), std::string::npos) << s.ToString();
  EXPECT_EQ(tiers.counters().loads[static_cast<int>(Tier::kCheckpoint)], 0);
}

// A cache whose misses come from the three tiers computes what the resident engine computes.
TEST(ExpertTiers, CachedEngineOverTiersMatchesResident) {
  auto engine = TinyEngine();
  const auto want = ef::testing::RunPrompt(*engine, {11, 42, 7, 99, 3}, 6);
  const runtime::ModelWeights& m = engine->weights();
  const int E = engine->config().num_experts;
  std::vector<std::vector<std::byte>> host(static_cast<size_t>(engine->config().num_layers) * E);
  TierHooks h;
  h.host = [&](int l, int e) -> const std::byte* {
    if (e % 3 != 0) return nullptr;
    auto& b = host[static_cast<size_t>(l) * E + e];
    if (b.empty()) b = Packed(m, l, e);
    return b.data();
  };
  h.peer = [&](int l, int e, std::span<std::byte> dst) -> Status {
    if (e % 3 != 1) return NotFound("no peer");
    const auto b = Packed(m, l, e);
    std::memcpy(dst.data(), b.data(), b.size());
    return Status::Ok();
  };
  ExpertTiers tiers(&m, h);
  CachedExpertSourceOptions o;
  o.slots_per_layer = engine->config().top_k;
  o.policy = "lru";
  o.tiers = &tiers;
  auto src = CachedExpertSource::Create(m, &engine->backend(), o);
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  engine->SetExpertSource(src->get());
  const auto got = ef::testing::RunPrompt(*engine, {11, 42, 7, 99, 3}, 6);
  engine->SetExpertSource(nullptr);
  EXPECT_EQ(got.tokens, want.tokens);
  ASSERT_EQ(got.logits.size(), want.logits.size());
  for (size_t i = 0; i < want.logits.size(); ++i) ASSERT_EQ(got.logits[i], want.logits[i]) << i;
  const TierCounters c = tiers.counters();
  const ExpertStoreStats st = (*src)->stats();
  EXPECT_EQ(c.loads[0] + c.loads[1] + c.loads[2], st.total.misses);
  EXPECT_GT(c.loads[0], 0);
  EXPECT_GT(c.loads[1], 0);
  EXPECT_GT(c.loads[2], 0);
}

}  // namespace
}  // namespace ef::cache
