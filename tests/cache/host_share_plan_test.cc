// PlanHostShare: how a layer's misses are shared between the copy engine and the host CPU
// (cache.cpu_compute), with the copy and host times of a bf16 Mixtral expert on the H200 host
// (6.3 and 3.3 ms at one row) and made-up ones.
#include "cache/host_share_plan.h"

#include <gtest/gtest.h>

#include <vector>

#include "cache/expert_store.h"

namespace ef::cache {
namespace {

constexpr double kCopy = 6.3, kHost = 3.3;

MissCost Miss(int32_t e, double copy = kCopy, double host = kHost, bool eligible = true) {
  MissCost m;
  m.expert = e;
  m.copy_ms = copy;
  m.host_ms = host;
  m.eligible = eligible;
  return m;
}

TEST(HostSharePlan, OneMissIsSplitSoBothPathsEndTogether) {
  const std::vector<MissCost> m = {Miss(5)};
  const HostSharePlan p = PlanHostShare(m, {});
  EXPECT_TRUE(p.copy.empty());
  EXPECT_TRUE(p.host.empty());
  EXPECT_EQ(p.split_expert, 5);
  EXPECT_NEAR(p.split_fraction, kHost / (kCopy + kHost), 1e-12);
  EXPECT_NEAR(p.copy_done_ms, kCopy * kHost / (kCopy + kHost), 1e-9);
  EXPECT_NEAR(p.host_done_ms, p.copy_done_ms, 1e-9);
}

TEST(HostSharePlan, WithoutSplittingAMissGoesWholeToTheFasterPath) {
  HostShareOptions o;
  o.split = false;
  const std::vector<MissCost> m = {Miss(5), Miss(2)};
  const HostSharePlan p = PlanHostShare(m, o);
  EXPECT_EQ(p.host, std::vector<int32_t>({5}));  // 3.3 < 6.3
  EXPECT_EQ(p.copy, std::vector<int32_t>({2}));  // 6.3 < 3.3 + 3.3
  EXPECT_EQ(p.split_expert, -1);
  EXPECT_DOUBLE_EQ(p.copy_done_ms, kCopy);
  EXPECT_DOUBLE_EQ(p.host_done_ms, kHost);
}

TEST(HostSharePlan, TheLaterPathGivesUpItsLastExpertUpToTheStagingShare) {
  const std::vector<MissCost> m = {Miss(5), Miss(2)};
  HostShareOptions o;  // max_fraction 0.5: the balance point 0.6875 is past it
  HostSharePlan p = PlanHostShare(m, o);
  EXPECT_EQ(p.host, std::vector<int32_t>({5}));
  EXPECT_TRUE(p.copy.empty());
  EXPECT_EQ(p.split_expert, 2);
  EXPECT_DOUBLE_EQ(p.split_fraction, 0.5);
  EXPECT_NEAR(p.copy_done_ms, 0.5 * kCopy, 1e-9);
  EXPECT_NEAR(p.host_done_ms, kHost + 0.5 * kHost, 1e-9);
  o.max_fraction = 0.9;
  p = PlanHostShare(m, o);
  EXPECT_NEAR(p.split_fraction, 2 * kHost / (kCopy + kHost), 1e-12);
  EXPECT_NEAR(p.copy_done_ms, p.host_done_ms, 1e-9);
  EXPECT_LT(p.copy_done_ms, kCopy);
}

TEST(HostSharePlan, IneligibleMissesAreCopiedAndNeverSplit) {
  const std::vector<MissCost> m = {Miss(1, kCopy, kHost, false), Miss(3, kCopy, kHost, false)};
  const HostSharePlan p = PlanHostShare(m, {});
  EXPECT_EQ(p.copy, std::vector<int32_t>({1, 3}));
  EXPECT_TRUE(p.host.empty());
  EXPECT_EQ(p.split_expert, -1);
  EXPECT_DOUBLE_EQ(p.copy_done_ms, 2 * kCopy);
}

TEST(HostSharePlan, AnIneligibleLastCopyLeavesTheEligibleOneToSplit) {
  // Host 10 ms (many rows): both go to the copy engine; the eligible one is split off it.
  const std::vector<MissCost> m = {Miss(4, kCopy, 10.0), Miss(6, kCopy, 10.0, false)};
  const HostSharePlan p = PlanHostShare(m, {});
  EXPECT_EQ(p.copy, std::vector<int32_t>({6}));
  EXPECT_EQ(p.split_expert, 4);
  EXPECT_NEAR(p.copy_done_ms, kCopy + p.split_fraction * kCopy, 1e-9);
  EXPECT_NEAR(p.host_done_ms, (1 - p.split_fraction) * 10.0, 1e-9);
  EXPECT_NEAR(p.copy_done_ms, p.host_done_ms, 1e-9);
}

TEST(HostSharePlan, NoSplitWhenItGainsTooLittle) {
  // A host 50x faster than the copy: the split would copy 2% of the expert for a 2% gain.
  HostShareOptions o;
  o.min_gain = 0.05;
  const std::vector<MissCost> m = {Miss(0, 6.3, 0.126)};
  const HostSharePlan p = PlanHostShare(m, o);
  EXPECT_EQ(p.split_expert, -1);
  EXPECT_EQ(p.host, std::vector<int32_t>({0}));
}

TEST(HostSharePlan, AllOnHostAndForcedSplitIgnoreTheTimes) {
  const std::vector<MissCost> m = {Miss(0, 1, 100), Miss(1, 1, 100, false), Miss(2, 1, 100), Miss(3, 1, 100)};
  HostShareOptions on;
  on.all_on_host = true;
  HostSharePlan p = PlanHostShare(m, on);
  EXPECT_EQ(p.host, std::vector<int32_t>({0, 2, 3}));
  EXPECT_EQ(p.copy, std::vector<int32_t>({1}));
  EXPECT_EQ(p.split_expert, -1);
  HostShareOptions split;
  split.force_fraction = 0.5;
  p = PlanHostShare(m, split);
  EXPECT_EQ(p.split_expert, 0);
  EXPECT_DOUBLE_EQ(p.split_fraction, 0.5);
  EXPECT_EQ(p.host, std::vector<int32_t>({2, 3}));
  EXPECT_EQ(p.copy, std::vector<int32_t>({1}));
}

TEST(HostSharePlan, ASlowerPartialCopyMovesTheBalanceTowardsTheHost) {
  std::vector<MissCost> m = {Miss(5)};
  m[0].part_copy_ms = 2 * kCopy;  // pitched copies at half the rate
  const HostSharePlan p = PlanHostShare(m, {});
  EXPECT_EQ(p.split_expert, 5);
  EXPECT_NEAR(p.split_fraction, kHost / (2 * kCopy + kHost), 1e-12);
  EXPECT_NEAR(p.copy_done_ms, p.split_fraction * 2 * kCopy, 1e-9);
  EXPECT_NEAR(p.host_done_ms, p.copy_done_ms, 1e-9);
}

TEST(HostSharePlan, NoMissesNoWork) {
  const HostSharePlan p = PlanHostShare({}, {});
  EXPECT_TRUE(p.copy.empty() && p.host.empty());
  EXPECT_EQ(p.split_expert, -1);
  EXPECT_EQ(p.copy_done_ms, 0);
}

// MissAdmission: a miss enters the slots when its layer used it at least `margin` times more than
// the least used expert it may replace; one use per expert and step, layers apart.
TEST(MissAdmission, AMissUsedMarginMoreThanTheLeastUsedResidentReplacesIt) {
  MissAdmission a(2, 8, 2);
  const std::vector<int32_t> resident = {0, 1, 2};
  for (int step = 0; step < 3; ++step) a.Note(0, std::vector<int32_t>{0, 5});
  a.Note(0, std::vector<int32_t>{1, 1, 5});  // a repeated id counts once
  EXPECT_EQ(a.uses(0, 5), 4);
  EXPECT_EQ(a.uses(0, 1), 1);
  EXPECT_EQ(a.uses(0, 2), 0);
  EXPECT_EQ(a.uses(1, 5), 0);
  // 5 (4 uses) against 2 (0): admitted in 2's place; 6 (0 uses) never.
  EXPECT_EQ(a.Victim(0, 5, resident, false), 2);
  EXPECT_EQ(a.Victim(0, 6, resident, false), -1);
  // Without 2 among the evictable, the least used is 1 (1 use): 4 >= 1 + 2.
  EXPECT_EQ(a.Victim(0, 5, std::vector<int32_t>{0, 1}, false), 1);
  // Against 0 (3 uses) the margin is not met.
  EXPECT_EQ(a.Victim(0, 5, std::vector<int32_t>{0}, false), -1);
  EXPECT_EQ(a.Victim(0, 5, std::vector<int32_t>{}, false), -1);
  // A free slot takes any miss, evicting nothing.
  EXPECT_EQ(a.Victim(0, 6, resident, true), 6);
  // Layer 1 saw none of it.
  EXPECT_EQ(a.Victim(1, 5, resident, false), -1);
  // Out of range.
  EXPECT_EQ(a.Victim(2, 5, resident, false), -1);
  EXPECT_EQ(a.Victim(0, 8, resident, false), -1);
  a.Note(5, std::vector<int32_t>{1});
  a.Note(0, std::vector<int32_t>{-1, 9});
  EXPECT_EQ(a.uses(0, 1), 1);
}

TEST(MissAdmission, MarginOneAdmitsOnAnyLead) {
  MissAdmission a(1, 4, 1);
  a.Note(0, std::vector<int32_t>{3});
  EXPECT_EQ(a.Victim(0, 3, std::vector<int32_t>{0, 1}, false), 0);  // ties: the first listed
  a.Note(0, std::vector<int32_t>{0});
  EXPECT_EQ(a.Victim(0, 3, std::vector<int32_t>{0}, false), -1);  // 1 against 1
}

// AdmitMiss over a real store (host slots): the admitted miss's Acquire takes the slot of the
// victim the rule chose (not the LRU policy's), misses the host could not take are no candidates,
// a held victim gives way to the next least used, and a layer with a free slot evicts nothing.
TEST(MissAdmission, AdmitMissEvictsTheRulesVictimFromAStore) {
  ExpertStoreOptions o;
  o.num_layers = 2;
  o.num_experts = 6;
  o.top_k = 1;
  o.slot_bytes = 64;
  o.slots_per_layer = 2;
  o.policy = "lru";
  auto fill = [](int, int, std::span<std::byte> dst) -> Status {
    for (auto& b : dst) b = std::byte{1};
    return Status::Ok();
  };
  auto store = std::move(*ExpertStore::Create(o, fill));
  auto use = [&](int l, int e) { store->Release(*store->Acquire(l, e)); };
  MissAdmission a(2, 6, 2);
  const auto all = [](int, int) { return true; };
  const std::vector<int64_t> one = {1};
  // Layer 0 holds 0 (used twice, the older) and 1 (once, the most recent): LRU would evict 0.
  for (int e : {0, 0, 1}) {
    const std::vector<int32_t> step = {e};
    EXPECT_EQ(AdmitMiss(a, 0, step, one, 4, all, *store).evicted, false);
    use(0, e);
  }
  const std::vector<int32_t> four = {4};
  EXPECT_EQ(AdmitMiss(a, 0, four, one, 4, all, *store).expert, -1);   // 4: 1 use against 1's 1
  EXPECT_EQ(AdmitMiss(a, 0, four, one, 4, all, *store).expert, -1);   // 2 against 1
  const AdmittedMiss m = AdmitMiss(a, 0, four, one, 4, all, *store);  // 3 against 1: 1 goes
  EXPECT_EQ(m.expert, 4);
  EXPECT_TRUE(m.evicted);
  EXPECT_FALSE(store->IsResident(0, 1));
  use(0, 4);
  EXPECT_TRUE(store->IsResident(0, 0));  // the policy's victim stayed
  EXPECT_TRUE(store->IsResident(0, 4));
  // 5, as popular, but of more rows than the host takes, or without a host copy: no candidate.
  const std::vector<int32_t> five = {5};
  for (int i = 0; i < 5; ++i) AdmitMiss(a, 0, five, std::vector<int64_t>{8}, 4, all, *store);
  EXPECT_EQ(AdmitMiss(a, 0, five, std::vector<int64_t>{8}, 4, all, *store).expert, -1);
  EXPECT_EQ(AdmitMiss(
                a, 0, five, one, 4, [](int, int) { return false; }, *store)
                .expert,
            -1);
  // With 0 (the least used resident: 2 uses against 4's 3) held, the victim is 4.
  auto held = store->Acquire(0, 0);
  ASSERT_TRUE(held.ok());
  const AdmittedMiss n = AdmitMiss(a, 0, five, one, 4, all, *store);
  EXPECT_EQ(n.expert, 5);
  EXPECT_TRUE(n.evicted);
  EXPECT_FALSE(store->IsResident(0, 4));
  EXPECT_TRUE(store->IsResident(0, 0));
  store->Release(*held);
  // Layer 1 has free slots: any miss takes one, nothing evicted.
  const AdmittedMiss f = AdmitMiss(a, 1, four, one, 4, all, *store);
  EXPECT_EQ(f.expert, 4);
  EXPECT_FALSE(f.evicted);
}

}  // namespace
}  // namespace ef::cache
