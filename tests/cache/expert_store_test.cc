#include "cache/expert_store.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include "cache/backend_slot_arena.h"
#include "runtime/backend/backend.h"

namespace ef::cache {
namespace {

constexpr int kLayers = 3;
constexpr int kExperts = 6;
constexpr size_t kBytes = 1000;  // not a multiple of the slot alignment

std::byte Pattern(int layer, int expert, size_t i) {
  return static_cast<std::byte>((layer * 131 + expert * 17 + i * 7) & 0xff);
}

Status FillExpert(int layer, int expert, std::span<std::byte> dst) {
  for (size_t i = 0; i < dst.size(); ++i) dst[i] = Pattern(layer, expert, i);
  return Status::Ok();
}

bool Matches(const SlotRef& ref) {
  if (ref.bytes.size() != kBytes) return false;
  for (size_t i = 0; i < kBytes; ++i)
    if (ref.bytes[i] != Pattern(ref.layer, ref.expert, i)) return false;
  return true;
}

ExpertStoreOptions Options(int slots, const std::string& policy = "lru", int top_k = 1) {
  ExpertStoreOptions o;
  o.num_layers = kLayers;
  o.num_experts = kExperts;
  o.top_k = top_k;
  o.slot_bytes = kBytes;
  o.slots_per_layer = slots;
  o.policy = policy;
  return o;
}

// Acquires and releases each expert of `layer`, in order (a hit or a miss each).
void Use(ExpertStore& s, int layer, std::initializer_list<int> experts) {
  for (int e : experts) {
    auto ref = s.Acquire(layer, e);
    ASSERT_TRUE(ref.ok()) << ref.status().ToString();
    s.Release(*ref);
  }
}

TEST(ExpertStore, ContentMatchesSourceForRandomPatterns) {
  std::mt19937 rng(3);
  for (const std::string policy : {"lru", "lfu", "static", "expertflow", "belady"}) {
    for (int slots = 1; slots <= kExperts; ++slots) {
      // The access pattern first (belady needs it): steps of 1..slots distinct experts of a layer.
      std::vector<std::vector<ExpertKey>> steps;
      std::vector<ExpertKey> all;
      for (int s = 0; s < 60; ++s) {
        const int layer = static_cast<int>(rng() % kLayers);
        const int n = 1 + static_cast<int>(rng() % slots);
        std::vector<int> ex(kExperts);
        std::iota(ex.begin(), ex.end(), 0);
        std::shuffle(ex.begin(), ex.end(), rng);
        std::vector<ExpertKey> step;
        for (int j = 0; j < n; ++j) step.push_back({layer, ex[j]});
        steps.push_back(step);
        all.insert(all.end(), step.begin(), step.end());
      }
      auto o = Options(slots, policy);
      o.policy_config.future = all;
      o.policy_config.counts.assign(kLayers * kExperts, 1);
      auto store = ExpertStore::Create(o, FillExpert);
      ASSERT_TRUE(store.ok()) << store.status().ToString();
      for (const auto& step : steps) {
        std::vector<SlotRef> refs;
        for (const ExpertKey& k : step) {
          auto r = (*store)->Acquire(k.layer, k.expert);
          ASSERT_TRUE(r.ok()) << policy << " slots=" << slots << ": " << r.status().ToString();
          refs.push_back(*r);
        }
        for (const SlotRef& r : refs) {  // every pinned slot still holds its own expert
          EXPECT_TRUE(Matches(r)) << policy << " slots=" << slots;
          EXPECT_TRUE((*store)->IsResident(r.layer, r.expert));
          EXPECT_EQ(reinterpret_cast<uintptr_t>(r.data) % 256, 0u);
        }
        for (const SlotRef& r : refs) (*store)->Release(r);
      }
      auto st = (*store)->stats();
      EXPECT_EQ(st.total.hits + st.total.misses, static_cast<int64_t>(all.size()));
      EXPECT_EQ(st.total.bytes_from_host, st.total.misses * static_cast<int64_t>(kBytes));
      if (slots == kExperts) {
        EXPECT_LE(st.total.misses, kLayers * kExperts);
      }
    }
  }
}

TEST(ExpertStore, PinnedSlotsAreNotEvicted) {
  auto store = std::move(*ExpertStore::Create(Options(2), FillExpert));
  auto a = store->Acquire(0, 1);
  auto b = store->Acquire(0, 2);
  ASSERT_TRUE(a.ok() && b.ok());
  auto c = store->Acquire(0, 3);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(c.status().message().find("pinned"), std::string::npos) << c.status().message();
  EXPECT_TRUE(Matches(*a) && Matches(*b));
  store->Release(*b);
  c = store->Acquire(0, 3);  // evicts 2, the only unpinned one
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(store->IsResident(0, 1));
  EXPECT_FALSE(store->IsResident(0, 2));
  EXPECT_TRUE(Matches(*a) && Matches(*c));
  // Other layers are unaffected by layer 0's pins.
  auto d = store->Acquire(1, 0);
  ASSERT_TRUE(d.ok());
  store->Release(*a);
  store->Release(*c);
  store->Release(*d);
}

// Evict frees the slot of the expert it is asked to drop, so the layer's next miss takes that
// slot rather than the policy's victim; held experts and other layers stay.
TEST(ExpertStore, EvictChoosesTheSlotTheNextMissTakes) {
  auto store = std::move(*ExpertStore::Create(Options(2), FillExpert));
  EXPECT_EQ(store->FreeSlots(0), 2);
  EXPECT_EQ(store->FreeSlots(kLayers), 0);
  for (int e : {1, 2}) store->Release(*store->Acquire(0, e));  // LRU's next victim: 1
  EXPECT_EQ(store->FreeSlots(0), 0);
  auto other = store->Acquire(1, 1);
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(store->Evict(0, 3));   // not resident
  EXPECT_FALSE(store->Evict(1, 1));   // held
  EXPECT_FALSE(store->Evict(-1, 0));  // out of range
  EXPECT_TRUE(store->Evict(0, 2));    // the most recent one, which LRU would keep
  EXPECT_FALSE(store->IsResident(0, 2));
  EXPECT_EQ(store->FreeSlots(0), 1);
  auto c = store->Acquire(0, 3);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(Matches(*c));
  EXPECT_TRUE(store->IsResident(0, 1));  // LRU's victim stayed
  EXPECT_TRUE(store->IsResident(1, 1));
  EXPECT_TRUE(Matches(*other));
  store->Release(*c);
  store->Release(*other);
  const auto st = store->stats();
  EXPECT_EQ(st.total.misses, 4);  // 0/1, 0/2, 1/1, 0/3: the eviction itself loads nothing
}

TEST(ExpertStore, BudgetSmallerThanTopKIsAnError) {
  auto s = ExpertStore::Create(Options(1, "lru", 2), FillExpert);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("1 slots per layer"), std::string::npos) << s.status().message();
  EXPECT_NE(s.status().message().find("top_k = 2"), std::string::npos);
  auto o = Options(2);
  o.slots_per_layer = 0;
  o.global_slots = 1;
  o.top_k = 2;
  EXPECT_FALSE(ExpertStore::Create(o, FillExpert).ok());
  o = Options(2);
  o.slot_bytes = 0;
  EXPECT_FALSE(ExpertStore::Create(o, FillExpert).ok());
  EXPECT_FALSE(ExpertStore::Create(Options(2, "nope"), FillExpert).ok());
}

TEST(ExpertStore, SourceErrorIsReturnedAndSlotFreed) {
  auto store = std::move(*ExpertStore::Create(Options(2), [](int l, int e, std::span<std::byte> dst) {
    if (e == 5) return DataLoss("truncated shard");
    return FillExpert(l, e, dst);
  }));
  auto r = store->Acquire(0, 5);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("truncated shard"), std::string::npos);
  EXPECT_FALSE(store->IsResident(0, 5));
  EXPECT_TRUE(store->Acquire(0, 1).ok());
  EXPECT_TRUE(store->Acquire(0, 2).ok());  // both slots still usable
}

// A load that fails while PrefetchSet runs over its expert: the slot must not stay resident, or
// the next Acquire would be a hit on bytes never written. Expert 1's first load blocks until
// PrefetchSet has passed it and is loading expert 2, then fails.
TEST(ExpertStore, FailedLoadDuringPrefetchSetLeavesNothingResident) {
  std::mutex mu;
  std::condition_variable cv;
  bool set_loading = false, acquire_failed = false;
  std::atomic<int> loads_of_1{0};
  auto store = ExpertStore::Create(Options(2), [&](int l, int e, std::span<std::byte> dst) -> Status {
    if (e == 1 && ++loads_of_1 == 1) {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return set_loading; });
      return DataLoss("truncated shard");
    }
    if (e == 2) {
      std::unique_lock<std::mutex> lock(mu);
      set_loading = true;
      cv.notify_all();
      cv.wait(lock, [&] { return acquire_failed; });
    }
    return FillExpert(l, e, dst);
  });
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  ExpertStore& s = **store;
  std::thread miss([&] {
    EXPECT_FALSE(s.Acquire(0, 1).ok());
    std::lock_guard<std::mutex> lock(mu);
    acquire_failed = true;
    cv.notify_all();
  });
  while (loads_of_1.load() == 0) std::this_thread::yield();  // expert 1 resident and loading
  const std::vector<int32_t> set = {1, 2};
  s.PrefetchSet(0, set, Priority::kPrefetch);
  miss.join();
  EXPECT_FALSE(s.IsResident(0, 1));
  auto r = s.Acquire(0, 1);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(loads_of_1.load(), 2) << "a hit on the slot whose load failed";
  EXPECT_TRUE(Matches(*r));
  s.Release(*r);
}

TEST(ExpertStore, PrefetchCounters) {
  auto store = std::move(*ExpertStore::Create(Options(2), FillExpert));
  ASSERT_TRUE(store->Prefetch(0, 1, Priority::kPrefetch).ok());
  ASSERT_TRUE(store->Prefetch(0, 2, Priority::kPrefetch).ok());
  EXPECT_TRUE(store->IsResident(0, 1));
  auto r = store->Acquire(0, 1);  // used
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(Matches(*r));
  store->Release(*r);
  r = store->Acquire(0, 3);  // evicts 2 (LRU), never acquired: wasted
  ASSERT_TRUE(r.ok());
  store->Release(*r);
  auto s = store->stats();
  EXPECT_EQ(s.total.prefetch_issued, 2);
  EXPECT_EQ(s.total.prefetch_used, 1);
  EXPECT_EQ(s.total.prefetch_wasted, 1);
  EXPECT_EQ(s.total.hits, 1);
  EXPECT_EQ(s.total.misses, 1);
  EXPECT_EQ(s.Layer(0).bytes_from_host, 3 * static_cast<int64_t>(kBytes));
  EXPECT_EQ(s.per_expert[1].prefetch_used, 1);
}

// One layer's step, with and without the worker: expert 1 was forecast and prefetched in time (a
// prefetch used, a hit); the router also picks 2, which the forecast missed. That correction is a
// miss and a load, never a prefetch or a hit, whichever thread loads it: without the worker the
// Acquire loads it (as CachedExpertSource does), with it the worker loads it at correction priority
// before the Acquire. Both paths count the same.
TEST(ExpertStore, CorrectionCountsAsAMissWithAndWithoutTheWorker) {
  std::vector<ExpertCounters> got;
  for (bool async : {false, true}) {
    SCOPED_TRACE(async ? "async" : "sync");
    auto o = Options(3);
    o.async_prefetch = async;
    auto store = ExpertStore::Create(o, FillExpert);
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    ExpertStore& s = **store;
    ASSERT_TRUE(s.Prefetch(0, 1, Priority::kPrefetch).ok());
    s.WaitForPrefetches();
    if (async) {
      ASSERT_TRUE(s.Prefetch(0, 2, Priority::kCorrection).ok());
      s.WaitForPrefetches();  // loaded before the Acquire: resident when it comes
    }
    for (int e : {1, 2, 2}) {  // the corrected expert's second use is a hit
      auto r = s.Acquire(0, e);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      EXPECT_TRUE(Matches(*r));
      s.Release(*r);
    }
    const ExpertCounters t = s.stats().total;
    EXPECT_EQ(t.hits, 2);
    EXPECT_EQ(t.misses, 1);
    EXPECT_EQ(t.prefetch_issued, 1);
    EXPECT_EQ(t.prefetch_used, 1);
    EXPECT_EQ(t.prefetch_wasted, 0);
    EXPECT_EQ(t.prefetch_dropped, 0);
    EXPECT_EQ(t.bytes_from_host, 2 * static_cast<int64_t>(kBytes));
    EXPECT_EQ(t.bytes_from_device, 2 * static_cast<int64_t>(kBytes));
    EXPECT_DOUBLE_EQ(s.stats().hit_rate(), 2.0 / 3.0);
    got.push_back(t);
  }
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].hits, got[1].hits);
  EXPECT_EQ(got[0].misses, got[1].misses);
  EXPECT_EQ(got[0].prefetch_issued, got[1].prefetch_issued);
  EXPECT_EQ(got[0].prefetch_used, got[1].prefetch_used);
  EXPECT_EQ(got[0].bytes_from_host, got[1].bytes_from_host);
  EXPECT_EQ(got[0].bytes_from_device, got[1].bytes_from_device);
}

// A correction loaded and then evicted before any Acquire was no prefetch: nothing is wasted; the
// load's bytes count, and the expert's next Acquire is a miss again.
TEST(ExpertStore, CorrectionEvictedUnusedIsNoWastedPrefetch) {
  for (bool async : {false, true}) {
    SCOPED_TRACE(async ? "async" : "sync");
    auto o = Options(2);
    o.async_prefetch = async;
    auto store = ExpertStore::Create(o, FillExpert);
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    ExpertStore& s = **store;
    ASSERT_TRUE(s.Prefetch(0, 2, Priority::kCorrection).ok());
    s.WaitForPrefetches();
    ASSERT_TRUE(s.Evict(0, 2));
    auto r = s.Acquire(0, 2);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    s.Release(*r);
    const ExpertCounters t = s.stats().total;
    EXPECT_EQ(t.prefetch_issued, 0);
    EXPECT_EQ(t.prefetch_wasted, 0);
    EXPECT_EQ(t.hits, 0);
    EXPECT_EQ(t.misses, 1);
    EXPECT_EQ(t.bytes_from_host, 2 * static_cast<int64_t>(kBytes));
  }
}

// Async: a correction of an expert already queued as a prefetch goes ahead of the other prefetches
// (it waited behind them), and counts as what it is: a miss, not a prefetch used. A correction of
// an expert whose prefetch is already loading leaves that load alone: the prefetch came late, not
// never, and its Acquire (which waits for it) is a hit. The worker is held in the first load while
// the queue is built.
TEST(ExpertStore, CorrectionOfAQueuedPrefetchIsLoadedFirstAndCountedAsAMiss) {
  auto o = Options(4);
  o.async_prefetch = true;
  std::mutex mu;
  std::condition_variable cv;
  bool go = false;
  std::vector<int> order;
  auto store = ExpertStore::Create(o, [&](int l, int e, std::span<std::byte> dst) -> Status {
    std::unique_lock<std::mutex> lock(mu);
    order.push_back(e);
    if (e == 0) cv.wait(lock, [&] { return go; });
    lock.unlock();
    return FillExpert(l, e, dst);
  });
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  ExpertStore& s = **store;
  ASSERT_TRUE(s.Prefetch(0, 0, Priority::kPrefetch).ok());
  for (;;) {  // the worker holds expert 0's load
    std::lock_guard<std::mutex> lock(mu);
    if (!order.empty()) break;
  }
  for (int e : {1, 2, 3}) ASSERT_TRUE(s.Prefetch(0, e, Priority::kPrefetch).ok());
  ASSERT_TRUE(s.Prefetch(0, 3, Priority::kCorrection).ok());
  ASSERT_TRUE(s.Prefetch(0, 0, Priority::kCorrection).ok());  // loading as a prefetch: no new load
  {
    std::lock_guard<std::mutex> lock(mu);
    go = true;
  }
  cv.notify_all();
  s.WaitForPrefetches();
  EXPECT_EQ(order, (std::vector<int>{0, 3, 1, 2}));  // 3 loaded once, as a correction
  for (int e : {3, 0, 1}) {
    auto r = s.Acquire(0, e);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_TRUE(Matches(*r));
    s.Release(*r);
  }
  const ExpertStoreStats st = s.stats();
  EXPECT_EQ(st.total.prefetch_issued, 3);  // 0, 1, 2
  EXPECT_EQ(st.total.prefetch_used, 2);    // 0, 1
  EXPECT_EQ(st.total.hits, 2);
  EXPECT_EQ(st.total.misses, 1);  // 3
  EXPECT_EQ(st.per_expert[3].misses, 1);
  EXPECT_EQ(st.per_expert[3].prefetch_issued, 0);
  EXPECT_EQ(st.per_expert[3].prefetch_used, 0);
  EXPECT_EQ(st.per_expert[3].hits, 0);
  EXPECT_EQ(st.total.bytes_from_host, 4 * static_cast<int64_t>(kBytes));
}

TEST(ExpertStore, AsyncPrefetchAndConcurrentAcquire) {
  auto o = Options(3);
  o.async_prefetch = true;
  std::atomic<int> loads{0};
  auto store = std::move(*ExpertStore::Create(o, [&](int l, int e, std::span<std::byte> dst) {
    ++loads;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    return FillExpert(l, e, dst);
  }));
  for (int e = 0; e < 3; ++e) ASSERT_TRUE(store->Prefetch(1, e, Priority::kPrefetch).ok());
  ASSERT_TRUE(store->Prefetch(2, 4, Priority::kCorrection).ok());
  store->WaitForPrefetches();
  for (int e = 0; e < 3; ++e) EXPECT_TRUE(store->IsResident(1, e));
  EXPECT_TRUE(store->IsResident(2, 4));
  EXPECT_EQ(store->stats().total.prefetch_issued, 3);  // the correction is none
  // Two threads acquiring and checking while the worker prefetches.
  std::atomic<int> bad{0};
  auto work = [&](unsigned seed) {
    std::mt19937 rng(seed);
    for (int i = 0; i < 200; ++i) {
      const int l = static_cast<int>(rng() % kLayers), e = static_cast<int>(rng() % kExperts);
      if (rng() % 3 == 0) (void)store->Prefetch(l, (e + 1) % kExperts, Priority::kPrefetch);
      auto r = store->Acquire(l, e);
      if (!r.ok()) {
        // Both threads may pin a layer's slots at once only up to 2 of 3: never exhausted.
        ++bad;
        continue;
      }
      if (!Matches(*r)) ++bad;
      store->Release(*r);
    }
  };
  std::thread t1(work, 1), t2(work, 2);
  t1.join();
  t2.join();
  store->WaitForPrefetches();
  EXPECT_EQ(bad.load(), 0);
  auto s = store->stats();
  EXPECT_EQ(s.total.hits + s.total.misses, 400 + 0);
  EXPECT_EQ(s.total.bytes_from_host, static_cast<int64_t>(loads.load()) * static_cast<int64_t>(kBytes));
}

// Every slot of a layer pinned, one of them by a prefetch still copying: a miss waits for the copy
// to end (the prefetched expert, unpinned, is then evicted) instead of calling the slots exhausted.
TEST(ExpertStore, MissWaitsForAPrefetchHoldingTheLastSlot) {
  auto o = Options(2);
  o.async_prefetch = true;
  std::atomic<bool> copying{false}, release{false};
  auto store = std::move(*ExpertStore::Create(o, [&](int l, int e, std::span<std::byte> dst) {
    if (l == 0 && e == 5) {  // the prefetch: holds its slot until released
      copying = true;
      while (!release) std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    return FillExpert(l, e, dst);
  }));
  auto held = store->Acquire(0, 0);
  ASSERT_TRUE(held.ok()) << held.status().ToString();
  ASSERT_TRUE(store->Prefetch(0, 5, Priority::kPrefetch).ok());
  while (!copying) std::this_thread::sleep_for(std::chrono::microseconds(100));
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    release = true;
  });
  auto miss = store->Acquire(0, 1);  // slot 1 pinned by expert 0, slot 2 by the prefetch's copy
  releaser.join();
  ASSERT_TRUE(miss.ok()) << miss.status().ToString();
  EXPECT_TRUE(Matches(*miss));
  EXPECT_FALSE(store->IsResident(0, 5));
  store->Release(*miss);
  store->Release(*held);
  // With every slot held by this thread and nothing in flight, a miss still fails at once.
  auto a = store->Acquire(0, 2), b = store->Acquire(0, 3);
  ASSERT_TRUE(a.ok() && b.ok());
  auto c = store->Acquire(0, 4);
  EXPECT_EQ(c.status().code(), StatusCode::kResourceExhausted);
  store->Release(*a);
  store->Release(*b);
}

// A non-host-addressable arena (as a device arena would be): the store stages and copies in.
class OpaqueArena final : public SlotArena {
 public:
  OpaqueArena(int n, size_t bytes) : n_(n), bytes_(bytes), mem_(n * bytes) {}
  int num_slots() const override { return n_; }
  size_t slot_bytes() const override { return bytes_; }
  const char* tier() const override { return "opaque"; }
  void* data(int slot) override { return mem_.data() + slot * bytes_; }
  std::span<std::byte> host_view(int) override { return {}; }
  Status CopyIn(int slot, std::span<const std::byte> src) override {
    std::memcpy(data(slot), src.data(), src.size());
    ++copies;
    return Status::Ok();
  }
  int copies = 0;

 private:
  int n_;
  size_t bytes_;
  std::vector<std::byte> mem_;
};

TEST(SlotSpans, SlotsOfTheirOwnSizesOn256ByteBoundaries) {
  auto uniform = SlotSpans::Make(3, 1000);
  ASSERT_TRUE(uniform.ok());
  EXPECT_EQ(uniform->offset(2), 2048u);
  EXPECT_EQ(uniform->size(1), 1000u);
  EXPECT_EQ(uniform->total(), 3072u);
  const std::vector<size_t> sizes = {1000, 1000, 300, 300, 300};
  auto sized = SlotSpans::Make(5, 1000, sizes);
  ASSERT_TRUE(sized.ok());
  EXPECT_EQ(sized->offset(2), 2048u);
  EXPECT_EQ(sized->offset(3), 2048u + 512);
  EXPECT_EQ(sized->size(4), 300u);
  EXPECT_EQ(sized->total(), 2048u + 3 * 512);
  EXPECT_EQ(sized->largest(), 1000u);
  EXPECT_FALSE(SlotSpans::Make(4, 1000, sizes).ok());                            // one size per slot
  EXPECT_FALSE(SlotSpans::Make(2, 1000, std::vector<size_t>{1000, 1001}).ok());  // above the largest
  EXPECT_FALSE(SlotSpans::Make(2, 1000, std::vector<size_t>{0, 1000}).ok());
}

// A store over an arena whose layers' slots differ in size: each layer's experts fill their own
// slots, and a load larger than its slot is refused.
TEST(ExpertStore, SlotsSizedPerLayer) {
  auto backend = runtime::MakeBackend("cpu", 0);
  ASSERT_TRUE(backend.ok());
  const size_t layer_bytes[kLayers] = {1000, 400, 700};
  const int quotas[kLayers] = {2, 4, 3};
  std::vector<size_t> sizes;
  for (int l = 0; l < kLayers; ++l) sizes.insert(sizes.end(), quotas[l], layer_bytes[l]);
  auto arena = BackendSlotArena::Create(backend->get(), static_cast<int>(sizes.size()), kBytes, sizes);
  ASSERT_TRUE(arena.ok()) << arena.status().ToString();
  EXPECT_EQ((*arena)->slot_size(2), 400u);
  EXPECT_FALSE((*arena)->CopyIn(2, std::vector<std::byte>(401)).ok());
  EXPECT_TRUE((*arena)->CopyIn(2, std::vector<std::byte>(400)).ok());
  ExpertStoreOptions o = Options(0);
  o.slots_per_layer = 0;
  o.layer_quotas.assign(quotas, quotas + kLayers);
  auto store = ExpertStore::Create(o, FillExpert, std::move(arena).value());
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  for (int round = 0; round < 3; ++round)
    for (int l = 0; l < kLayers; ++l)
      for (int e = 0; e < kExperts; ++e) {
        auto r = (*store)->Acquire(l, e);
        ASSERT_TRUE(r.ok()) << r.status().ToString();
        ASSERT_EQ(r->bytes.size(), layer_bytes[l]) << l;
        for (size_t i = 0; i < layer_bytes[l]; ++i) ASSERT_EQ(r->bytes[i], Pattern(l, e, i)) << l << " " << e;
        (*store)->Release(*r);
      }
}

TEST(ExpertStore, PluggableArena) {
  auto arena = std::make_unique<OpaqueArena>(kLayers * 2, kBytes);
  OpaqueArena* raw = arena.get();
  auto store = ExpertStore::Create(Options(2), FillExpert, std::move(arena));
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  auto r = (*store)->Acquire(2, 3);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->bytes.empty());
  const auto* p = static_cast<const std::byte*>(r->data);
  for (size_t i = 0; i < kBytes; ++i) ASSERT_EQ(p[i], Pattern(2, 3, i));
  EXPECT_EQ(raw->copies, 1);
  (*store)->Release(*r);
  auto wrong = ExpertStore::Create(Options(2), FillExpert, std::make_unique<OpaqueArena>(1, kBytes));
  EXPECT_FALSE(wrong.ok());
}

TEST(ExpertStore, PrefetchSetNeverEvictsItsOwnMembers) {
  // Layer 0 holds 2 slots: expert 0 (older) and expert 1 (newer). The forecast is {0, 2}: loading
  // 2 must evict 1, not 0 — which a per-expert prefetch under LRU would do (0 is the older).
  for (bool as_set : {false, true}) {
    auto store = ExpertStore::Create(Options(2), FillExpert);
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    ExpertStore& s = **store;
    ASSERT_NO_FATAL_FAILURE(Use(s, 0, {0, 1}));
    const std::vector<int32_t> forecast = {0, 2};
    if (as_set) {
      s.PrefetchSet(0, forecast, Priority::kPrefetch);
    } else {
      for (int32_t e : forecast) s.Prefetch(0, e, Priority::kPrefetch).IgnoreError();
    }
    EXPECT_TRUE(s.IsResident(0, 2)) << (as_set ? "set" : "per expert");
    EXPECT_EQ(s.IsResident(0, 0), as_set) << (as_set ? "set" : "per expert");
    EXPECT_EQ(s.IsResident(0, 1), !as_set) << (as_set ? "set" : "per expert");
  }
  // A set larger than the layer's slots loads what fits and skips the rest, without thrashing.
  auto store = ExpertStore::Create(Options(2), FillExpert);
  ASSERT_TRUE(store.ok());
  const std::vector<int32_t> big = {3, 4, 5};
  (*store)->PrefetchSet(1, big, Priority::kPrefetch);
  EXPECT_TRUE((*store)->IsResident(1, 3));
  EXPECT_TRUE((*store)->IsResident(1, 4));
  EXPECT_FALSE((*store)->IsResident(1, 5));
  EXPECT_EQ((*store)->stats().total.prefetch_issued, 2);  // 5 was skipped, nothing loaded twice
}

// The forecast of a batch of 8 under a frequency predictor: every token gives expert 2 p = 0.25,
// so the batch needs it with 1 - 0.75^8 = 0.90 and it passes a 0.9 gate; but the two residents are
// needed about as surely (0.9). Loading 2 over one of them would only trade a hit for a miss and
// add a copy: the set declines it. A resident that the forecast does not need is displaced.
TEST(ExpertStore, PrefetchSetKeepsAResidentAsLikelyNeededAsTheMember) {
  for (const std::string policy : {"lru", "expertflow"}) {
    auto store = ExpertStore::Create(Options(2, policy), FillExpert);
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    ExpertStore& s = **store;
    ASSERT_NO_FATAL_FAILURE(Use(s, 0, {0, 1}));
    const std::vector<int32_t> set = {2};
    std::vector<float> need = {0.9f, 0.9f, 0.9f, 0.f, 0.f, 0.f};
    s.PrefetchSet(0, set, Priority::kPrefetch, need, 0.9);
    EXPECT_FALSE(s.IsResident(0, 2)) << policy;
    EXPECT_TRUE(s.IsResident(0, 0)) << policy;
    EXPECT_TRUE(s.IsResident(0, 1)) << policy;
    EXPECT_EQ(s.stats().total.prefetch_issued, 0) << policy;
    EXPECT_EQ(s.stats().total.prefetch_declined, 1) << policy;
    // The next run uses 0 and 1, as forecast: both hit, nothing was loaded for nothing.
    ASSERT_NO_FATAL_FAILURE(Use(s, 0, {0, 1}));
    EXPECT_EQ(s.stats().total.misses, 2) << policy;  // the two first loads only

    // Expert 0 is not needed any more: 2 takes its slot (0 is the victim of both policies here).
    need = {0.f, 0.9f, 1.f, 0.f, 0.f, 0.f};
    s.PrefetchSet(0, set, Priority::kPrefetch, need, 0.9);
    EXPECT_TRUE(s.IsResident(0, 2)) << policy;
    EXPECT_TRUE(s.IsResident(0, 1)) << policy;
    EXPECT_EQ(s.stats().total.prefetch_issued, 1) << policy;
    // A free slot evicts nothing: the member's own probability decides (the min_prob gate).
    need = {0.f, 0.f, 0.f, 0.95f, 0.f, 0.f};
    const std::vector<int32_t> other = {3};
    s.PrefetchSet(1, other, Priority::kPrefetch, need, 0.9);
    EXPECT_TRUE(s.IsResident(1, 3)) << policy;
    // Without `need`, every member loads (an oracle's list).
    const std::vector<int32_t> fourth = {4};
    s.PrefetchSet(0, fourth, Priority::kPrefetch);
    EXPECT_TRUE(s.IsResident(0, 4)) << policy;
  }
}

}  // namespace
}  // namespace ef::cache
