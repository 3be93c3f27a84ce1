#include "scheduler/continuous_batcher.h"

#include <gtest/gtest.h>

#include <map>
#include <random>

namespace ef::scheduler {
namespace {

// Paths: request id's parity picks one of two disjoint expert groups; request 0 uses its own.
void Paths(const BatchItem& u, uint64_t* words) {
  if (u.request_id == 0)
    words[0] = 0xFFull << 48;
  else
    words[0] = (u.request_id % 2) ? 0xFull : 0xF0ull;
}

TEST(ContinuousBatcherTest, StarvationBoundUnderAdversarialArrivals) {
  // Request 0 never clusters with anything; every step two new requests arrive that cluster with
  // each other. Regrouping alone would postpone request 0 forever.
  BatcherOptions opt;
  opt.max_batch_tokens = 4;
  opt.max_batch_requests = 2;
  opt.prefill_chunk_tokens = 1;
  opt.max_wait_steps = 3;
  auto b = ContinuousBatcher::Create(opt, 1, Paths);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  ASSERT_TRUE(b->Submit({0, 4, 20, 0}).ok());
  std::map<int64_t, int64_t> last_run;  // request -> last step it ran
  std::map<int64_t, int> next_pos;
  int64_t next_id = 1;
  for (int step = 0; step < 200; ++step) {
    for (int k = 0; k < 2; ++k) ASSERT_TRUE(b->Submit({next_id++, 1, 3, step}).ok());
    Batch batch = b->NextBatch();
    EXPECT_LE(static_cast<int>(batch.items.size()), opt.max_batch_requests);
    EXPECT_LE(batch.num_tokens, opt.max_batch_tokens);
    std::map<int64_t, int> seen;
    for (const auto& u : batch.items) {
      EXPECT_EQ(++seen[u.request_id], 1) << "request twice in one batch";
      // Units of a request arrive in position order, without gaps.
      EXPECT_EQ(u.first_pos, next_pos[u.request_id]) << "request " << u.request_id;
      next_pos[u.request_id] = u.first_pos + u.num_tokens;
      last_run[u.request_id] = batch.step;
    }
    ASSERT_TRUE(b->Complete(batch).ok());
  }
  // Request 0 (4 prompt tokens + 20 decode steps) ran within the bound each time it was ready.
  EXPECT_EQ(next_pos[0], 24) << "request 0 did not finish";
}

TEST(ContinuousBatcherTest, EveryUnitRunsWithinMaxWaitSteps) {
  std::mt19937 rng(3);
  BatcherOptions opt;
  opt.max_batch_tokens = 16;
  opt.max_batch_requests = 4;
  opt.prefill_chunk_tokens = 4;
  opt.max_wait_steps = 2;
  opt.kv_capacity_tokens = 1000;
  auto b =
      ContinuousBatcher::Create(opt, 1, [](const BatchItem& u, uint64_t* w) { w[0] = 1ull << (u.request_id % 7); });
  ASSERT_TRUE(b.ok());
  std::map<int64_t, int64_t> ready_since;  // request -> step its current unit became ready
  std::map<int64_t, int> remaining;
  int64_t id = 0;
  for (int step = 0; step < 600; ++step) {
    if (step < 200)
      for (int k = static_cast<int>(rng() % 4); k > 0; --k) {
        Request r{id++, 1 + static_cast<int>(rng() % 9), static_cast<int>(rng() % 6), step};
        ASSERT_TRUE(b->Submit(r).ok());
      }
    Batch batch = b->NextBatch();
    for (const auto& u : batch.items) {
      auto it = ready_since.find(u.request_id);
      if (it != ready_since.end()) {
        EXPECT_LE(batch.step - it->second, opt.max_wait_steps) << "request " << u.request_id;
      }
      ready_since[u.request_id] = batch.step + 1;
    }
    ASSERT_TRUE(b->Complete(batch).ok());
  }
  EXPECT_EQ(b->num_running(), 0u);
  EXPECT_EQ(b->num_waiting(), 0u);
}

TEST(ContinuousBatcherTest, KvCapacityBoundsAdmission) {
  BatcherOptions opt;
  opt.kv_capacity_tokens = 10;
  auto b = ContinuousBatcher::Create(opt);
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->Submit({1, 8, 8, 0}).ok());  // can never fit
  ASSERT_TRUE(b->Submit({2, 4, 2, 0}).ok());
  ASSERT_TRUE(b->Submit({3, 4, 2, 0}).ok());
  Batch batch = b->NextBatch();
  EXPECT_EQ(b->num_running(), 1u);  // 6 + 6 > 10
  EXPECT_EQ(b->num_waiting(), 1u);
  EXPECT_FALSE(ContinuousBatcher::Create({.max_batch_tokens = 2, .max_batch_requests = 4}).ok());
}

}  // namespace
}  // namespace ef::scheduler
