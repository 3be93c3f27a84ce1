// The KV cache in bf16 (EngineOptions::kv_cache_dtype) on the CPU backend: its appends round like
// F32ToBf16 and its attention over bf16 keys and values is its fp32 attention over the rounded
// values, bit for bit. The engine with a bf16 cache: tests/runtime/engine_test.cc.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"

namespace ef::runtime {
namespace {

TEST(KvCacheDType, CpuAttentionOverBf16IsFp32AttentionOverTheRoundedValues) {
  ThreadPool pool(2);
  CpuBackend cpu(&pool);
  const int heads = 8, kv_heads = 2, hd = 16, kvd = kv_heads * hd;
  const int n_total = 9, n_new = 3;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> k(n_total * kvd), v(k.size()), q(n_new * heads * hd);
  for (auto* x : {&k, &v, &q})
    for (float& f : *x) f = nd(rng);
  // The appends, as the engine makes them: two items, bytes of the fp32 source.
  std::vector<uint16_t> kb(k.size(), 0), vb(v.size(), 0);
  const Backend::CopyItem items[] = {{kb.data(), k.data(), k.size() * sizeof(float)},
                                     {vb.data(), v.data(), v.size() * sizeof(float)}};
  cpu.CopyBatchToBf16(items, 2);
  std::vector<float> kr(k.size()), vr(v.size());
  for (size_t i = 0; i < k.size(); ++i) {
    ASSERT_EQ(kb[i], F32ToBf16(k[i])) << i;
    ASSERT_EQ(vb[i], F32ToBf16(v[i])) << i;
    kr[i] = Bf16ToF32(kb[i]);
    vr[i] = Bf16ToF32(vb[i]);
  }
  std::vector<float> want(q.size()), got(q.size(), -1.f);
  const AttentionSeq fp32{kr.data(), vr.data(), 0, n_new, n_total};
  cpu.AttentionBatch(q.data(), &fp32, 1, heads, kv_heads, hd, want.data());
  ASSERT_TRUE(cpu.SetKvCacheDType(DType::kBF16));
  const AttentionSeq bf16{kb.data(), vb.data(), 0, n_new, n_total};
  cpu.AttentionBatch(q.data(), &bf16, 1, heads, kv_heads, hd, got.data());
  EXPECT_EQ(got, want);
  EXPECT_FALSE(cpu.SetKvCacheDType(DType::kF16));
}

}  // namespace
}  // namespace ef::runtime
