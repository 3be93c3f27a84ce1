// cuda::plan_attention_batch is host code: the decode kernel's tile, its splits and its merge
// scratch are checked here without a device, wherever the CUDA backend is built (CI included).
#if defined(EF_HAVE_CUDA_BACKEND)
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "runtime/backend/cuda/cuda_kernels.h"

namespace ef::runtime {
namespace {

// num_seqs decode rows over contexts of n_total keys (16-byte aligned stand-in K/V addresses: the
// plan only tests their alignment).
std::vector<cuda::AttentionSeqDesc> Decode(int num_seqs, int n_total) {
  const void* kv = reinterpret_cast<const void*>(uintptr_t{4096});
  std::vector<cuda::AttentionSeqDesc> d;
  for (int s = 0; s < num_seqs; ++s) d.push_back({kv, kv, s, 1, n_total});
  return d;
}

cuda::AttentionBatchPlan Plan(const std::vector<cuda::AttentionSeqDesc>& d, int heads, int kv_heads, int head_dim,
                              bool kv_bf16) {
  return cuda::plan_attention_batch(d.data(), static_cast<int>(d.size()), heads, kv_heads, head_dim, 132, kv_bf16);
}

TEST(AttentionPlanTest, DecodeTilesFollowTheCacheDtype) {
  // Mixtral's attention (32 query heads on 8 KV heads of 128): two 16-key fp32 tiles or two 32-key
  // bf16 tiles fit 48 KiB.
  EXPECT_EQ(Plan(Decode(64, 513), 32, 8, 128, false).decode_tile, 16);
  EXPECT_EQ(Plan(Decode(64, 513), 32, 8, 128, true).decode_tile, 32);
  // 16 query heads per KV head: their q and accumulators take room, tiles shrink to 8 keys.
  EXPECT_EQ(Plan(Decode(1, 700), 32, 2, 128, false).decode_tile, 8);
  // head_dim 256, 8 query heads per KV head: 8-key tiles need more than 48 KiB and keep 8 keys (the
  // launch raises the kernel's limit) rather than dropping to 4.
  EXPECT_EQ(Plan(Decode(1, 1000), 16, 2, 256, false).decode_tile, 8);
  for (bool bf16 : {false, true}) {
    const cuda::AttentionBatchPlan p = Plan(Decode(3, 300), 8, 2, 36, bf16);  // rows that do not cut at 8
    EXPECT_TRUE(p.decode);
    EXPECT_EQ(p.decode_tile, 32);
  }
}

// EF_CUDA_DECODE_BLOCKS_PER_SM: the splits' target moves with it; 0 never splits.
TEST(AttentionPlanTest, DecodeBlocksPerSmSetsTheSplits) {
  auto splits = [](int seqs, int per_sm) {
    const auto d = Decode(seqs, 513);
    return cuda::plan_attention_batch(d.data(), seqs, 32, 8, 128, 132, false, per_sm).num_splits;
  };
  EXPECT_EQ(splits(64, cuda::kDecodeBlocksPerSmDefault), 1);
  EXPECT_EQ(splits(64, 3), 1);  // 512 blocks already pass 3 per SM (396)
  EXPECT_EQ(splits(64, 4), 2);  // ... not 4 (528)
  EXPECT_EQ(splits(64, 8), 3);  // 1056 blocks: ceil(1056 / 512)
  EXPECT_EQ(splits(1, 1), 17);  // ceil(132 / 8)
  EXPECT_EQ(splits(1, 0), 1);
  EXPECT_EQ(splits(16, 0), 1);
  const auto d = Decode(1, 513);
  EXPECT_EQ(cuda::plan_attention_batch(d.data(), 1, 32, 8, 128, 132, false, 0).workspace_floats, size_t{0});
}

TEST(AttentionPlanTest, DecodeSplitsFillTheSmsAndTheKernelMergesThem) {
  // One sequence of 513 keys on 8 KV heads: enough splits for 3 blocks per SM (50), at most one
  // split per 16-key tile (33); the decode kernel merges them (a counter per sequence and KV head).
  const cuda::AttentionBatchPlan one = Plan(Decode(1, 513), 32, 8, 128, false);
  EXPECT_TRUE(one.decode);
  EXPECT_EQ(one.num_splits, 33);
  EXPECT_EQ(one.num_counters, 8);
  EXPECT_EQ(one.workspace_floats, size_t{33} * 1 * 32 * (128 + 2));
  // 16 sequences: 128 blocks, 4 splits for 3 per SM.
  const cuda::AttentionBatchPlan some = Plan(Decode(16, 513), 32, 8, 128, false);
  EXPECT_EQ(some.num_splits, 4);
  EXPECT_EQ(some.num_rows, 16);
  EXPECT_EQ(some.num_counters, 16 * 8);
  // 64 sequences (512 blocks) fill the SMs without splits: no workspace, no counters.
  const cuda::AttentionBatchPlan full = Plan(Decode(64, 513), 32, 8, 128, false);
  EXPECT_EQ(full.num_splits, 1);
  EXPECT_EQ(full.workspace_floats, 0u);
  EXPECT_EQ(full.num_counters, 0);
}

TEST(AttentionPlanTest, ShapesTheDecodeKernelCannotTakeGoToTheGeneralKernel) {
  EXPECT_FALSE(Plan(Decode(1, 300), 4, 2, 18, false).decode);  // head_dim not a multiple of 4
  EXPECT_FALSE(Plan(Decode(1, 300), 4, 2, 0, false).decode);   // no head
  std::vector<cuda::AttentionSeqDesc> prefill = Decode(2, 64);
  prefill[1].n_new = 17;
  prefill[1].n_total = 80;
  EXPECT_FALSE(Plan(prefill, 32, 8, 128, false).decode);  // a chunk of more than one row
  std::vector<cuda::AttentionSeqDesc> unaligned = Decode(1, 64);
  unaligned[0].k = reinterpret_cast<const void*>(uintptr_t{4100});
  EXPECT_FALSE(Plan(unaligned, 32, 8, 128, false).decode);
}

}  // namespace
}  // namespace ef::runtime
#endif  // EF_HAVE_CUDA_BACKEND
