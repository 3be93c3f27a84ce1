// The KV cache in bf16 (EngineOptions::kv_cache_dtype): the CPU backend's appends round like
// F32ToBf16 and its attention over bf16 keys and values is its fp32 attention over the rounded
// values, bit for bit; the engine with a bf16 cache feeds a prompt whole, in pieces or token by
// token alike, stays close to the fp32 engine with the same greedy tokens, and refuses what it
// cannot serve (an unknown dtype, attention kernels that read fp32: GPT-OSS's sinks and window).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/engine/engine.h"

namespace ef::runtime {
namespace {

const std::string kTiny = std::string(EF_MODELS_DIR) + "/tiny-code-moe";
const std::vector<int32_t> kPrompt = {1, 483, 291, 1461, 272, 1191, 508, 10, 80, 33, 7, 900, 41, 2};

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

std::unique_ptr<Engine> Make(const std::string& kv, const std::string& dir = kTiny) {
  EngineOptions o;
  o.backend = "cpu";
  o.max_seq_len = 64;
  o.kv_cache_dtype = kv;
  auto e = Engine::Create(dir, o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return e.ok() ? std::move(e).value() : nullptr;
}

// Logits of every position of kPrompt, fed in pieces of `step` tokens.
std::vector<float> Feed(Engine& e, int64_t seq, size_t step) {
  EXPECT_TRUE(e.AddSequence(seq).ok());
  std::vector<float> all;
  for (size_t first = 0; first < kPrompt.size(); first += step) {
    const size_t n = std::min(step, kPrompt.size() - first);
    SeqChunk c{seq, std::span<const int32_t>(kPrompt).subspan(first, n), true};
    ForwardResult r;
    Status s = e.Forward({&c, 1}, &r);
    EXPECT_TRUE(s.ok()) << s.ToString();
    all.insert(all.end(), r.logits.begin(), r.logits.end());
  }
  e.RemoveSequence(seq);
  return all;
}

TEST(KvCacheDType, Bf16EngineIsConsistentAndCloseToFp32) {
  auto fp32 = Make("fp32");
  auto bf16 = Make("bf16");
  ASSERT_NE(fp32, nullptr);
  ASSERT_NE(bf16, nullptr);
  const std::vector<float> want = Feed(*fp32, 1, kPrompt.size());
  const std::vector<float> whole = Feed(*bf16, 1, kPrompt.size());
  // Every chunking reads the same rounded keys and values (a prefill attends over the cache after
  // its append): only fp32 summation order differs.
  for (size_t step : {size_t{1}, size_t{5}}) {
    const std::vector<float> got = Feed(*bf16, 2, step);
    ASSERT_EQ(got.size(), whole.size());
    for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], whole[i], 1e-4f) << "step " << step << " logit " << i;
  }
  // Against fp32: bf16 keys and values move the logits by rounding only; the greedy choice at every
  // position stays.
  const int vocab = fp32->config().vocab_size;
  ASSERT_EQ(whole.size(), want.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (whole[i] - want[i]) * (whole[i] - want[i]);
    den += want[i] * want[i];
  }
  const double rel = std::sqrt(num / den);
  std::printf("[ kv bf16 ] normwise distance from the fp32 engine %.3g\n", rel);
  EXPECT_GT(rel, 0.0);  // the cache really holds bf16
  EXPECT_LT(rel, 1e-2);
  for (size_t p = 0; p < kPrompt.size(); ++p) {
    auto row = [&](const std::vector<float>& x) {
      return std::max_element(x.begin() + p * vocab, x.begin() + (p + 1) * vocab) - (x.begin() + p * vocab);
    };
    EXPECT_EQ(row(whole), row(want)) << "position " << p;
  }
}

TEST(KvCacheDType, UnknownDTypesAndFp32OnlyAttentionAreRefused) {
  EngineOptions o;
  o.backend = "cpu";
  o.kv_cache_dtype = "fp16";
  auto e = Engine::Create(kTiny, o);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(e.status().message().find("kv cache dtype must be fp32 or bf16, got 'fp16'"), std::string::npos)
      << e.status().ToString();
  o.kv_cache_dtype = "bf16";
  e = Engine::Create(std::string(EF_TEST_DATA) + "/gpt_oss", o);  // sinks and a sliding window
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("a bf16 kv cache needs plain attention"), std::string::npos)
      << e.status().ToString();
}

}  // namespace
}  // namespace ef::runtime
