// Decode steps as CUDA graphs (EngineOptions::cuda_graphs): replay gives bitwise the logits of the
// ops launched one by one, and a recording the backend cannot hold fails cleanly; the step's
// rotate-and-append op is bitwise its two ops.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "runtime/engine/engine.h"
#include "runtime/engine/sampler.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/runtime/paged_kv_workload.h"

namespace ef::runtime {
namespace {

std::string ModelDir(const std::string& name) {
  return name == "tiny-code-moe" ? std::string(EF_MODELS_DIR) + "/tiny-code-moe"
                                 : std::string(EF_TEST_DATA) + "/" + name;
}

std::unique_ptr<Engine> MakeCudaEngine(const std::string& model, bool graphs, const std::string& kv_dtype,
                                       int block_size) {
  EngineOptions o;
  o.backend = "cuda";
  o.max_seq_len = 128;  // the pool starts at 128 tokens: the runs below grow it (graphs recorded again)
  o.kv_block_size = block_size;
  o.kv_cache_dtype = kv_dtype;
  o.cuda_graphs = graphs;
  auto e = Engine::Create(ModelDir(model), o);
  return e.ok() ? std::move(e).value() : nullptr;
}

class CudaGraphTest : public ::testing::TestWithParam<std::string> {};

// tiny-code-moe (bf16: its steps keep the routing on the device, so they are recorded and
// replayed) and the fp32 fixtures (their steps run the step ops one by one): bitwise the logits of
// the batch ops, with 1, 2 (the per-pair MoE GEMV), 3 and 20 sequences (the grouped MoE kernel;
// 20: past the descriptors a launch carries inline); then greedy on the device (the arg max in
// the graph): the same tokens as the host's arg max of the eager logits; then sampled on the device
// (SampleRows in the graph): the tokens the host's SampleRow draws from the eager logits.
TEST_P(CudaGraphTest, ReplayIsBitwiseEager) {
  if (!testing::HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  const bool device_routed = GetParam() == "tiny-code-moe";
  for (const char* kv_dtype : {"fp32", "bf16"})
    for (int block_size : {1, 16}) {
      auto eager = MakeCudaEngine(GetParam(), false, kv_dtype, block_size);
      if (std::string(kv_dtype) == "fp32") {
        ASSERT_NE(eager, nullptr);
      }
      if (!eager) continue;  // a bf16 cache the model's attention cannot read: refused (tested elsewhere)
      auto graphed = MakeCudaEngine(GetParam(), true, kv_dtype, block_size);
      ASSERT_NE(graphed, nullptr);
      for (int seqs : {1, 2, 3, 20}) {
        const std::string what = GetParam() + ", kv " + kv_dtype + ", block " + std::to_string(block_size) + ", " +
                                 std::to_string(seqs) + " sequences";
        const std::vector<float> want = testing::DecodeWorkload(*eager, seqs, 30);
        ASSERT_FALSE(want.empty());
        const Engine::GraphStats before = graphed->graph_stats();
        testing::ExpectBitwiseEqual(testing::DecodeWorkload(*graphed, seqs, 30), want, what.c_str());
        const Engine::GraphStats& after = graphed->graph_stats();
        EXPECT_EQ(after.refused, before.refused) << what;
        if (device_routed) {
          EXPECT_GT(after.recorded, before.recorded) << what;
          EXPECT_GE(after.replayed - before.replayed, 10)
              << what << ": recorded " << after.recorded << ", replayed " << after.replayed;
        } else {
          EXPECT_EQ(after.replayed, 0) << what << ": host-routed steps are not recorded";
        }
        // Greedy: the tokens the host's arg max picks from the eager logits.
        std::vector<float> tokens = testing::DecodeWorkload(*eager, seqs, 30);
        const int V = eager->config().vocab_size;
        const std::vector<float> on_device = testing::DecodeWorkload(*graphed, seqs, 30, /*token_only=*/true);
        std::vector<float> picked;
        for (size_t row = 0; row * V < tokens.size(); ++row)
          picked.push_back(static_cast<float>(ArgMax(std::span<const float>(tokens.data() + row * V, V))));
        testing::ExpectBitwiseEqual(on_device, picked, (what + ", greedy on the device").c_str());
        // Sampled on the device (SampleRows in the graph, its draws uploaded every step): the tokens
        // runtime::SampleRow draws from the eager logits with the same draws.
        RowSampling sampling;
        sampling.inv_temperature = 1.f / 1.3f;
        sampling.top_p = 0.9f;
        sampling.top_k = 40;
        const Engine::GraphStats before_sampled = graphed->graph_stats();
        testing::ExpectBitwiseEqual(testing::DecodeWorkload(*graphed, seqs, 30, /*token_only=*/true, &sampling),
                                    testing::DecodeWorkload(*eager, seqs, 30, /*token_only=*/false, &sampling),
                                    (what + ", sampled on the device").c_str());
        if (device_routed) {
          EXPECT_GE(graphed->graph_stats().replayed - before_sampled.replayed, 10) << what;
        }
      }
      EXPECT_EQ(eager->graph_stats().replayed, 0);
    }
}

INSTANTIATE_TEST_SUITE_P(Models, CudaGraphTest, ::testing::Values("tiny-code-moe", "mixtral", "qwen3_moe"),
                         [](const auto& info) {
                           return info.param == "tiny-code-moe" ? std::string("tiny") : info.param;
                         });

// A recording that asks for a host transfer fails at EndGraph, nothing of it runs, and the backend
// stays healthy: the same ops then run as usual.
TEST(CudaGraphBackendTest, RefusedRecordingLeavesTheBackendHealthy) {
  if (!testing::HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  auto b = testing::MakeTestCudaBackend();
  ASSERT_NE(b, nullptr);
  auto buf = b->Allocate(64 * sizeof(float));
  ASSERT_TRUE(buf.ok());
  std::vector<float> host(64, 2.f), back(64, -1.f);
  b->CopyToDevice(buf->data(), host.data(), 64 * sizeof(float));

  ASSERT_TRUE(b->BeginGraph().ok());
  b->Add(buf->f32(), buf->f32(), 64);  // recorded, not run
  b->CopyToHost(back.data(), buf->data(), 64 * sizeof(float));
  auto refused = b->EndGraph();
  EXPECT_EQ(refused.status().code(), StatusCode::kUnavailable) << refused.status().ToString();
  EXPECT_NE(refused.status().message().find("device-to-host"), std::string::npos) << refused.status().ToString();
  EXPECT_TRUE(b->status().ok()) << b->status().ToString();
  b->CopyToHost(back.data(), buf->data(), 64 * sizeof(float));
  EXPECT_EQ(back[0], 2.f) << "the refused recording ran nothing";

  // A recording of device work only: replayed twice, it doubles twice.
  ASSERT_TRUE(b->BeginGraph().ok());
  b->Add(buf->f32(), buf->f32(), 64);
  auto g = b->EndGraph();
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  b->CopyToHost(back.data(), buf->data(), 64 * sizeof(float));
  EXPECT_EQ(back[0], 2.f) << "recording runs nothing";
  ASSERT_TRUE(b->LaunchGraph(*g).ok());
  ASSERT_TRUE(b->LaunchGraph(*g).ok());
  b->CopyToHost(back.data(), buf->data(), 64 * sizeof(float));
  EXPECT_EQ(back[63], 8.f);
  EXPECT_FALSE(b->LaunchGraph(*g + 1).ok());
  b->DropGraphs();
  EXPECT_FALSE(b->LaunchGraph(*g).ok());
  EXPECT_TRUE(b->status().ok()) << b->status().ToString();
}

// The step's rotate-and-append against RoPE then the appends, both on the step's descriptors:
// q and k rotated in place and the cache rows written, bitwise the same, for fp32 and bf16 caches,
// GQA 4 at head_dim 128, MHA at 64 (theta 1e4) and GQA 3 at 32, five sequences of a paged cache
// (one empty before this step, one at a block boundary) at positions up to 1e6; rows that no
// sequence owns stay untouched.
TEST(CudaStepOpsTest, RotateAndAppendIsRopeThenAppend) {
  if (!testing::HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  struct Shape {
    int heads, kv_heads, hd;
  };
  const std::vector<int> lens = {0, 3, 16, 40, 129};
  const int S = static_cast<int>(lens.size()), bs = 16;
  for (bool bf16 : {false, true})
    for (Shape sh : {Shape{32, 8, 128}, Shape{4, 4, 64}, Shape{6, 2, 32}}) {
      SCOPED_TRACE(std::string(bf16 ? "bf16" : "fp32") + " cache, heads " + std::to_string(sh.heads) + "/" +
                   std::to_string(sh.kv_heads) + " x " + std::to_string(sh.hd));
      auto b = testing::MakeTestCudaBackend();
      ASSERT_NE(b, nullptr);
      ASSERT_TRUE(b->SetKvCacheDType(bf16 ? DType::kBF16 : DType::kF32));
      testing::DeviceArrays d(b.get());
      const int qd = sh.heads * sh.hd, kvd = sh.kv_heads * sh.hd;
      // Each sequence's blocks, spread over the pool in reverse order.
      int num_blocks = 0;
      for (int len : lens) num_blocks += len / bs + 1;
      std::vector<std::vector<int32_t>> tables(S);
      int next = num_blocks - 1;
      for (int s = 0; s < S; ++s)
        for (int i = 0; i <= lens[s] / bs; ++i) tables[s].push_back(next--);
      std::vector<AttentionSeq> step(S);
      std::vector<int32_t> pos(S);
      for (int s = 0; s < S; ++s) {
        step[s] = AttentionSeq{nullptr, nullptr, s, 1, lens[s] + 1, d.Put(tables[s]), bs};
        pos[s] = lens[s] + 250000 * s;  // angles well past the first turns (the cache rows follow lens)
      }
      ASSERT_TRUE(b->UploadStepSeqs(step.data(), S, sh.heads, sh.kv_heads, sh.hd).ok());
      const size_t pool_bytes = static_cast<size_t>(num_blocks) * bs * kvd * (bf16 ? 2 : 4);
      // Pools compared as bits: a filler pattern where no row is written.
      std::vector<uint32_t> pool_init(pool_bytes / sizeof(uint32_t));
      for (size_t i = 0; i < pool_init.size(); ++i) pool_init[i] = static_cast<uint32_t>(i * 2654435761u);
      const auto q = testing::RandomFloats(S * qd, 71, -2, 2), k = testing::RandomFloats(S * kvd, 72, -2, 2),
                 v = testing::RandomFloats(S * kvd, 73, -2, 2);
      const int32_t* pos_dev = d.Put(pos);
      const float* v_dev = d.Put(v);
      float *q1 = d.Put(q), *k1 = d.Put(k), *q2 = d.Put(q), *k2 = d.Put(k);
      uint32_t *kp1 = d.Put(pool_init), *vp1 = d.Put(pool_init), *kp2 = d.Put(pool_init), *vp2 = d.Put(pool_init);
      const float theta = sh.hd == 64 ? 1e4f : 1e6f;
      b->RopeQK(q1, k1, pos_dev, S, sh.heads, sh.kv_heads, sh.hd, theta);
      b->AppendKvStep(kp1, vp1, k1, v_dev, kvd, kvd);
      ASSERT_TRUE(b->RopeQKAppendStep(q2, k2, v_dev, pos_dev, sh.heads, sh.kv_heads, sh.hd, theta, kp2, vp2));
      const size_t pool_words = pool_init.size();
      const auto want_k = d.Get(kp1, pool_words), want_v = d.Get(vp1, pool_words);
      EXPECT_EQ(d.Get(q2, S * qd), d.Get(q1, S * qd));
      EXPECT_EQ(d.Get(k2, S * kvd), d.Get(k1, S * kvd));
      EXPECT_EQ(d.Get(kp2, pool_words), want_k);
      EXPECT_EQ(d.Get(vp2, pool_words), want_v);
      EXPECT_NE(want_k, pool_init) << "the appends wrote nothing";
      EXPECT_NE(d.Get(q1, S * qd), q) << "nothing was rotated";
      b->Synchronize();
      ASSERT_TRUE(b->status().ok()) << b->status().ToString();
    }
}

}  // namespace
}  // namespace ef::runtime
