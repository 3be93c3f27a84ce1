// The engine on the CUDA backend against Hugging Face transformers fixtures (tests/data, made by
// transformers, not by this project): fp32 logits within 1e-3 max abs, router top-k identical,
// greedy KV-cache decoding identical. With EF_CUDA_BF16_WEIGHTS=1 (the ctest entry
// gpu_reference_bf16 sets it) the Bf16 suite checks top-1 agreement >= 99% over all positions.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "runtime/core/params.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/generator.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/runtime/paged_kv_workload.h"

namespace ef::params {
bool CudaBf16Weights();
}

namespace ef::runtime {
namespace {

using json = nlohmann::json;

json ReadRef(const std::string& family) {
  std::ifstream in(std::string(EF_TEST_DATA) + "/" + family + "/reference.json");
  EXPECT_TRUE(in.good()) << family;
  return json::parse(in);
}

std::unique_ptr<Engine> MakeEngine(const std::string& family, const std::string& backend,
                                   const std::string& kv_cache_dtype = "fp32") {
  EngineOptions o;
  o.backend = backend;
  o.kv_cache_dtype = kv_cache_dtype;
  auto e = Engine::Create(std::string(EF_TEST_DATA) + "/" + family, o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return e.ok() ? std::move(e).value() : nullptr;
}

// Logits of every position of every prompt, both prompts in one batch.
std::vector<std::vector<float>> AllLogits(Engine& engine, const std::vector<std::vector<int32_t>>& ids,
                                          std::vector<std::vector<int32_t>>* router_topk = nullptr) {
  const ModelConfig& c = engine.config();
  if (router_topk) {
    router_topk->assign(c.num_moe_layers(), {});
    engine.AddRoutingHook([router_topk](LayerRouting& r) {
      for (int i = 0; i < r.num_tokens * r.top_k; ++i) (*router_topk)[r.moe_layer.index].push_back(r.ids[i]);
      return Status::Ok();
    });
  }
  std::vector<SeqChunk> batch;
  for (size_t b = 0; b < ids.size(); ++b) {
    EXPECT_TRUE(engine.AddSequence(static_cast<int64_t>(b)).ok());
    batch.push_back(SeqChunk{static_cast<int64_t>(b), ids[b], true});
  }
  ForwardResult res;
  Status st = engine.Forward(batch, &res);
  EXPECT_TRUE(st.ok()) << st.ToString();
  engine.ClearRoutingHooks();
  std::vector<std::vector<float>> rows;
  for (size_t b = 0; b < ids.size(); ++b)
    for (size_t t = 0; t < ids[b].size(); ++t) {
      const float* p = res.logits.data() + (res.row_offset[b] + t) * c.vocab_size;
      rows.emplace_back(p, p + c.vocab_size);
    }
  return rows;
}

double MaxLogitDiff(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  double m = 0;
  for (size_t r = 0; r < a.size() && r < b.size(); ++r)
    for (size_t v = 0; v < a[r].size() && v < b[r].size(); ++v) m = std::max(m, std::abs(double(a[r][v]) - b[r][v]));
  return m;
}

class CudaReferenceTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!testing::HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
    if (params::CudaBf16Weights()) GTEST_SKIP() << "fp32 suite: EF_CUDA_BF16_WEIGHTS is set";
  }
};

TEST_P(CudaReferenceTest, LogitsAndRouterTopKMatchTransformers) {
  json ref = ReadRef(GetParam());
  auto engine = MakeEngine(GetParam(), "cuda");
  ASSERT_NE(engine, nullptr);
  const auto ids = ref["input_ids"].get<std::vector<std::vector<int32_t>>>();
  std::vector<std::vector<int32_t>> topk;
  auto rows = AllLogits(*engine, ids, &topk);
  double max_diff = 0;
  size_t r = 0;
  for (size_t b = 0; b < ids.size(); ++b)
    for (size_t t = 0; t < ids[b].size(); ++t, ++r) {
      const auto want = ref["logits"][b][t].get<std::vector<float>>();
      ASSERT_EQ(want.size(), rows[r].size());
      for (size_t v = 0; v < want.size(); ++v) max_diff = std::max(max_diff, std::abs(double(rows[r][v]) - want[v]));
    }
  EXPECT_LT(max_diff, 1e-3) << "max |logit - transformers|";
  RecordProperty("max_abs_logit_diff", std::to_string(max_diff));
  std::printf("[ %s ] cuda fp32 max |logit - transformers| = %.3g\n", GetParam().c_str(), max_diff);

  const ModelConfig& c = engine->config();
  Status st = static_cast<CudaBackend&>(engine->backend()).status();
  EXPECT_TRUE(st.ok()) << st.ToString();
  if (ref.contains("router_topk_hf")) {  // deepseek, gpt_oss: the chosen ids, compared as sets
    for (int l = 0; l < c.num_moe_layers(); ++l)
      for (size_t t = 0; t < ref["router_topk_hf"][l].size(); ++t) {
        auto want = ref["router_topk_hf"][l][t].get<std::vector<int32_t>>();
        std::vector<int32_t> got(topk[l].begin() + t * c.top_k, topk[l].begin() + (t + 1) * c.top_k);
        std::sort(want.begin(), want.end());
        std::sort(got.begin(), got.end());
        EXPECT_EQ(got, want) << "layer " << l << " row " << t;
      }
    return;
  }
  const auto& router_logits = ref["router_logits"];
  for (int l = 0; l < c.num_moe_layers(); ++l)
    for (size_t t = 0; t < router_logits[l].size(); ++t) {
      std::vector<float> row = router_logits[l][t].get<std::vector<float>>();
      std::vector<int32_t> order(row.size());
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return row[a] > row[b]; });
      for (int j = 0; j < c.top_k; ++j) EXPECT_EQ(topk[l][t * c.top_k + j], order[j]) << "layer " << l << " row " << t;
    }
}

TEST_P(CudaReferenceTest, CudaAndCpuEnginesAgree) {
  json ref = ReadRef(GetParam());
  const auto ids = ref["input_ids"].get<std::vector<std::vector<int32_t>>>();
  auto gpu = MakeEngine(GetParam(), "cuda");
  auto cpu = MakeEngine(GetParam(), "cpu");
  ASSERT_TRUE(gpu && cpu);
  auto a = AllLogits(*gpu, ids), b = AllLogits(*cpu, ids);
  ASSERT_EQ(a.size(), b.size());
  const double max_diff = MaxLogitDiff(a, b);
  EXPECT_LT(max_diff, 1e-4) << "max |cuda - cpu| logit";
  std::printf("[ %s ] max |cuda - cpu| logit = %.3g\n", GetParam().c_str(), max_diff);
}

// A bf16 KV cache: the CUDA engine (bf16 appends, attention over bf16 keys and values) against the
// CPU engine with the same cache, as closely as the fp32 engines agree; families whose attention
// reads fp32 only (MLA, rope scaling, sinks) refuse it on both backends.
TEST_P(CudaReferenceTest, Bf16KvCacheCudaAndCpuEnginesAgree) {
  json ref = ReadRef(GetParam());
  const auto ids = ref["input_ids"].get<std::vector<std::vector<int32_t>>>();
  EngineOptions o;
  o.backend = "cpu";
  o.kv_cache_dtype = "bf16";
  if (!Engine::Create(std::string(EF_TEST_DATA) + "/" + GetParam(), o).ok()) {
    o.backend = "cuda";
    EXPECT_FALSE(Engine::Create(std::string(EF_TEST_DATA) + "/" + GetParam(), o).ok()) << GetParam();
    return;  // refused on both backends, as it should be
  }
  auto gpu = MakeEngine(GetParam(), "cuda", "bf16");
  auto cpu = MakeEngine(GetParam(), "cpu", "bf16");
  ASSERT_TRUE(gpu && cpu);
  auto a = AllLogits(*gpu, ids), b = AllLogits(*cpu, ids);
  ASSERT_EQ(a.size(), b.size());
  const double max_diff = MaxLogitDiff(a, b);
  EXPECT_LT(max_diff, 1e-4) << "max |cuda - cpu| logit, bf16 kv cache";
  std::printf("[ %s ] bf16 kv cache: max |cuda - cpu| logit = %.3g\n", GetParam().c_str(), max_diff);
}

// kv_cache_dtype "auto" on CUDA: bf16 exactly where the prefill attention runs in bf16 (plain
// attention), fp32 where it stays exact or the family reads fp32 keys (MLA, rope scaling, sinks:
// auto never refuses a model); the resolved cache gives bitwise the logits of naming it.
TEST_P(CudaReferenceTest, KvCacheAutoFollowsThePrefillAttentionPrecision) {
  json ref = ReadRef(GetParam());
  const auto ids = ref["input_ids"].get<std::vector<std::vector<int32_t>>>();
  auto make = [&](const std::string& precision, const std::string& kv_dtype) {
    EngineOptions o;
    o.backend = "cuda";
    o.attention_precision = precision;
    o.kv_cache_dtype = kv_dtype;
    auto e = Engine::Create(std::string(EF_TEST_DATA) + "/" + GetParam(), o);
    EXPECT_TRUE(e.ok()) << GetParam() << ", attention " << precision << ", kv " << kv_dtype << ": "
                        << e.status().ToString();
    return e.ok() ? std::move(e).value() : nullptr;
  };
  for (const char* precision : {"fp32", "bf16"}) {
    auto a = make(precision, "auto");
    ASSERT_NE(a, nullptr);
    const DType want = a->reduced_precision_attention() ? DType::kBF16 : DType::kF32;
    EXPECT_EQ(a->kv_cache_dtype(), want) << GetParam() << ", attention " << precision;
    if (std::string(precision) == "fp32") {
      EXPECT_EQ(a->kv_cache_dtype(), DType::kF32) << GetParam();
    }
    auto named = make(precision, want == DType::kBF16 ? "bf16" : "fp32");
    ASSERT_NE(named, nullptr);
    const auto x = AllLogits(*a, ids), y = AllLogits(*named, ids);
    ASSERT_EQ(x.size(), y.size());
    for (size_t i = 0; i < x.size(); ++i)
      testing::ExpectBitwiseEqual(x[i], y[i], (GetParam() + ", attention " + precision).c_str());
  }
}

// The paged KV cache on CUDA: the same serving-like run (chunked prefills past the tensor-core
// threshold, batched decode, a sequence replaced mid-run) gives bitwise the logits of the
// contiguous cache, through the exact fp32 attention, the tensor-core prefill and a bf16 cache.
TEST_P(CudaReferenceTest, PagedKvIsBitwiseTheContiguousCache) {
  auto make = [&](int block_size, const std::string& precision, const std::string& kv_dtype) {
    EngineOptions o;
    o.backend = "cuda";
    o.kv_block_size = block_size;
    o.attention_precision = precision;
    o.kv_cache_dtype = kv_dtype;
    o.max_seq_len = 64;  // the pool starts at 64 tokens: the run grows it (a copy on the device)
    auto e = Engine::Create(std::string(EF_TEST_DATA) + "/" + GetParam(), o);
    return e.ok() ? std::move(e).value() : nullptr;
  };
  int ran = 0;
  for (const char* precision : {"fp32", "bf16"})
    for (const char* kv_dtype : {"fp32", "bf16"}) {
      auto contiguous = make(0, precision, kv_dtype);
      if (!contiguous) continue;  // a bf16 cache on fp32-only attention: refused (tested elsewhere)
      ++ran;
      const std::vector<float> want = testing::PagedKvWorkload(*contiguous);
      for (int bs : {1, 16, 64}) {
        auto paged = make(bs, precision, kv_dtype);
        ASSERT_NE(paged, nullptr);
        const std::string what =
            GetParam() + ", attention " + precision + ", kv " + kv_dtype + ", block size " + std::to_string(bs);
        testing::ExpectBitwiseEqual(testing::PagedKvWorkload(*paged), want, what.c_str());
      }
    }
  EXPECT_GE(ran, 2) << "fp32 attention and the tensor-core prefill, at least with an fp32 cache";
}

TEST_P(CudaReferenceTest, GreedyKvCacheDecodeMatchesTransformers) {
  json ref = ReadRef(GetParam());
  auto engine = MakeEngine(GetParam(), "cuda");
  ASSERT_NE(engine, nullptr);
  const auto ids = ref["input_ids"].get<std::vector<std::vector<int32_t>>>();
  const auto want = ref["greedy_new_tokens"].get<std::vector<std::vector<int32_t>>>();
  std::vector<GenerateRequest> reqs;
  for (size_t b = 0; b < ids.size(); ++b) {
    GenerateRequest r;
    r.prompt = ids[b];
    r.max_new_tokens = static_cast<int>(want[b].size());
    r.ignore_eos = true;
    reqs.push_back(r);
  }
  auto out = Generate(*engine, reqs);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  for (size_t b = 0; b < ids.size(); ++b) EXPECT_EQ((*out)[b].tokens, want[b]) << "sequence " << b;
}

INSTANTIATE_TEST_SUITE_P(Families, CudaReferenceTest,
                         ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                                           "gpt_oss"));

// bf16 weights: top-1 agreement with transformers' fp32 logits over every position of every
// fixture, and the logits' NMSE, printed per family. Twice: with the exact attention and cache,
// and as a checkpoint of 16-bit weights runs by default (tensor-core prefill attention, and the
// bf16 KV cache kv_cache_dtype auto picks with it where the family's attention is plain).
TEST(CudaReferenceBf16, Top1AgreementAtLeast99Percent) {
  if (!testing::HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  if (!params::CudaBf16Weights()) GTEST_SKIP() << "run with EF_CUDA_BF16_WEIGHTS=1 (ctest: gpu_reference_bf16)";
  for (const char* precision : {"fp32", "bf16"}) {
    int agree = 0, total = 0;
    for (std::string fam : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"}) {
      json ref = ReadRef(fam);
      EngineOptions o;
      o.backend = "cuda";
      o.attention_precision = precision;
      auto created = Engine::Create(std::string(EF_TEST_DATA) + "/" + fam, o);
      ASSERT_TRUE(created.ok()) << fam << ": " << created.status().ToString();
      auto engine = std::move(created).value();
      if (std::string(precision) == "fp32") {
        ASSERT_EQ(engine->kv_cache_dtype(), DType::kF32) << fam;
      }
      const auto ids = ref["input_ids"].get<std::vector<std::vector<int32_t>>>();
      auto rows = AllLogits(*engine, ids);
      std::vector<float> got_all, want_all;
      int fam_agree = 0, fam_total = 0;
      size_t r = 0;
      for (size_t b = 0; b < ids.size(); ++b)
        for (size_t t = 0; t < ids[b].size(); ++t, ++r) {
          const auto want = ref["logits"][b][t].get<std::vector<float>>();
          const auto& got = rows[r];
          fam_agree += std::max_element(got.begin(), got.end()) - got.begin() ==
                       std::max_element(want.begin(), want.end()) - want.begin();
          ++fam_total;
          got_all.insert(got_all.end(), got.begin(), got.end());
          want_all.insert(want_all.end(), want.begin(), want.end());
        }
      std::printf("[ %s ] bf16 weights, attention %s, %s kv cache: top-1 agreement %d/%d, logits NMSE %.3g\n",
                  fam.c_str(), precision, engine->kv_cache_dtype() == DType::kBF16 ? "bf16" : "fp32", fam_agree,
                  fam_total, testing::Nmse(got_all, want_all));
      agree += fam_agree;
      total += fam_total;
    }
    EXPECT_GE(static_cast<double>(agree) / total, 0.99) << "attention " << precision << ": " << agree << "/" << total;
  }
}

// Decode with bf16 resident experts keeps the routing on the device (Backend::MoeRouted, no wait
// for the host per layer): the logits of every step are bitwise those of the host-routed path
// (forced by a routing hook, which needs the routing on the host), and observers see the same
// routing the hook sees. Families without shared experts (the routed path's condition).
TEST(CudaReferenceBf16, DeviceRoutedDecodeIsBitwiseTheHostRoutedDecode) {
  if (!testing::HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  if (!params::CudaBf16Weights()) GTEST_SKIP() << "run with EF_CUDA_BF16_WEIGHTS=1 (ctest: gpu_reference_bf16)";
  for (std::string fam : {"mixtral", "qwen3_moe", "olmoe"}) {
    json ref = ReadRef(fam);
    const auto prompt = ref["input_ids"][0].get<std::vector<int32_t>>();
    // Prefill, then 8 greedy steps; returns every step's logits and the routing seen per step.
    auto run = [&](bool hook, std::vector<bool>* routed_steps) {
      auto engine = MakeEngine(fam, "cuda");
      EXPECT_NE(engine, nullptr);
      std::vector<int32_t> seen;
      if (hook) {
        engine->AddRoutingHook([&](LayerRouting& r) {
          seen.insert(seen.end(), r.ids.begin(), r.ids.end());
          return Status::Ok();
        });
      } else {
        engine->AddRoutingObserver([&](LayerRouting& r) {
          seen.insert(seen.end(), r.ids.begin(), r.ids.end());
          return Status::Ok();
        });
      }
      std::vector<float> all;
      EXPECT_TRUE(engine->AddSequence(0).ok());
      // The prompt a token at a time: steps of one row (past two rows the layer is grouped and
      // sums in another order; DeviceRoutedBatchesMatchTheHostRoutedPath below).
      ForwardResult r;
      for (size_t i = 0; i < prompt.size(); ++i) {
        SeqChunk chunk{0, std::span<const int32_t>(&prompt[i], 1), false};
        EXPECT_TRUE(engine->Forward({&chunk, 1}, &r).ok());
        routed_steps->push_back(engine->last_forward_device_routed());
      }
      for (int step = 0; step < 8; ++step) {
        all.insert(all.end(), r.logits.begin(), r.logits.end());
        const std::vector<int32_t> next = {
            static_cast<int32_t>(std::max_element(r.logits.begin(), r.logits.end()) - r.logits.begin())};
        SeqChunk c{0, next, false};
        Status st = engine->Forward({&c, 1}, &r);
        EXPECT_TRUE(st.ok()) << st.ToString();
        routed_steps->push_back(engine->last_forward_device_routed());
      }
      all.insert(all.end(), r.logits.begin(), r.logits.end());
      return std::make_pair(all, seen);
    };
    std::vector<bool> routed, host_routed;
    const auto [logits_dev, seen_dev] = run(false, &routed);
    const auto [logits_host, seen_host] = run(true, &host_routed);
    for (size_t i = 0; i < routed.size(); ++i) EXPECT_TRUE(routed[i]) << fam << " step " << i;
    for (bool b : host_routed) EXPECT_FALSE(b) << fam << ": a routing hook needs the host path";
    EXPECT_EQ(seen_dev, seen_host) << fam << ": observers saw another routing";
    ASSERT_EQ(logits_dev.size(), logits_host.size());
    EXPECT_EQ(std::memcmp(logits_dev.data(), logits_host.data(), logits_dev.size() * sizeof(float)), 0)
        << fam << ": device-routed decode is not bitwise the host-routed decode";
  }
}

TEST(CudaReferenceBf16, DeviceRoutedBatchesMatchTheHostRoutedPath) {
  // Both prompts in one step (22 rows): the grouped layer (the pairs grouped by expert on the
  // device, tensor-core products) against the host-routed path (cuBLAS per expert), which round
  // the same operands to bf16 and sum in other orders; then a decode step of both sequences.
  if (!testing::HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  if (!params::CudaBf16Weights()) GTEST_SKIP() << "run with EF_CUDA_BF16_WEIGHTS=1 (ctest: gpu_reference_bf16)";
  for (std::string fam : {"mixtral", "qwen3_moe", "olmoe", "qwen2_moe"}) {
    json ref = ReadRef(fam);
    const auto ids = ref["input_ids"].get<std::vector<std::vector<int32_t>>>();
    int64_t vocab = 1;
    auto run = [&](bool hook, std::vector<bool>* routed) {
      auto engine = MakeEngine(fam, "cuda");
      EXPECT_NE(engine, nullptr);
      vocab = engine->config().vocab_size;
      if (hook) engine->AddRoutingHook([](LayerRouting&) { return Status::Ok(); });
      std::vector<SeqChunk> batch;
      for (size_t b = 0; b < ids.size(); ++b) {
        EXPECT_TRUE(engine->AddSequence(static_cast<int64_t>(b)).ok());
        batch.push_back(SeqChunk{static_cast<int64_t>(b), ids[b], true});
      }
      ForwardResult r;
      EXPECT_TRUE(engine->Forward(batch, &r).ok());
      routed->push_back(engine->last_forward_device_routed());
      std::vector<float> all = r.logits;
      for (size_t b = 0; b < ids.size(); ++b)
        batch[b] = SeqChunk{static_cast<int64_t>(b), std::span<const int32_t>(&ids[b].back(), 1), false};
      EXPECT_TRUE(engine->Forward(batch, &r).ok());
      routed->push_back(engine->last_forward_device_routed());
      all.insert(all.end(), r.logits.begin(), r.logits.end());
      return all;
    };
    std::vector<bool> routed, host_routed;
    const auto dev = run(false, &routed);
    const auto host = run(true, &host_routed);
    // qwen2_moe has shared experts: the host path, whatever the batch.
    const bool shared = fam == "qwen2_moe";
    for (bool b : routed) EXPECT_EQ(b, !shared) << fam;
    for (bool b : host_routed) EXPECT_FALSE(b) << fam;
    ASSERT_EQ(dev.size(), host.size());
    EXPECT_LE(testing::Nmse(dev, host), shared ? 0.0 : 1e-4) << fam;
    int agree = 0, rows = 0;
    for (size_t off = 0; off + vocab <= dev.size(); off += vocab, ++rows)
      agree += std::max_element(dev.begin() + off, dev.begin() + off + vocab) - dev.begin() ==
               std::max_element(host.begin() + off, host.begin() + off + vocab) - host.begin();
    EXPECT_GE(agree, rows - 1) << fam << ": top-1 of the grouped and host-routed paths";
  }
}

}  // namespace
}  // namespace ef::runtime
