#include "cache/cache_policy.h"

#include <gtest/gtest.h>

#include <functional>
#include <random>

#include "cache/expertflow_policy.h"
#include "cache/slot_cache.h"

namespace ef::cache {
namespace {

PolicyConfig Shape(int num_layers, int num_experts) {
  PolicyConfig pc;
  pc.num_layers = num_layers;
  pc.num_experts = num_experts;
  return pc;
}

// One layer, k = 1: runs `seq` through a SlotCache of n slots, returns the hit flags.
std::vector<bool> RunSeq(const std::string& policy, int num_experts, int n, const std::vector<int>& seq,
                         PolicyConfig pc = {}) {
  pc.num_layers = 1;
  pc.num_experts = num_experts;
  if (policy == "belady")
    for (int e : seq) pc.future.push_back({0, e});
  auto p = MakeCachePolicy(policy, pc);
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  SlotCacheOptions o;
  o.num_layers = 1;
  o.num_experts = num_experts;
  o.slots_per_layer = n;
  auto c = SlotCache::Create(o, std::move(*p));
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  std::vector<bool> hits;
  for (size_t t = 0; t < seq.size(); ++t) hits.push_back((*c)->Access({0, seq[t]}, t)->hit);
  return hits;
}

int Count(const std::vector<bool>& v) { return static_cast<int>(std::count(v.begin(), v.end(), true)); }

TEST(CachePolicy, LruEvictsLeastRecentlyUsed) {
  // 0 1 2, then 0 hits (refreshing 0) and 3 evicts 1, the least recently used.
  auto h = RunSeq("lru", 8, 3, {0, 1, 2, 0, 3, 0, 2, 1});
  // After 3: {0,2,3} (1 evicted). 0 hit, 2 hit, 1 miss evicts 3 (least recent of 0@5, 2@6, 3@4).
  EXPECT_EQ(h, (std::vector<bool>{false, false, false, true, false, true, true, false}));
  auto h2 = RunSeq("lru", 8, 3, {0, 1, 2, 0, 3, 0, 2, 1, 3});
  EXPECT_FALSE(h2.back());  // 3 was the LRU victim of the access to 1
}

TEST(CachePolicy, LfuEvictsLeastFrequent) {
  // 0 twice, 1 once, 2 once: 3 evicts 1 (count 1 like 2, but older); then 0 and 2 hit.
  auto h = RunSeq("lfu", 8, 3, {0, 0, 1, 2, 3, 0, 2});
  EXPECT_EQ(h, (std::vector<bool>{false, true, false, false, false, true, true}));
}

TEST(CachePolicy, BeladyHandComputed) {
  // n = 2, 0 1 2 0 1 2: at 2 evict 1 (next use 4 > 3); 0 hits; at 1 evict 0 (never again); 2 hits.
  EXPECT_EQ(RunSeq("belady", 4, 2, {0, 1, 2, 0, 1, 2}), (std::vector<bool>{false, false, false, true, false, true}));
  EXPECT_EQ(Count(RunSeq("lru", 4, 2, {0, 1, 2, 0, 1, 2})), 0);
}

// Best achievable hits by exhaustive search over eviction choices (k = 1, no pins).
int OptimalHits(const std::vector<int>& seq, int n, size_t t, std::vector<int> cache) {
  if (t == seq.size()) return 0;
  if (std::find(cache.begin(), cache.end(), seq[t]) != cache.end()) return 1 + OptimalHits(seq, n, t + 1, cache);
  if (static_cast<int>(cache.size()) < n) {
    cache.push_back(seq[t]);
    return OptimalHits(seq, n, t + 1, cache);
  }
  int best = 0;
  for (size_t v = 0; v < cache.size(); ++v) {
    auto c = cache;
    c[v] = seq[t];
    best = std::max(best, OptimalHits(seq, n, t + 1, c));
  }
  return best;
}

TEST(CachePolicy, BeladyIsOptimalOnRandomSequences) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 40; ++trial) {
    const int e = 5, n = 2 + trial % 2;
    std::vector<int> seq(12);
    for (int& x : seq) x = static_cast<int>(rng() % e);
    EXPECT_EQ(Count(RunSeq("belady", e, n, seq)), OptimalHits(seq, n, 0, {})) << "trial " << trial;
    EXPECT_GE(Count(RunSeq("belady", e, n, seq)), Count(RunSeq("lru", e, n, seq)));
  }
}

TEST(CachePolicy, StaticKeepsMostFrequent) {
  PolicyConfig pc;
  pc.counts = {100, 1, 1, 1, 50, 1, 1, 1};  // 0 and 4 are hot
  // n = 2: 0, 4 resident; each cold expert evicts the colder of the pair or the previous cold one.
  auto h = RunSeq("static", 8, 2, {0, 4, 1, 0, 2, 0, 3, 0}, pc);
  // 1 evicts 4 (count 50 < 100); 0 hit; 2 evicts 1; 0 hit; 3 evicts 2; 0 hit.
  EXPECT_EQ(h, (std::vector<bool>{false, false, false, true, false, true, false, true}));
  PolicyConfig bad;
  bad.num_layers = 1;
  bad.num_experts = 8;
  EXPECT_FALSE(MakeCachePolicy("static", bad).ok());
}

TEST(CachePolicy, UnknownNameListsValidNames) {
  PolicyConfig pc;
  pc.num_layers = 1;
  pc.num_experts = 4;
  auto p = MakeCachePolicy("fifo", pc);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  for (const char* n : {"fifo", "lru", "lfu", "belady", "static", "expertflow"})
    EXPECT_NE(p.status().message().find(n), std::string::npos) << p.status().message();
  pc.num_layers = 1;
  EXPECT_FALSE(MakeCachePolicy("belady", pc).ok());  // no future
}

TEST(CachePolicy, ExpertflowKeepsForecastNeedsAndPins) {
  PolicyConfig pc;
  pc.num_layers = 2;
  pc.num_experts = 4;
  auto p = MakeCachePolicy("expertflow", pc);
  ASSERT_TRUE(p.ok());
  SlotCacheOptions o;
  o.num_layers = 2;
  o.num_experts = 4;
  o.slots_per_layer = 2;
  auto c = std::move(*SlotCache::Create(o, std::move(*p)));
  // Layer 1 holds 0 (least recent) and 1.
  ASSERT_TRUE(c->Access({1, 0}, 0).ok());
  ASSERT_TRUE(c->Access({1, 1}, 1).ok());
  // The forecast: the next token needs expert 0 at layer 1; expert 1 is not needed.
  placement::RoutingForecast f(2, 2, 4);
  f.row(1, 1)[0] = 1.f;
  c->policy().SetForecast(f);
  c->policy().SetCurrentLayer(1);
  auto r = c->Access({1, 2}, 2);
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->evicted.has_value());
  EXPECT_EQ(r->evicted->expert, 1);  // LRU would have evicted 0
  // Pinned 0 is never evicted even though 2 is needed sooner by the plan.
  f = placement::RoutingForecast(1, 2, 4);
  f.row(0, 1)[2] = 1.f;
  c->policy().SetForecast(f);
  ASSERT_TRUE(c->Pin({1, 0}));
  r = c->Access({1, 3}, 3);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->evicted->expert, 2);
  // Everything pinned: a clear ResourceExhausted.
  ASSERT_TRUE(c->Pin({1, 3}));
  auto full = c->Access({1, 1}, 4);
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(full.status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(c->IsResident({1, 0}) && c->IsResident({1, 3}));
}

TEST(CachePolicy, ExpertflowPrefersNotNeededOverPlanNeeded) {
  ExpertflowPolicy p(Shape(4, 4));
  placement::RoutingForecast f(1, 4, 4);
  f.row(0, 3)[1] = 1.f;  // the running token needs expert 1 at layer 3
  p.SetForecast(f);
  p.SetCurrentLayer(1);
  EXPECT_EQ(p.NeedDistance({3, 1}), 2);
  EXPECT_EQ(p.NeedDistance({3, 2}), ExpertflowPolicy::kNotNeeded);
  p.OnInsert({3, 2}, 10, true);  // more recent than {3,1}
  p.OnInsert({3, 1}, 1, true);
  std::vector<ExpertKey> cands = {{3, 1}, {3, 2}};
  EXPECT_EQ(p.ChooseVictim(cands, 11)->expert, 2);
}

TEST(CachePolicy, ExpertflowBreaksTiesByUseCountThenRecency) {
  // No forecast: every candidate is equally (not) needed, so the one used least goes first (as
  // lfu), and among equally used ones the least recent (as lru).
  ExpertflowPolicy p(Shape(1, 4));
  p.OnInsert({0, 0}, 1, true);
  p.OnInsert({0, 1}, 2, true);
  p.OnHit({0, 0}, 3);
  p.OnHit({0, 0}, 4);
  p.OnInsert({0, 2}, 5, true);
  p.OnHit({0, 2}, 6);  // counts: 0 -> 3, 1 -> 1, 2 -> 2; 1 is also the least recent but one
  std::vector<ExpertKey> cands = {{0, 0}, {0, 1}, {0, 2}};
  EXPECT_EQ(p.ChooseVictim(cands, 7)->expert, 1);
  p.OnHit({0, 1}, 8);  // 1 -> 2 uses, more recent than 2 (2 uses): 2 goes
  EXPECT_EQ(p.ChooseVictim(cands, 9)->expert, 2);
  // A prefetch (not a demand access) does not count as a use.
  p.OnInsert({0, 3}, 10, false);
  cands = {{0, 1}, {0, 3}};
  EXPECT_EQ(p.ChooseVictim(cands, 11)->expert, 3);
  // A forecast need still outranks use counts: 3 is needed by the next token, 1 is not.
  placement::RoutingForecast f(2, 1, 4);
  f.row(1, 0)[3] = 1.f;
  p.SetForecast(f);
  p.SetCurrentLayer(0);
  EXPECT_EQ(p.ChooseVictim(cands, 12)->expert, 1);
}

TEST(SlotCache, BudgetErrorsNameNumbers) {
  const PolicyConfig pc = Shape(2, 8);
  SlotCacheOptions o;
  o.num_layers = 2;
  o.num_experts = 8;
  o.top_k = 2;
  o.slots_per_layer = 1;
  auto c = SlotCache::Create(o, std::move(*MakeCachePolicy("lru", pc)));
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("1 slots per layer"), std::string::npos) << c.status().message();
  EXPECT_NE(c.status().message().find("top_k = 2"), std::string::npos);
  o.slots_per_layer = 0;
  o.global_slots = 1;
  c = SlotCache::Create(o, std::move(*MakeCachePolicy("lru", pc)));
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("top_k = 2"), std::string::npos);
}

TEST(SlotCache, GlobalBudgetAndQuotas) {
  const PolicyConfig pc = Shape(2, 4);
  SlotCacheOptions o;
  o.num_layers = 2;
  o.num_experts = 4;
  o.top_k = 1;
  o.global_slots = 3;
  auto c = std::move(*SlotCache::Create(o, std::move(*MakeCachePolicy("lru", pc))));
  EXPECT_EQ(c->num_slots(), 3);
  ASSERT_TRUE(c->Access({0, 0}, 0).ok());
  ASSERT_TRUE(c->Access({1, 0}, 1).ok());
  ASSERT_TRUE(c->Access({1, 1}, 2).ok());
  auto r = c->Access({1, 2}, 3);  // shared budget: evicts layer 0's expert
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r->evicted, (ExpertKey{0, 0}));

  SlotCacheOptions q{.num_layers = 2, .num_experts = 4, .top_k = 1, .layer_quotas = {1, 2}};
  auto d = std::move(*SlotCache::Create(q, std::move(*MakeCachePolicy("lru", pc))));
  EXPECT_EQ(d->num_slots(), 3);
  ASSERT_TRUE(d->Access({0, 0}, 0).ok());
  ASSERT_TRUE(d->Access({1, 0}, 1).ok());
  ASSERT_TRUE(d->Access({1, 1}, 2).ok());
  r = d->Access({1, 2}, 3);  // quota: layer 1 evicts its own
  EXPECT_EQ(*r->evicted, (ExpertKey{1, 0}));
  EXPECT_TRUE(d->IsResident({0, 0}));
}

}  // namespace
}  // namespace ef::cache
