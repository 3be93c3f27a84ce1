// Low-precision loads (cache.miss_precision int8 / int4) compute the model whose experts are the
// quantize-dequantize of the checkpoint's ("fake-quantized"), no more and no less: the CPU engine
// with the expert cache at the smallest budget against the CPU engine whose expert source hands
// out fp32 copies of the dequantized experts. Equality within fp32 rounding (the Gemm reads the
// same values in both; only F32 vs Q8G/Q4G row conversion order differs: none, in fact, since
// DequantizeRow is what both use), so 1e-6 relative.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <vector>

#include "cache/expert_cache.h"
#include "cache/expert_tiers.h"
#include "runtime/core/quant.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/expert_source.h"
#include "runtime/model/safetensors_file.h"
#include "tests/runtime/fake_quant.h"
#include "tests/runtime/prompt_run.h"

namespace ef::cache {
namespace {

using runtime::Engine;

// Every expert as fp32 values of Dequantize(Quantize(w)) (or w itself where the width does not
// allow the format's group, as the tiers keep those in the checkpoint's precision).
class FakeQuantSource final : public runtime::ExpertSource {
 public:
  // `layers` (optional, per decoder layer): only those layers' experts fake-quantized.
  static std::unique_ptr<FakeQuantSource> Create(const runtime::ModelWeights& m, DType t,
                                                 const std::vector<uint8_t>& layers = {}) {
    auto s = std::make_unique<FakeQuantSource>();
    const runtime::ModelConfig& c = m.config();
    for (int l : c.MoeLayers())
      for (int e = 0; e < c.num_experts; ++e) {
        const runtime::ExpertWeights& w = m.host_expert(l, e);
        runtime::ExpertWeights f = w;
        if (!layers.empty() && !layers[l]) {
          s->experts_[{l, e}] = f;
          continue;
        }
        runtime::Weight* to[] = {&f.gate, &f.up, &f.down};
        for (runtime::Weight* p : to) {
          const std::vector<float>& dst = s->store_.emplace_back(ef::testing::FakeQuantized(*p, t));
          *p = runtime::Weight{DType::kF32, dst.data(), p->rows, p->cols};
        }
        s->experts_[{l, e}] = f;
      }
    return s;
  }
  StatusOr<runtime::ExpertWeights> Acquire(int layer, int expert) override { return experts_.at({layer, expert}); }

 private:
  std::vector<std::vector<float>> store_;
  std::map<std::pair<int, int>, runtime::ExpertWeights> experts_;
};

double Distance(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
  return std::sqrt(num / den);
}

// The smallest cache: LRU over top-k slots per layer, loads on demand, in `precision`.
ExpertCacheOptions OnDemandLru(const runtime::ModelConfig& c, const std::string& precision) {
  ExpertCacheOptions o;
  o.policy = "lru";
  o.predictor = "none";
  o.prefetch_layers = 0;
  o.slots_per_layer = c.top_k;
  o.miss_precision = precision;
  return o;
}

// The prompt through `engine` with its experts from `source`.
ef::testing::PromptRun RunFrom(Engine& engine, runtime::ExpertSource* source, const std::vector<int32_t>& prompt) {
  engine.SetExpertSource(source);
  ef::testing::PromptRun run = ef::testing::RunPrompt(engine, prompt, 4);
  engine.SetExpertSource(nullptr);
  return run;
}

std::string ModelPath(const std::string& name) {
  return name == "tiny-code-moe" ? std::string(EF_MODELS_DIR) + "/tiny-code-moe"
                                 : std::string(EF_TEST_DATA) + "/" + name;
}

class LowPrecisionReferenceTest : public ::testing::TestWithParam<std::string> {};

TEST_P(LowPrecisionReferenceTest, CacheLoadsComputeTheFakeQuantizedModel) {
  runtime::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = Engine::Create(ModelPath(GetParam()), eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const std::vector<int32_t> prompt = {11, 42, 7, 99, 3, 150, 2, 77, 5};
  const ef::testing::PromptRun native = ef::testing::RunPrompt(**engine, prompt, 4);
  for (DType t : {DType::kQ8, DType::kQ4}) {
    auto fake = FakeQuantSource::Create((*engine)->weights(), t);
    const ef::testing::PromptRun want = RunFrom(**engine, fake.get(), prompt);
    const ExpertCacheOptions o = OnDemandLru((*engine)->config(), t == DType::kQ8 ? "int8" : "int4");
    auto cache = ExpertCache::Create(engine->get(), o);
    ASSERT_TRUE(cache.ok()) << cache.status().ToString();
    const ef::testing::PromptRun got = ef::testing::RunPrompt(**engine, prompt, 4);
    cache->reset();
    ASSERT_EQ(got.logits.size(), want.logits.size());
    EXPECT_LE(Distance(got.logits, want.logits), 1e-6)
        << GetParam() << " " << o.miss_precision << ": the fake-quantized model is "
        << Distance(want.logits, native.logits) << " from the native one";
    EXPECT_EQ(got.tokens, want.tokens) << GetParam() << " " << o.miss_precision;
    // The quantization itself moves the logits (so the comparison above could fail).
    EXPECT_GT(Distance(want.logits, native.logits), 1e-5) << GetParam() << " " << o.miss_precision;
    std::printf("[ low precision ] %s %s: fake-quantized model %.4g from the native one\n", GetParam().c_str(),
                o.miss_precision.c_str(), Distance(want.logits, native.logits));
  }
}

// A budget of every expert, in int4 slots: the cache stays on and every expert is int4 (turning it
// off would upload every expert in the checkpoint's precision, four times the memory asked for). In
// the checkpoint's precision the same budget turns the cache off.
TEST(LowPrecisionBudget, EveryExpertInLowPrecisionSlotsKeepsTheCacheOn) {
  runtime::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = Engine::Create(std::string(EF_MODELS_DIR) + "/tiny-code-moe", eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const std::vector<int32_t> prompt = {11, 42, 7, 99, 3, 150, 2, 77, 5};
  auto fake = FakeQuantSource::Create((*engine)->weights(), DType::kQ4);
  (*engine)->SetExpertSource(fake.get());
  const ef::testing::PromptRun want = ef::testing::RunPrompt(**engine, prompt, 4);
  (*engine)->SetExpertSource(nullptr);
  for (const char* precision : {"int4", "native"}) {
    ExpertCacheOptions o;
    o.policy = "lru";
    o.predictor = "none";
    o.prefetch_layers = 0;
    o.slots_per_layer = (*engine)->config().num_experts;
    o.miss_precision = precision;
    auto cache = ExpertCache::Create(engine->get(), o);
    ASSERT_TRUE(cache.ok()) << cache.status().ToString();
    if (std::string(precision) == "native") {
      EXPECT_FALSE((*cache)->active()) << (*cache)->Describe();
      continue;
    }
    ASSERT_TRUE((*cache)->active()) << (*cache)->Describe();
    EXPECT_NE((*cache)->Describe().find("8 of 8 slots per MoE layer"), std::string::npos) << (*cache)->Describe();
    const ef::testing::PromptRun got = ef::testing::RunPrompt(**engine, prompt, 4);
    cache->reset();
    EXPECT_LE(Distance(got.logits, want.logits), 1e-6);
    EXPECT_EQ(got.tokens, want.tokens);
  }
}

// cache.low_precision_layers: the selected layers' experts compute the fake-quantized model, the
// others the checkpoint's, and the loads say so (low-precision loads only in selected layers).
TEST_P(LowPrecisionReferenceTest, LowPrecisionLayersQuantizeOnlyThoseLayers) {
  runtime::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = Engine::Create(ModelPath(GetParam()), eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const runtime::ModelConfig& c = (*engine)->config();
  const std::vector<int> moe = c.MoeLayers();
  ASSERT_GE(moe.size(), 2u);
  const std::vector<int32_t> prompt = {11, 42, 7, 99, 3, 150, 2, 77, 5};
  auto layers = ResolveLowPrecisionLayers("last 50%", c);
  ASSERT_TRUE(layers.ok()) << layers.status().ToString();
  const size_t half = moe.size() / 2;  // "last 50%" rounds the low-precision layers down
  for (size_t i = 0; i < moe.size(); ++i) EXPECT_EQ((*layers)[moe[i]], i >= moe.size() - half ? 1 : 0) << i;

  auto all_fake = FakeQuantSource::Create((*engine)->weights(), DType::kQ8);
  const ef::testing::PromptRun every = RunFrom(**engine, all_fake.get(), prompt);
  auto fake = FakeQuantSource::Create((*engine)->weights(), DType::kQ8, *layers);
  const ef::testing::PromptRun want = RunFrom(**engine, fake.get(), prompt);

  ExpertCacheOptions o = OnDemandLru(c, "int8");
  o.low_precision_layers = "last 50%";
  auto cache = ExpertCache::Create(engine->get(), o);
  ASSERT_TRUE(cache.ok()) << cache.status().ToString();
  EXPECT_NE((*cache)->Describe().find("low precision in MoE layer"), std::string::npos) << (*cache)->Describe();
  const ef::testing::PromptRun got = ef::testing::RunPrompt(**engine, prompt, 4);
  ASSERT_EQ(got.logits.size(), want.logits.size());
  EXPECT_LE(Distance(got.logits, want.logits), 1e-6)
      << GetParam() << ": the half-quantized model is " << Distance(want.logits, every.logits)
      << " from the all-quantized one";
  EXPECT_EQ(got.tokens, want.tokens);
  // The selection changes the numbers (so the comparison above could fail either way).
  EXPECT_GT(Distance(want.logits, every.logits), 1e-5) << GetParam();
  // Loads by precision: the slot holds the checkpoint's bytes in unselected layers, int8 in the others.
  const ExpertTiers* tiers = (*cache)->tiers();
  ASSERT_NE(tiers, nullptr);
  EXPECT_EQ(tiers->num_native_layers(), static_cast<int>(moe.size() - half));
  for (int l : moe) {
    const bool low = (*layers)[l];
    EXPECT_EQ(tiers->LoadsLow(l, 0), low) << "layer " << l;
    EXPECT_EQ(IsQuantized(tiers->Layout(l, 0).gate.dtype), low) << "layer " << l;
  }
  const auto loads = tiers->loads_by_precision();
  EXPECT_GT(loads[0], 0);
  EXPECT_GT(loads[1], 0);
  cache->reset();

  // A budget in bytes: slots of each layer's size, more of them in the int8 layers; the same numbers.
  o.slots_per_layer = 0;
  auto native_slot = ExpertCache::PlanBudget(**engine, OnDemandLru(c, "native"));
  ASSERT_TRUE(native_slot.ok());
  o.device_budget_bytes = static_cast<uint64_t>(c.top_k) * moe.size() * native_slot->slot_bytes;
  cache = ExpertCache::Create(engine->get(), o);
  ASSERT_TRUE(cache.ok()) << cache.status().ToString();
  const CacheBudget& b = (*cache)->budget();
  ASSERT_FALSE(b.layer_slots.empty());
  int native_slots = 0, low_slots = 0;
  for (int l : moe) ((*layers)[l] ? low_slots : native_slots) += b.slots(l);
  EXPECT_GT(low_slots * (moe.size() - half), native_slots * half) << (*cache)->Describe();
  EXPECT_LE(b.total_bytes(), o.device_budget_bytes);
  EXPECT_NE((*cache)->Describe().find("slots of"), std::string::npos) << (*cache)->Describe();
  const ef::testing::PromptRun sized = ef::testing::RunPrompt(**engine, prompt, 4);
  EXPECT_LE(Distance(sized.logits, want.logits), 1e-6) << GetParam();
  EXPECT_EQ(sized.tokens, want.tokens);
  EXPECT_EQ((*cache)->StatsJson()["slots_per_moe_layer"].size(), moe.size());
  cache->reset();
}

// Slots are sized per layer: with some layers in the checkpoint's dtype, their slots are the
// checkpoint's size and the others int8's; a budget in slots gives every layer as many, one in
// bytes gives every layer the same bytes, so the int8 layers hold more.
TEST(LowPrecisionBudget, SlotsAreSizedPerLayerAndBytesBuyMoreSmallOnes) {
  runtime::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = Engine::Create(std::string(EF_MODELS_DIR) + "/tiny-code-moe", eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  ExpertCacheOptions o;
  o.slots_per_layer = 4;
  o.miss_precision = "native";
  auto native = ExpertCache::PlanBudget(**engine, o);
  o.miss_precision = "int8";
  auto every = ExpertCache::PlanBudget(**engine, o);
  o.low_precision_layers = "4-7";
  auto half = ExpertCache::PlanBudget(**engine, o);
  ASSERT_TRUE(native.ok() && every.ok() && half.ok());
  EXPECT_LT(every->slot_bytes, native->slot_bytes);
  EXPECT_EQ(half->slot_bytes, native->slot_bytes);
  EXPECT_TRUE(native->layer_slot_bytes.empty());
  EXPECT_TRUE(every->layer_slot_bytes.empty());
  ASSERT_EQ(half->layer_slot_bytes.size(), 8u);
  for (int l = 0; l < 8; ++l) {
    EXPECT_EQ(half->slot_bytes_of(l), l >= 4 ? every->slot_bytes : native->slot_bytes) << l;
    EXPECT_EQ(half->slots(l), 4) << l;
  }
  EXPECT_LT(half->total_bytes(), native->total_bytes());
  EXPECT_EQ(native->total_bytes(), 8u * 4 * native->slot_bytes);

  // In bytes: half of the checkpoint's experts.
  o.slots_per_layer = 0;
  o.device_budget_bytes = 8u * 4 * native->slot_bytes;
  auto bytes = ExpertCache::PlanBudget(**engine, o);
  ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
  int native_slots = 0, low_slots = 0;
  for (int l = 0; l < 8; ++l) (l >= 4 ? low_slots : native_slots) += bytes->slots(l);
  EXPECT_GE(native_slots, 4 * 4);
  EXPECT_GT(low_slots, native_slots);
  int fewest = bytes->num_experts;
  for (int l = 0; l < 8; ++l) fewest = std::min(fewest, bytes->slots(l));
  EXPECT_EQ(bytes->slots_per_layer, fewest);
  EXPECT_LE(bytes->total_bytes(), o.device_budget_bytes);
  // What one more slot costs would not fit in any layer that has room.
  for (int l = 0; l < 8; ++l)
    if (bytes->slots(l) < bytes->num_experts) {
      EXPECT_GT(bytes->total_bytes() + bytes->slot_bytes_of(l), o.device_budget_bytes) << l;
    }
  // Too little for top-k slots in the checkpoint's layers: an error naming top-k.
  o.device_budget_bytes = 8u * 2 * every->slot_bytes;
  auto small = ExpertCache::PlanBudget(**engine, o);
  ASSERT_FALSE(small.ok());
  EXPECT_NE(small.status().message().find("top-k"), std::string::npos) << small.status().ToString();
  // Every MoE layer int8 (slots sized per layer, all alike) and a budget of less than a slot.
  o.low_precision_layers = "0-7";
  o.device_budget_bytes = 1000;
  auto tiny = ExpertCache::PlanBudget(**engine, o);
  ASSERT_FALSE(tiny.ok());
  EXPECT_NE(tiny.status().message().find("0 slots of"), std::string::npos) << tiny.status().ToString();
  EXPECT_NE(tiny.status().message().find("top-k"), std::string::npos) << tiny.status().ToString();
  o.device_budget_bytes = 0;
  o.slots_per_layer = 4;
  for (const char* bad : {"8", "0-9", "last 0%", "last 101%", "3-1", "seven", "", "1,,2"}) {
    o.low_precision_layers = bad;
    auto b = ExpertCache::PlanBudget(**engine, o);
    ASSERT_FALSE(b.ok()) << "'" << bad << "'";
    EXPECT_NE(b.status().message().find("cache.low_precision_layers"), std::string::npos) << b.status().ToString();
  }
}

// cache.miss_precision lossless: the packed bf16 copies compute the checkpoint's model bit for bit
// on the CPU backend (same logits, same tokens) at the smallest budget, moving 0.77x the bytes of
// native loads (tiny-code-moe's rows of 128: 0.756x on Mixtral's shapes); a budget in bytes holds
// 1.3x the slots.
TEST(LowPrecisionBudget, LosslessLoadsAreBitwiseTheCheckpointsAtFewerBytes) {
  runtime::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = Engine::Create(std::string(EF_MODELS_DIR) + "/tiny-code-moe", eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const std::vector<int32_t> prompt = {11, 42, 7, 99, 3, 150, 2, 77, 5};
  std::map<std::string, int64_t> bytes;
  ef::testing::PromptRun native;
  for (const char* precision : {"native", "lossless"}) {
    const ExpertCacheOptions o = OnDemandLru((*engine)->config(), precision);
    auto cache = ExpertCache::Create(engine->get(), o);
    ASSERT_TRUE(cache.ok()) << cache.status().ToString();
    ASSERT_TRUE((*cache)->active());
    const ef::testing::PromptRun got = ef::testing::RunPrompt(**engine, prompt, 4);
    bytes[precision] = (*cache)->stats().total.bytes_from_host;
    if (std::string(precision) == "native") {
      native = got;
    } else {
      EXPECT_NE((*cache)->Describe().find("loads in lossless"), std::string::npos) << (*cache)->Describe();
      ASSERT_EQ(got.logits.size(), native.logits.size());
      EXPECT_EQ(0, std::memcmp(got.logits.data(), native.logits.data(), got.logits.size() * sizeof(float)));
      EXPECT_EQ(got.tokens, native.tokens);
    }
    cache->reset();
  }
  ASSERT_GT(bytes["native"], 0);
  const double ratio = static_cast<double>(bytes["lossless"]) / static_cast<double>(bytes["native"]);
  EXPECT_NEAR(ratio, 0.769, 0.001);
  std::printf("[ lossless ] tiny-code-moe: %.3fx the bytes of native loads, logits bitwise equal\n", ratio);

  ExpertCacheOptions o;
  o.slots_per_layer = 2;
  auto two = ExpertCache::PlanBudget(**engine, o);
  ASSERT_TRUE(two.ok()) << two.status().ToString();
  o.slots_per_layer = 0;
  o.device_budget_bytes = 8u * 4 * two->slot_bytes;  // 4 native slots a layer
  o.miss_precision = "lossless";
  auto packed = ExpertCache::PlanBudget(**engine, o);
  ASSERT_TRUE(packed.ok()) << packed.status().ToString();
  EXPECT_LT(packed->slot_bytes, two->slot_bytes * 78 / 100);
  EXPECT_EQ(packed->slots_per_layer, 5);  // 4 / 0.771 = 5.2
}

// int8 in the last half of the MoE layers, and the other half's loads packed losslessly
// (cache.high_precision lossless): the numbers of int8 in the last half alone (the packed layers
// compute the checkpoint's values exactly), fewer bytes for the same loads, and in a budget in
// bytes more slots in the packed layers than in bf16 ones.
TEST(LowPrecisionBudget, LosslessHighLayersBesideInt8Layers) {
  runtime::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = Engine::Create(std::string(EF_MODELS_DIR) + "/tiny-code-moe", eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const runtime::ModelConfig& c = (*engine)->config();
  const std::vector<int32_t> prompt = {11, 42, 7, 99, 3, 150, 2, 77, 5};
  auto layers = ResolveLowPrecisionLayers("last 50%", c);
  ASSERT_TRUE(layers.ok());
  auto fake = FakeQuantSource::Create((*engine)->weights(), DType::kQ8, *layers);
  const ef::testing::PromptRun want = RunFrom(**engine, fake.get(), prompt);
  std::map<std::string, int64_t> bytes;
  for (const char* high : {"native", "lossless"}) {
    ExpertCacheOptions o = OnDemandLru(c, "int8");
    o.low_precision_layers = "last 50%";
    o.high_precision = high;
    auto cache = ExpertCache::Create(engine->get(), o);
    ASSERT_TRUE(cache.ok()) << cache.status().ToString();
    const ef::testing::PromptRun got = ef::testing::RunPrompt(**engine, prompt, 4);
    EXPECT_LE(Distance(got.logits, want.logits), 1e-6) << high;
    EXPECT_EQ(got.tokens, want.tokens) << high;
    const ExpertTiers* tiers = (*cache)->tiers();
    ASSERT_NE(tiers, nullptr);
    for (int l : c.MoeLayers()) {
      const DType t = tiers->Layout(l, 0).gate.dtype;
      EXPECT_EQ(t, (*layers)[l] ? DType::kQ8 : std::string(high) == "lossless" ? DType::kPbf16 : DType::kBF16) << l;
    }
    if (std::string(high) == "lossless") {
      EXPECT_NE((*cache)->Describe().find("MoE layers lossless"), std::string::npos) << (*cache)->Describe();
    }
    EXPECT_GT(tiers->loads_by_precision()[0], 0) << high;
    EXPECT_GT(tiers->loads_by_precision()[1], 0) << high;
    bytes[high] = (*cache)->stats().total.bytes_from_host;
    cache->reset();
  }
  EXPECT_LT(bytes["lossless"], bytes["native"]);

  // A budget in bytes: the packed layers hold more slots than bf16 ones in the same bytes.
  ExpertCacheOptions o = OnDemandLru(c, "int8");
  o.low_precision_layers = "last 50%";
  o.slots_per_layer = 0;
  auto native_slot = ExpertCache::PlanBudget(**engine, OnDemandLru(c, "native"));
  ASSERT_TRUE(native_slot.ok());
  o.device_budget_bytes = 4ull * c.num_moe_layers() * native_slot->slot_bytes;
  auto plain = ExpertCache::PlanBudget(**engine, o);
  o.high_precision = "lossless";
  auto packed = ExpertCache::PlanBudget(**engine, o);
  ASSERT_TRUE(plain.ok() && packed.ok());
  for (int l : c.MoeLayers()) {
    if ((*layers)[l]) continue;
    EXPECT_LT(packed->slot_bytes_of(l), plain->slot_bytes_of(l)) << l;
    EXPECT_GE(packed->slots(l), plain->slots(l)) << l;
  }
  EXPECT_GT(packed->total_slots(), plain->total_slots());
  // With native (or lossless) loads no load is lossy: every layer packed, whatever layers are selected.
  for (const char* miss : {"native", "lossless"}) {
    ExpertCacheOptions e = OnDemandLru(c, miss);
    e.low_precision_layers = "last 50%";
    e.high_precision = "lossless";
    auto every = ExpertCache::Create(engine->get(), e);
    ASSERT_TRUE(every.ok()) << every.status().ToString();
    for (int l : c.MoeLayers())
      EXPECT_EQ((*every)->tiers()->Layout(l, 0).gate.dtype, DType::kPbf16) << miss << " " << l;
    every->reset();
  }
  // Not with auto, whose slots hold either precision; an unknown value names the key.
  o.miss_precision = "auto";
  auto bad = ExpertCache::PlanBudget(**engine, o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("cache.high_precision lossless does not combine"), std::string::npos);
  o.miss_precision = "int8";
  o.high_precision = "fp8";
  bad = ExpertCache::PlanBudget(**engine, o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("unknown cache.high_precision 'fp8'"), std::string::npos);
}

// A bf16 expert that the packed format cannot hold (more values far below their group's largest
// than its exceptions): lossless loads refuse the model at the cache's creation, naming the expert
// and what to do; native loads run it. (tiny-code-moe with one matrix of expert 3 of layer 5 made
// of values 2^0 and 2^-20 alternating.)
TEST(LowPrecisionBudget, LosslessNamesAnExpertThatCannotBePacked) {
  namespace fs = std::filesystem;
  const fs::path src = fs::path(EF_MODELS_DIR) / "tiny-code-moe";
  const fs::path dir = fs::temp_directory_path() / ("ef_unpackable_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const char* f : {"config.json", "generation_config.json", "tokenizer.json"}) fs::copy_file(src / f, dir / f);
  {
    auto file = runtime::SafetensorsFile::Open((src / "model.safetensors").string());
    ASSERT_TRUE(file.ok()) << file.status().ToString();
    std::vector<runtime::TensorToWrite> ts;
    std::vector<uint16_t> odd;
    for (const auto& [name, t] : (*file)->tensors()) {
      if (name == "model.layers.5.block_sparse_moe.experts.3.w1.weight") {
        odd.resize(static_cast<size_t>(t.numel()));
        for (size_t i = 0; i < odd.size(); ++i) odd[i] = i % 2 ? 0x3f80 : 0x35c0;  // 1 and 2^-20 * 1.5
        ts.push_back({name, t.dtype, t.shape, odd.data()});
      } else {
        ts.push_back({name, t.dtype, t.shape, t.data});
      }
    }
    ASSERT_FALSE(odd.empty());
    ASSERT_TRUE(runtime::WriteSafetensors((dir / "model.safetensors").string(), ts).ok());
  }
  runtime::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = Engine::Create(dir.string(), eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  auto lossless = ExpertCache::Create(engine->get(), OnDemandLru((*engine)->config(), "lossless"));
  ASSERT_FALSE(lossless.ok());
  const std::string& m = lossless.status().message();
  EXPECT_NE(m.find("expert 3 of layer 5"), std::string::npos) << m;
  EXPECT_NE(m.find("cannot be packed losslessly"), std::string::npos) << m;
  EXPECT_NE(m.find("cache.miss_precision and cache.high_precision native"), std::string::npos) << m;
  auto native = ExpertCache::Create(engine->get(), OnDemandLru((*engine)->config(), "native"));
  EXPECT_TRUE(native.ok()) << native.status().ToString();
  if (native.ok()) native->reset();  // gone before the engine
  engine->reset();
  fs::remove_all(dir);
}

TEST(LowPrecisionLayers, ParsesTheThreeForms) {
  auto all = ParseLowPrecisionLayers("all");
  ASSERT_TRUE(all.ok());
  EXPECT_TRUE(all->all);
  auto last = ParseLowPrecisionLayers("last 37.5%");
  ASSERT_TRUE(last.ok());
  EXPECT_FALSE(last->all);
  EXPECT_DOUBLE_EQ(last->last_percent, 37.5);
  auto ranges = ParseLowPrecisionLayers("16-31, 3,5-5");
  ASSERT_TRUE(ranges.ok()) << ranges.status().ToString();
  ASSERT_EQ(ranges->ranges.size(), 3u);
  EXPECT_EQ(ranges->ranges[0], std::make_pair(16, 31));
  EXPECT_EQ(ranges->ranges[1], std::make_pair(3, 3));
  EXPECT_EQ(ranges->ranges[2], std::make_pair(5, 5));
  for (const char* bad :
       {"", "last", "last %", "last 50", "last -5%", "last 0%", "1-", "-3", "a-b", "2.5", "4-2", "1,,2", "9999999999"})
    EXPECT_FALSE(ParseLowPrecisionLayers(bad).ok()) << "'" << bad << "'";
}

TEST(LowPrecisionLayers, ResolvesAgainstTheModel) {
  runtime::ModelConfig c;
  c.num_layers = 6;
  c.num_experts = 4;
  c.top_k = 2;
  c.mlp_only_layers = {0, 1};  // layers 0-1 dense: MoE layers 2-5
  ASSERT_EQ(c.MoeLayers(), (std::vector<int>{2, 3, 4, 5}));
  EXPECT_TRUE(ResolveLowPrecisionLayers("all", c)->empty());
  EXPECT_EQ(*ResolveLowPrecisionLayers("last 50%", c), (std::vector<uint8_t>{0, 0, 0, 0, 1, 1}));
  EXPECT_EQ(*ResolveLowPrecisionLayers("last 100%", c), (std::vector<uint8_t>{0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(*ResolveLowPrecisionLayers("last 30%", c), (std::vector<uint8_t>{0, 0, 0, 0, 0, 1}));
  // Rounded down: 62.5% of 4 layers is 2.5, so 2.
  EXPECT_EQ(*ResolveLowPrecisionLayers("last 62.5%", c), (std::vector<uint8_t>{0, 0, 0, 0, 1, 1}));
  EXPECT_EQ(*ResolveLowPrecisionLayers("last 75%", c), (std::vector<uint8_t>{0, 0, 0, 1, 1, 1}));
  // A range may span the dense layers; a single dense index may not.
  EXPECT_EQ(*ResolveLowPrecisionLayers("0-3", c), (std::vector<uint8_t>{0, 0, 1, 1, 0, 0}));
  EXPECT_EQ(*ResolveLowPrecisionLayers("2,4-5", c), (std::vector<uint8_t>{0, 0, 1, 0, 1, 1}));
  EXPECT_EQ(DescribeLayers(*ResolveLowPrecisionLayers("2,4-5", c)), "layers 2,4-5");
  EXPECT_EQ(DescribeLayers(*ResolveLowPrecisionLayers("3", c)), "layer 3");
  auto dense = ResolveLowPrecisionLayers("1", c);
  ASSERT_FALSE(dense.ok());
  EXPECT_NE(dense.status().message().find("layer 1 is a dense layer"), std::string::npos) << dense.status().ToString();
  auto past = ResolveLowPrecisionLayers("6", c);
  ASSERT_FALSE(past.ok());
  EXPECT_NE(past.status().message().find("past the model's 6 layers"), std::string::npos) << past.status().ToString();
  for (const char* none_of_them : {"last 10%", "0-1"}) {
    auto none = ResolveLowPrecisionLayers(none_of_them, c);
    ASSERT_FALSE(none.ok()) << none_of_them;
    EXPECT_NE(none.status().message().find("selects none"), std::string::npos) << none.status().ToString();
  }
}

INSTANTIATE_TEST_SUITE_P(Models, LowPrecisionReferenceTest, ::testing::Values("tiny-code-moe", "mixtral"));

}  // namespace
}  // namespace ef::cache
