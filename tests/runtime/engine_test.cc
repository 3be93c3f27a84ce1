// Engine: a prompt fed in one chunk, in pieces or token by token through the KV cache gives the
// same logits; sequences batched together give what each gives alone; routing hooks see every MoE
// layer, can rewrite the routing, stop a forward pass with their error and can be removed;
// observers see the routing the hooks left, layer by layer, and can be removed; bad
// calls (unknown or duplicate sequences, overflowing the context, out-of-range tokens) are errors;
// a bf16 KV cache agrees across chunkings and stays close to the fp32 one.
#include "runtime/engine/engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <vector>

#include "runtime/engine/sampler.h"

namespace ef::runtime {
namespace {

const std::string kTiny = std::string(EF_MODELS_DIR) + "/tiny-code-moe";
const std::vector<int32_t> kPrompt = {1, 483, 291, 1461, 272, 1191, 508, 10, 80, 33, 7};

std::unique_ptr<Engine> Make(int max_seq_len = 0, const std::string& kv_cache_dtype = "fp32") {
  EngineOptions o;
  o.backend = "cpu";
  o.max_seq_len = max_seq_len;
  o.kv_cache_dtype = kv_cache_dtype;
  auto e = Engine::Create(kTiny, o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return std::move(e).value();
}

// Logits of every position of `prompt` on sequence `seq`, fed in pieces of `step` tokens.
std::vector<float> Feed(Engine& e, int64_t seq, const std::vector<int32_t>& prompt, size_t step) {
  EXPECT_TRUE(e.AddSequence(seq).ok());
  std::vector<float> all;
  for (size_t first = 0; first < prompt.size(); first += step) {
    const size_t n = std::min(step, prompt.size() - first);
    SeqChunk c{seq, std::span<const int32_t>(prompt).subspan(first, n), true};
    ForwardResult r;
    Status s = e.Forward({&c, 1}, &r);
    EXPECT_TRUE(s.ok()) << s.ToString();
    all.insert(all.end(), r.logits.begin(), r.logits.end());
  }
  e.RemoveSequence(seq);
  return all;
}

void ExpectNear(const std::vector<float>& a, const std::vector<float>& b, float tol) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], tol) << "logit " << i;
}

TEST(EngineTest, ChunkedPrefillAndDecodeMatchOnePass) {
  auto e = Make();
  const auto whole = Feed(*e, 1, kPrompt, kPrompt.size());
  ExpectNear(Feed(*e, 2, kPrompt, 4), whole, 1e-4f);
  ExpectNear(Feed(*e, 3, kPrompt, 1), whole, 1e-4f);
}

// SeqChunk::token_only: the backend's argmax of each row is the host ArgMax of the same logits; a
// pass where every chunk asks brings no logits back, and its argmax stays the same.
TEST(EngineTest, ArgmaxOnlyChunksGetTheArgmaxOfTheirRows) {
  auto e = Make();
  const std::vector<int32_t> other = {5, 17, 99, 2048};
  ASSERT_TRUE(e->AddSequence(1).ok());
  ASSERT_TRUE(e->AddSequence(2).ok());
  ForwardResult mixed;
  std::vector<SeqChunk> chunks = {{1, kPrompt, true, true}, {2, other, false, false}};
  ASSERT_TRUE(e->Forward(chunks, &mixed).ok());
  const int V = e->config().vocab_size;
  const size_t rows = kPrompt.size() + 1;
  ASSERT_EQ(mixed.logits.size(), rows * V);
  ASSERT_EQ(mixed.tokens.size(), rows);
  for (size_t r = 0; r < rows; ++r)
    EXPECT_EQ(mixed.tokens[r], ArgMax(std::span<const float>(mixed.logits.data() + r * V, V))) << "row " << r;
  // A decode step of both with argmax only: the same tokens as the logits of a twin engine give.
  auto twin = Make();
  ASSERT_TRUE(twin->AddSequence(1).ok());
  ASSERT_TRUE(twin->AddSequence(2).ok());
  ForwardResult full;
  ASSERT_TRUE(twin->Forward(std::vector<SeqChunk>{{1, kPrompt, true}, {2, other, false}}, &full).ok());
  const int32_t a = mixed.tokens[kPrompt.size() - 1], b = mixed.tokens[kPrompt.size()];
  ForwardResult greedy;
  ASSERT_TRUE(e->Forward(std::vector<SeqChunk>{{1, {&a, 1}, false, true}, {2, {&b, 1}, false, true}}, &greedy).ok());
  EXPECT_TRUE(greedy.logits.empty());
  ASSERT_TRUE(twin->Forward(std::vector<SeqChunk>{{1, {&a, 1}, false}, {2, {&b, 1}, false}}, &full).ok());
  ASSERT_EQ(greedy.tokens.size(), 2u);
  EXPECT_TRUE(full.tokens.empty());
  for (int r = 0; r < 2; ++r)
    EXPECT_EQ(greedy.tokens[r], ArgMax(std::span<const float>(full.logits.data() + static_cast<size_t>(r) * V, V)));
}

// SeqChunk::sampling with token_only: the backend draws what runtime::SampleRow draws from the
// same logits; rows of chunks without it stay the arg max.
TEST(EngineTest, SampledTokenOnlyChunksDrawWhatTheHostDraws) {
  auto e = Make();
  auto twin = Make();
  const std::vector<int32_t> other = {5, 17, 99, 2048};
  for (auto* engine : {e.get(), twin.get()}) {
    ASSERT_TRUE(engine->AddSequence(1).ok());
    ASSERT_TRUE(engine->AddSequence(2).ok());
  }
  ForwardResult full;
  ASSERT_TRUE(twin->Forward(std::vector<SeqChunk>{{1, kPrompt, false}, {2, other, false}}, &full).ok());
  const int V = e->config().vocab_size;
  RowSampling s;
  s.inv_temperature = 1.f / 1.5f;
  s.top_p = 0.9f;
  s.top_k = 50;
  int differs = 0;
  for (double u : {0.0, 0.3, 0.77, 0.999}) {
    s.uniform = u;
    std::vector<SeqChunk> chunks = {{1, kPrompt, false, true}, {2, other, false, true}};
    chunks[0].sampling = s;
    // Forward commits the rows: a fresh engine for every draw.
    auto fresh = Make();
    ASSERT_TRUE(fresh->AddSequence(1).ok());
    ASSERT_TRUE(fresh->AddSequence(2).ok());
    ForwardResult r;
    ASSERT_TRUE(fresh->Forward(chunks, &r).ok());
    EXPECT_TRUE(r.logits.empty());
    ASSERT_EQ(r.tokens.size(), 2u);
    EXPECT_EQ(r.tokens[0], SampleRow(full.logits.data(), V, s)) << "uniform " << u;
    EXPECT_EQ(r.tokens[1], ArgMax(std::span<const float>(full.logits.data() + V, V)));
    differs += r.tokens[0] != ArgMax(std::span<const float>(full.logits.data(), V));
  }
  EXPECT_GT(differs, 0);  // the draws are not all the arg max
  // Drawn on the host instead (EngineOptions::backend_sampling false, as for a backend that does
  // not sample): the same tokens, and the logits come back.
  EngineOptions o;
  o.backend = "cpu";
  o.backend_sampling = false;
  auto host = Engine::Create(kTiny, o);
  ASSERT_TRUE(host.ok()) << host.status().ToString();
  ASSERT_TRUE((*host)->AddSequence(1).ok());
  ASSERT_TRUE((*host)->AddSequence(2).ok());
  s.uniform = 0.77;
  std::vector<SeqChunk> chunks = {{1, kPrompt, false, true}, {2, other, false, true}};
  chunks[0].sampling = s;
  ForwardResult r;
  ASSERT_TRUE((*host)->Forward(chunks, &r).ok());
  ASSERT_EQ(r.tokens.size(), 2u);
  EXPECT_EQ(r.logits, full.logits);
  EXPECT_EQ(r.tokens[0], SampleRow(full.logits.data(), V, s));
  EXPECT_EQ(r.tokens[1], ArgMax(std::span<const float>(full.logits.data() + V, V)));
}

TEST(EngineTest, WarmUpLeavesNothingBehind) {
  // A warm-up prefill and decode step on a sequence of its own: no sequence is left, later passes
  // give the bits they give on a fresh engine, and a prompt longer than the context is clamped.
  auto fresh = Make(64);
  const auto want = Feed(*fresh, 1, kPrompt, kPrompt.size());
  auto e = Make(64);
  auto t = e->WarmUp(1000);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_GT(*t, 0.0);
  EXPECT_FALSE(e->HasSequence(std::numeric_limits<int64_t>::max()));
  EXPECT_EQ(Feed(*e, 1, kPrompt, kPrompt.size()), want);
  ASSERT_TRUE(e->AddSequence(std::numeric_limits<int64_t>::max()).ok());  // the id is free again
  // A context of one token: the prefill alone.
  auto tiny = Make(1);
  EXPECT_TRUE(tiny->WarmUp(16).ok());
}

TEST(EngineTest, WarmUpIsHiddenFromRoutingHooksAndObservers) {
  auto e = Make(64);
  int hooked = 0, observed = 0;
  e->AddRoutingHook([&](LayerRouting&) {
    ++hooked;
    return Status::Ok();
  });
  e->AddRoutingObserver([&](LayerRouting&) {
    ++observed;
    return Status::Ok();
  });
  ASSERT_TRUE(e->WarmUp(8).ok());
  EXPECT_EQ(hooked, 0);
  EXPECT_EQ(observed, 0);
  Feed(*e, 1, kPrompt, kPrompt.size());  // and both are back afterwards
  EXPECT_GT(hooked, 0);
  EXPECT_GT(observed, 0);
}

// A bf16 KV cache: every chunking reads the same rounded keys and values (a prefill attends over
// the cache after its append), so they agree to fp32 summation order; against the fp32 engine the
// logits move by rounding only and the greedy choice at every position stays.
TEST(EngineTest, Bf16KvCacheIsConsistentAndCloseToFp32) {
  auto fp32 = Make(64);
  auto bf16 = Make(64, "bf16");
  const std::vector<float> want = Feed(*fp32, 1, kPrompt, kPrompt.size());
  const std::vector<float> whole = Feed(*bf16, 1, kPrompt, kPrompt.size());
  ExpectNear(Feed(*bf16, 2, kPrompt, 1), whole, 1e-4f);
  ExpectNear(Feed(*bf16, 3, kPrompt, 4), whole, 1e-4f);
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
  const int vocab = fp32->config().vocab_size;
  for (size_t p = 0; p < kPrompt.size(); ++p) {
    auto top = [&](const std::vector<float>& x) {
      return std::max_element(x.begin() + p * vocab, x.begin() + (p + 1) * vocab) - (x.begin() + p * vocab);
    };
    EXPECT_EQ(top(whole), top(want)) << "position " << p;
  }
}

TEST(EngineTest, KvCacheDTypeUnknownOrOnFp32OnlyAttentionIsRefused) {
  EngineOptions o;
  o.backend = "cpu";
  o.kv_cache_dtype = "fp16";
  auto e = Engine::Create(kTiny, o);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(e.status().message().find("kv cache dtype must be auto, fp32 or bf16, got 'fp16'"), std::string::npos)
      << e.status().ToString();
  o.kv_cache_dtype = "bf16";
  e = Engine::Create(std::string(EF_TEST_DATA) + "/gpt_oss", o);  // sinks and a sliding window
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("a bf16 kv cache needs plain attention"), std::string::npos)
      << e.status().ToString();
}

// kv_cache_dtype "auto" (the default) follows the prefill attention's precision: the cpu backend
// computes attention in fp32, so its cache stays fp32, also for models a bf16 cache refuses.
TEST(EngineTest, KvCacheDTypeAutoIsFp32OnTheCpu) {
  EngineOptions o;
  o.backend = "cpu";
  ASSERT_EQ(o.kv_cache_dtype, "auto");
  for (const std::string& dir : {kTiny, std::string(EF_TEST_DATA) + "/gpt_oss"}) {
    auto e = Engine::Create(dir, o);
    ASSERT_TRUE(e.ok()) << dir << ": " << e.status().ToString();
    EXPECT_EQ(e.value()->kv_cache_dtype(), DType::kF32) << dir;
    EXPECT_FALSE(e.value()->reduced_precision_attention()) << dir;
  }
  o.kv_cache_dtype = "bf16";
  auto e = Engine::Create(kTiny, o);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_EQ(e.value()->kv_cache_dtype(), DType::kBF16);
}

TEST(EngineTest, BatchedSequencesMatchEachAlone) {
  auto e = Make();
  const std::vector<int32_t> other = {1, 5, 77, 1024, 3000, 12};
  const auto a = Feed(*e, 1, kPrompt, kPrompt.size());
  const auto b = Feed(*e, 2, other, other.size());
  ASSERT_TRUE(e->AddSequence(10).ok());
  ASSERT_TRUE(e->AddSequence(11).ok());
  SeqChunk chunks[2] = {{10, kPrompt, true}, {11, other, true}};
  ForwardResult r;
  ASSERT_TRUE(e->Forward(chunks, &r).ok());
  const int V = e->config().vocab_size;
  ASSERT_EQ(r.row_offset.size(), 2u);
  std::vector<float> ga(r.logits.begin(), r.logits.begin() + r.row_offset[1] * V);
  std::vector<float> gb(r.logits.begin() + r.row_offset[1] * V, r.logits.end());
  ExpectNear(ga, a, 1e-4f);
  ExpectNear(gb, b, 1e-4f);
}

TEST(EngineTest, RoutingHooksSeeRewriteStopAndGoAway) {
  auto e = Make();
  const auto base = Feed(*e, 1, kPrompt, kPrompt.size());
  int calls = 0;
  const int id = e->AddRoutingHook([&](LayerRouting& r) {
    ++calls;
    EXPECT_EQ(r.num_tokens, static_cast<int>(kPrompt.size()));
    EXPECT_EQ(r.ids.size(), static_cast<size_t>(r.num_tokens * r.top_k));
    for (int32_t& x : r.ids) x = (x + 1) % e->config().num_experts;  // a different routing
    return Status::Ok();
  });
  const auto rewritten = Feed(*e, 2, kPrompt, kPrompt.size());
  EXPECT_EQ(calls, e->config().num_moe_layers());
  bool differs = false;
  for (size_t i = 0; i < base.size() && !differs; ++i) differs = std::fabs(base[i] - rewritten[i]) > 1e-3f;
  EXPECT_TRUE(differs) << "rewriting every layer's routing changed nothing";
  e->RemoveRoutingHook(id);
  ExpectNear(Feed(*e, 3, kPrompt, kPrompt.size()), base, 0.f);

  e->AddRoutingHook([](LayerRouting&) { return DataLoss("hook refused layer"); });
  ASSERT_TRUE(e->AddSequence(4).ok());
  SeqChunk c{4, kPrompt, false};
  ForwardResult r;
  const Status s = e->Forward({&c, 1}, &r);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_NE(s.ToString().find("hook refused layer"), std::string::npos) << s.ToString();
}

TEST(EngineTest, ObserversSeeWhatHooksSeeAfterThemAndGoAway) {
  auto e = Make();
  std::vector<int32_t> hooked, observed;
  std::vector<int> layers;
  const int hook = e->AddRoutingHook([&](LayerRouting& r) {
    hooked.insert(hooked.end(), r.ids.begin(), r.ids.end());
    return Status::Ok();
  });
  const int obs = e->AddRoutingObserver([&](LayerRouting& r) {
    observed.insert(observed.end(), r.ids.begin(), r.ids.end());
    layers.push_back(r.layer);
    EXPECT_EQ(r.weights.size(), r.ids.size());
    return Status::Ok();
  });
  Feed(*e, 1, kPrompt, 1);  // decode-sized steps: the batches a backend may route on the device
  EXPECT_FALSE(e->last_forward_device_routed()) << "the cpu backend has no device routing";
  EXPECT_EQ(observed, hooked);
  ASSERT_EQ(layers.size(), kPrompt.size() * e->config().num_moe_layers());
  for (size_t i = 0; i < layers.size(); ++i)
    EXPECT_EQ(layers[i], e->config().MoeLayers()[i % e->config().num_moe_layers()]) << "observer call " << i;
  e->RemoveRoutingHook(hook);
  e->RemoveRoutingHook(obs);
  const size_t seen = observed.size();
  Feed(*e, 2, kPrompt, kPrompt.size());
  EXPECT_EQ(observed.size(), seen) << "a removed observer still ran";
}

// A context past the positions the model was trained for is refused, naming both numbers.
TEST(EngineTest, ContextPastTheTrainedPositionsIsAnError) {
  EngineOptions o;
  o.backend = "cpu";
  o.max_seq_len = 4000;
  auto e = Engine::Create(kTiny, o);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("4000 is past the model's max_position_embeddings (1024)"), std::string::npos)
      << e.status().ToString();
  o.max_seq_len = 1024;
  EXPECT_TRUE(Engine::Create(kTiny, o).ok());
  o.max_seq_len = 4000;
  o.allow_untrained_positions = true;  // random-weight benchmarks
  EXPECT_TRUE(Engine::Create(kTiny, o).ok());
  // YaRN extends the trained positions to factor x original_max_position_embeddings (Qwen3's
  // documented long-context setup keeps max_position_embeddings as it was).
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / "qwen3_yarn";
  std::filesystem::create_directories(dir);
  const std::filesystem::path src = std::filesystem::path(EF_TEST_DATA) / "qwen3_moe";
  std::filesystem::copy_file(src / "model.safetensors", dir / "model.safetensors",
                             std::filesystem::copy_options::overwrite_existing);
  std::ifstream in(src / "config.json");
  nlohmann::json cfg = nlohmann::json::parse(in);
  const int trained = cfg["max_position_embeddings"].get<int>();
  cfg["rope_parameters"] = {
      {"rope_type", "yarn"}, {"rope_theta", 10000.0}, {"factor", 4.0}, {"original_max_position_embeddings", trained}};
  std::ofstream(dir / "config.json") << cfg.dump();
  EngineOptions y;
  y.backend = "cpu";
  y.max_seq_len = 4 * trained;
  auto ok = Engine::Create(dir.string(), y);
  EXPECT_TRUE(ok.ok()) << ok.status().ToString();
  y.max_seq_len = 4 * trained + 1;
  auto past = Engine::Create(dir.string(), y);
  ASSERT_FALSE(past.ok());
  EXPECT_NE(past.status().message().find("yarn factor x original_max_position_embeddings"), std::string::npos)
      << past.status().ToString();
}

// A config.json that says fewer layers than the checkpoint holds loads (the first layers are a
// model), with a warning naming the layers that will never run.
TEST(EngineTest, LayersPastTheConfigAreNamedInAWarning) {
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / "tiny_4_layers";
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(std::filesystem::path(kTiny) / "model.safetensors", dir / "model.safetensors",
                             std::filesystem::copy_options::overwrite_existing);
  std::ifstream in(std::filesystem::path(kTiny) / "config.json");
  nlohmann::json cfg = nlohmann::json::parse(in);
  const int layers = cfg["num_hidden_layers"].get<int>();
  cfg["num_hidden_layers"] = layers / 2;
  std::ofstream(dir / "config.json") << cfg.dump();
  EngineOptions o;
  o.backend = "cpu";
  ::testing::internal::CaptureStderr();
  auto e = Engine::Create(dir.string(), o);
  const std::string err = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_NE(err.find("holds decoder layers " + std::to_string(layers / 2) + ".." + std::to_string(layers - 1) +
                     " past config.json's num_hidden_layers"),
            std::string::npos)
      << err;
  ::testing::internal::CaptureStderr();
  EXPECT_TRUE(Engine::Create(kTiny, o).ok());
  EXPECT_EQ(::testing::internal::GetCapturedStderr().find("past config.json"), std::string::npos);
}

TEST(EngineTest, BadCallsAreErrors) {
  auto e = Make(/*max_seq_len=*/16);
  ASSERT_TRUE(e->AddSequence(1).ok());
  EXPECT_FALSE(e->AddSequence(1).ok());  // duplicate
  ForwardResult r;
  SeqChunk unknown{7, kPrompt, false};
  EXPECT_FALSE(e->Forward({&unknown, 1}, &r).ok());
  const std::vector<int32_t> too_long(17, 5);
  SeqChunk overflow{1, too_long, false};
  const Status s = e->Forward({&overflow, 1}, &r);
  EXPECT_FALSE(s.ok());
  const std::vector<int32_t> bad_token = {1, e->config().vocab_size};
  SeqChunk oov{1, bad_token, false};
  EXPECT_FALSE(e->Forward({&oov, 1}, &r).ok());
  // The sequence is still usable after refused calls.
  SeqChunk ok{1, std::span<const int32_t>(kPrompt).first(4), false};
  EXPECT_TRUE(e->Forward({&ok, 1}, &r).ok());
  EXPECT_EQ(e->SequenceLength(1), 4);
}

}  // namespace
}  // namespace ef::runtime
