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

// Tensor-core decode (reduced-precision attention over a bf16 cache): head_dim 64/128, GQA groups
// up to 16; its splits hold at least 64 keys (a 16-key step for each of the block's 4 warps) and
// always merge in the kernel.
TEST(AttentionPlanTest, TensorCoreDecodeNeedsABf16CacheAndItsShapes) {
  const auto tc = [](const std::vector<cuda::AttentionSeqDesc>& d, int heads, int kv_heads, int head_dim, bool kv_bf16,
                     bool tensor_cores) {
    return cuda::plan_attention_batch(d.data(), static_cast<int>(d.size()), heads, kv_heads, head_dim, 132, kv_bf16,
                                      cuda::kDecodeBlocksPerSmDefault, tensor_cores);
  };
  const cuda::AttentionBatchPlan b64 = tc(Decode(64, 513), 32, 8, 128, true, true);
  EXPECT_TRUE(b64.decode && b64.decode_tc);
  EXPECT_EQ(b64.num_splits, 1);  // 512 blocks pass 3 per SM
  EXPECT_EQ(b64.num_counters, 0);
  // One sequence of 513 keys on 8 KV heads: 50 splits would give 3 blocks per SM, 64-key splits
  // cap them at 9; merged in the kernel (a counter per KV head).
  const cuda::AttentionBatchPlan b1 = tc(Decode(1, 513), 32, 8, 128, true, true);
  EXPECT_TRUE(b1.decode_tc);
  EXPECT_EQ(b1.num_splits, 9);
  EXPECT_EQ(b1.num_counters, 8);
  EXPECT_EQ(b1.workspace_floats, size_t{9} * 1 * 32 * (128 + 2));
  // The fp32 kernel's plan for the same batch splits by its 32-key bf16 tiles.
  EXPECT_EQ(tc(Decode(1, 513), 32, 8, 128, true, false).num_splits, 17);
  EXPECT_FALSE(tc(Decode(1, 513), 32, 8, 128, true, false).decode_tc);               // tensor cores not asked for
  EXPECT_FALSE(tc(Decode(1, 513), 32, 8, 128, false, true).decode_tc);               // an fp32 cache
  EXPECT_TRUE(tc(Decode(2, 700), 32, 2, 64, true, true).decode_tc);                  // group 16, head_dim 64
  EXPECT_TRUE(tc(Decode(2, 257), 48, 8, 128, true, true).decode_tc);                 // group 6
  const cuda::AttentionBatchPlan wide = tc(Decode(1, 300), 64, 2, 128, true, true);  // group 32
  EXPECT_TRUE(wide.decode);
  EXPECT_FALSE(wide.decode_tc);
  const cuda::AttentionBatchPlan narrow = tc(Decode(3, 300), 8, 2, 36, true, true);  // head_dim 36
  EXPECT_TRUE(narrow.decode);
  EXPECT_FALSE(narrow.decode_tc);
}

}  // namespace
}  // namespace ef::runtime
#endif  // EF_HAVE_CUDA_BACKEND
