// Synthetic checkpoints (launch/synthetic_model.h): the deepseek-v3 (block FP8) and gpt-oss-120b
// (MXFP4 experts) shapes write the published config keys and tensor layouts, load through the
// engine's deepseek_v3 and gpt_oss paths on the CPU backend, and the loaded weights equal this
// file's own dequantization of the written bytes, bit for bit; scaling keeps groups and blocks
// valid; an unknown shape names every known one.
#include "launch/synthetic_model.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "runtime/core/block_scaled.h"
#include "runtime/core/dtype.h"
#include "runtime/engine/engine.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/checkpoint_quant.h"
#include "runtime/model/model_config.h"
#include "runtime/model/safetensors_file.h"

namespace ef::launch {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using runtime::ModelConfig;
using runtime::TensorView;

json ReadJson(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in, nullptr, /*allow_exceptions=*/false);
}

SyntheticShape Shape(const std::string& name, int layers, int scale) {
  auto s = FindSyntheticShape(name);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  auto scaled = ScaleSyntheticShape(*s, layers, scale);
  EXPECT_TRUE(scaled.ok()) << scaled.status().ToString();
  return *scaled;
}

ModelConfig Parse(const SyntheticShape& s) {
  auto c = ModelConfig::FromJson(SyntheticConfigJson(s), "synthetic " + s.name);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? *c : ModelConfig{};
}

// The values of weight w as fp32: BF16 converted, packed (routed experts) rows dequantized.
std::vector<float> Values(const runtime::Weight& w) {
  std::vector<float> v(static_cast<size_t>(w.rows * w.cols));
  if (IsBlockScaled(w.dtype)) {
    for (int64_t r = 0; r < w.rows; ++r) DequantizeBlockScaledRow(w.dtype, w.data, w.rows, w.cols, r, &v[r * w.cols]);
  } else {
    ConvertToF32(w.dtype, w.data, v.data(), v.size());
  }
  return v;
}

// Counts the elements of weight `got` [rows, cols] (dtype `dtype`) whose value differs from
// want(r, c): bit for bit after rounding want to bf16 for BF16 weights, exactly for packed ones
// (their values are the fp32 products themselves).
template <typename Want>
void ExpectWeightEquals(const runtime::Weight& got, DType dtype, int64_t rows, int64_t cols, const Want& want,
                        const std::string& what) {
  ASSERT_EQ(got.dtype, dtype) << what;
  ASSERT_EQ(got.rows, rows) << what;
  ASSERT_EQ(got.cols, cols) << what;
  const std::vector<float> v = Values(got);
  int64_t wrong = 0, first = -1;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float w = dtype == DType::kBF16 ? Bf16ToF32(F32ToBf16(want(r, c))) : want(r, c);
      if (v[r * cols + c] != w && wrong++ == 0) first = r * cols + c;
    }
  EXPECT_EQ(wrong, 0) << what << ": first at " << first;
}

class SyntheticModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("ef_synthetic_test_" + std::to_string(::getpid()) + "_" +
                                         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
  }
  void TearDown() override { fs::remove_all(root_); }

  std::string Write(const SyntheticShape& s) {
    auto dir = WriteSyntheticCheckpoint(s, /*seed=*/1, root_.string());
    EXPECT_TRUE(dir.ok()) << dir.status().ToString();
    return dir.ok() ? *dir : "";
  }
  // With `weights`, the checkpoint built in memory (dir then holds only the config and tokenizer).
  static std::unique_ptr<runtime::Engine> Open(const std::string& dir,
                                               std::shared_ptr<const runtime::Checkpoint> weights = nullptr) {
    runtime::EngineOptions o;
    o.backend = "cpu";
    o.max_seq_len = 64;
    o.checkpoint = std::move(weights);
    auto e = runtime::Engine::Create(dir, o);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    return e.ok() ? std::move(e).value() : nullptr;
  }
  static std::unique_ptr<runtime::SafetensorsFile> Shard(const std::string& dir, int layer) {
    char file[64];
    std::snprintf(file, sizeof(file), "/model-layer-%05d.safetensors", layer);
    auto f = runtime::SafetensorsFile::Open(dir + file);
    EXPECT_TRUE(f.ok()) << f.status().ToString();
    return f.ok() ? std::move(f).value() : nullptr;
  }
  // A prompt and one decode step give finite logits over the vocabulary that are not all equal.
  static void ExpectFiniteLogits(runtime::Engine& e) {
    ASSERT_TRUE(e.AddSequence(0).ok());
    const std::vector<int32_t> prompt = {1, 40, 41, 42, 97, 120, 7};
    for (const std::vector<int32_t>& tokens : {prompt, std::vector<int32_t>{55}}) {
      runtime::SeqChunk chunk{0, tokens, false};
      runtime::ForwardResult r;
      const Status s = e.Forward({&chunk, 1}, &r);
      ASSERT_TRUE(s.ok()) << s.ToString();
      ASSERT_EQ(r.logits.size(), static_cast<size_t>(e.config().vocab_size));
      float lo = r.logits[0], hi = r.logits[0];
      for (float v : r.logits) {
        ASSERT_TRUE(std::isfinite(v));
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
      EXPECT_LT(lo, hi);
    }
    e.RemoveSequence(0);
  }
  // The keys of tests/data/<family>/config.json that a published config.json also has: less
  // transformers 5's rope_parameters (published: rope_theta + rope_scaling), dtype (published:
  // torch_dtype) and transformers_version.
  static std::set<std::string> FixtureKeys(const std::string& family) {
    std::set<std::string> keys;
    const json fixture = ReadJson(fs::path(EF_TEST_DATA) / family / "config.json");
    for (const auto& [k, v] : fixture.items())
      if (k != "rope_parameters" && k != "dtype" && k != "transformers_version") keys.insert(k);
    EXPECT_GT(keys.size(), 20u) << family;
    return keys;
  }

  fs::path root_;
};

TEST_F(SyntheticModelTest, UnknownShapeNamesEveryShape) {
  auto s = FindSyntheticShape("deepseek-v4");
  ASSERT_FALSE(s.ok());
  for (const std::string& name : SyntheticShapeNames())
    EXPECT_NE(s.status().message().find(name), std::string::npos) << s.status().ToString();
  for (const char* name : {"deepseek-v3", "gpt-oss-120b"})
    EXPECT_NE(s.status().message().find(name), std::string::npos) << s.status().ToString();
}

TEST_F(SyntheticModelTest, DeepseekV3ConfigHasThePublishedKeysAndShape) {
  const SyntheticShape s = Shape("deepseek-v3", 0, 1);
  const json j = json::parse(SyntheticConfigJson(s));
  for (const std::string& k : FixtureKeys("deepseek_v3")) EXPECT_TRUE(j.contains(k)) << k;
  for (const char* k :
       {"rope_theta", "rope_scaling", "torch_dtype", "quantization_config", "topk_method", "scoring_func"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["quantization_config"],
            json::parse(R"({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]})"));
  const ModelConfig c = Parse(s);
  EXPECT_EQ(c.family, runtime::ModelFamily::kDeepseekV3);
  EXPECT_EQ(c.vocab_size, 129280);
  EXPECT_EQ(c.hidden_size, 7168);
  EXPECT_EQ(c.num_layers, 61);
  EXPECT_EQ(c.num_moe_layers(), 58);  // first_k_dense_replace 3
  EXPECT_EQ(c.intermediate_size, 18432);
  EXPECT_EQ(c.num_experts, 256);
  EXPECT_EQ(c.moe_intermediate_size, 2048);
  EXPECT_EQ(c.shared_expert_intermediate_size, 2048);
  EXPECT_EQ(c.top_k, 8);
  EXPECT_EQ(c.n_group, 8);
  EXPECT_EQ(c.topk_group, 4);
  EXPECT_EQ(c.router_scoring, runtime::RouterScoring::kSigmoid);
  EXPECT_EQ(c.topk_method, runtime::TopkMethod::kNoAuxTc);
  EXPECT_TRUE(c.score_correction_bias);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_FLOAT_EQ(c.routed_scaling_factor, 2.5f);
  EXPECT_TRUE(c.mla);
  EXPECT_EQ(c.num_heads, 128);
  EXPECT_EQ(c.q_lora_rank, 1536);
  EXPECT_EQ(c.kv_lora_rank, 512);
  EXPECT_EQ(c.qk_nope_head_dim, 128);
  EXPECT_EQ(c.qk_rope_head_dim, 64);
  EXPECT_EQ(c.v_head_dim, 128);
  EXPECT_EQ(c.rope.type, "yarn");
  EXPECT_FLOAT_EQ(c.rope.factor, 40.f);
  EXPECT_FLOAT_EQ(c.rope.mscale_all_dim, 1.f);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 4096);
  EXPECT_EQ(c.quant.method, runtime::WeightQuant::kFp8);
  EXPECT_EQ(c.quant.block_rows, 128);
  EXPECT_EQ(c.quant.block_cols, 128);
}

TEST_F(SyntheticModelTest, GptOss120bConfigHasThePublishedKeysAndShape) {
  const SyntheticShape s = Shape("gpt-oss-120b", 0, 1);
  const json j = json::parse(SyntheticConfigJson(s));
  for (const std::string& k : FixtureKeys("gpt_oss")) EXPECT_TRUE(j.contains(k)) << k;
  for (const char* k : {"rope_theta", "rope_scaling", "torch_dtype", "quantization_config", "swiglu_limit"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["quantization_config"]["quant_method"], "mxfp4");
  EXPECT_EQ(j["rope_scaling"], json::parse(R"({"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
      "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": false})"));
  const ModelConfig c = Parse(s);
  EXPECT_EQ(c.family, runtime::ModelFamily::kGptOss);
  EXPECT_EQ(c.vocab_size, 201088);
  EXPECT_EQ(c.hidden_size, 2880);
  EXPECT_EQ(c.num_layers, 36);
  EXPECT_EQ(c.num_moe_layers(), 36);
  EXPECT_EQ(c.num_experts, 128);
  EXPECT_EQ(c.top_k, 4);
  EXPECT_EQ(c.moe_intermediate_size, 2880);
  EXPECT_EQ(c.num_heads, 64);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_TRUE(c.attention_sinks);
  EXPECT_EQ(c.sliding_window, 128);
  ASSERT_EQ(c.sliding_layers.size(), 36u);
  for (int l = 0; l < 36; ++l) EXPECT_EQ(c.sliding_layers[l], l % 2 == 0) << l;
  EXPECT_FLOAT_EQ(c.swiglu_limit, 7.f);
  EXPECT_FLOAT_EQ(c.rope.theta, 150000.f);
  EXPECT_EQ(c.rope.type, "yarn");
  EXPECT_FLOAT_EQ(c.rope.factor, 32.f);
  EXPECT_FALSE(c.rope.truncate);
  EXPECT_EQ(c.quant.method, runtime::WeightQuant::kMxfp4);
}

TEST_F(SyntheticModelTest, ScalingKeepsGroupsBlocksAndAMoeLayer) {
  for (int scale : {1, 2, 3, 7, 16, 32, 64, 100, 256, 4096}) {
    for (int layers : {0, 1, 2, 3, 5}) {
      SCOPED_TRACE("scale " + std::to_string(scale) + ", layers " + std::to_string(layers));
      const SyntheticShape ds = Shape("deepseek-v3", layers, scale);
      const ModelConfig d = Parse(ds);
      EXPECT_EQ(d.num_experts, 256);
      EXPECT_EQ(d.top_k, 8);
      EXPECT_EQ(d.n_group, 8);
      EXPECT_EQ(d.topk_group, 4);
      EXPECT_GE(d.num_moe_layers(), 1);
      EXPECT_EQ(d.num_layers - d.num_moe_layers(), layers == 0 ? 3 : std::min(3, layers - 1));
      EXPECT_EQ(d.quant.block_rows, 128);  // partial edge blocks where a width is not a multiple
      EXPECT_EQ(d.quant.block_cols, 128);
      EXPECT_EQ(d.qk_rope_head_dim % 2, 0);
      EXPECT_GE(d.kv_lora_rank, 8);
      EXPECT_EQ(d.shared_expert_intermediate_size, d.moe_intermediate_size);

      const SyntheticShape gs = Shape("gpt-oss-120b", layers, scale);
      const ModelConfig g = Parse(gs);
      EXPECT_EQ(g.num_experts, 128);
      EXPECT_EQ(g.top_k, 4);
      EXPECT_EQ(g.hidden_size % 32, 0) << g.hidden_size;  // MXFP4 groups of 32 inputs
      EXPECT_EQ(g.moe_intermediate_size % 32, 0) << g.moe_intermediate_size;
      EXPECT_LE(g.hidden_size, 2880);
      EXPECT_EQ(g.num_layers, layers == 0 ? 36 : layers);
      ASSERT_EQ(g.sliding_layers.size(), static_cast<size_t>(g.num_layers));
      for (int l = 0; l < g.num_layers; ++l) EXPECT_EQ(g.sliding_layers[l], l % 2 == 0);
      EXPECT_EQ(g.num_heads % g.num_kv_heads, 0);
    }
  }
  // Scale 32 (the tests below): 2880 / 32 = 90 rounds down to 88 in steps of 8, then up to 96.
  EXPECT_EQ(Shape("gpt-oss-120b", 2, 32).hidden_size, 96);
  EXPECT_EQ(Shape("deepseek-v3", 2, 32).hidden_size, 224);  // two FP8 column blocks, the second partial
}

TEST_F(SyntheticModelTest, DeepseekV3LoadsBlockFp8WeightsExactly) {
  const SyntheticShape s = Shape("deepseek-v3", 3, 32);
  const std::string dir = Write(s);
  ASSERT_FALSE(dir.empty());
  const json config = ReadJson(fs::path(dir) / "config.json");
  EXPECT_EQ(config["model_type"], "deepseek_v3");
  EXPECT_EQ(config["first_k_dense_replace"], 2);
  auto engine = Open(dir);
  ASSERT_TRUE(engine);
  const ModelConfig& c = engine->config();
  EXPECT_EQ(c.family, runtime::ModelFamily::kDeepseekV3);
  EXPECT_EQ(c.quant.method, runtime::WeightQuant::kFp8);
  EXPECT_EQ(c.num_moe_layers(), 1);
  EXPECT_EQ(engine->weights().expert_dtype(), DType::kFp8Block);  // routed experts kept packed

  const int moe_layer = 2;
  auto shard = Shard(dir, moe_layer);
  ASSERT_TRUE(shard);
  // Published dtypes: linears F8_E4M3 + F32 scale_inv, router bf16, correction bias F32.
  const std::string p = "model.layers.2.";
  for (const std::string& name : {p + "self_attn.q_a_proj.weight", p + "self_attn.kv_b_proj.weight",
                                  p + "mlp.shared_experts.down_proj.weight", p + "mlp.experts.255.up_proj.weight"}) {
    const TensorView* t = shard->Find(name);
    const TensorView* sc = shard->Find(runtime::Fp8ScaleName(name));
    ASSERT_TRUE(t && sc) << name;
    EXPECT_EQ(t->dtype, DType::kF8E4M3) << name;
    EXPECT_TRUE(runtime::CheckFp8(*t, *sc, 128, 128).ok()) << name;
  }
  ASSERT_TRUE(shard->Find(p + "mlp.gate.weight"));
  EXPECT_EQ(shard->Find(p + "mlp.gate.weight")->dtype, DType::kBF16);
  ASSERT_TRUE(shard->Find(p + "mlp.gate.e_score_correction_bias"));
  EXPECT_EQ(shard->Find(p + "mlp.gate.e_score_correction_bias")->dtype, DType::kF32);
  EXPECT_EQ(shard->Find(p + "self_attn.kv_a_layernorm.weight")->dtype, DType::kBF16);
  EXPECT_EQ(shard->Find(p + "mlp.experts.0.gate_proj.weight_scale_inv")->shape,
            (std::vector<int64_t>{1, 2}));  // [64, 224]: one row block, column blocks of 128 and 96

  // The reference dequantization: fp8 x scale_inv in fp32 (rounded to bf16 where dequantized at load).
  auto fp8 = [&](const std::string& name) {
    const TensorView* t = shard->Find(name);
    const TensorView* sc = shard->Find(runtime::Fp8ScaleName(name));
    EXPECT_TRUE(t && sc) << name;
    return [t, sc](int64_t r, int64_t col) {
      const int64_t cols = t->dim(1), grid_cols = sc->dim(1);
      float scale;
      std::memcpy(&scale, static_cast<const std::byte*>(sc->data) + ((r / 128) * grid_cols + col / 128) * 4, 4);
      return F8E4M3ToF32(reinterpret_cast<const uint8_t*>(t->data)[r * cols + col]) * scale;
    };
  };
  const int64_t H = c.hidden_size, I = c.moe_intermediate_size;
  for (int e : {0, 1, 100, 255}) {
    const runtime::ExpertWeights& ew = engine->weights().host_expert(moe_layer, e);
    const DType packed = DType::kFp8Block;
    ExpectWeightEquals(ew.gate, packed, I, H, fp8(c.ExpertName(moe_layer, e, 0)), c.ExpertName(moe_layer, e, 0));
    ExpectWeightEquals(ew.up, packed, I, H, fp8(c.ExpertName(moe_layer, e, 1)), c.ExpertName(moe_layer, e, 1));
    ExpectWeightEquals(ew.down, packed, H, I, fp8(c.ExpertName(moe_layer, e, 2)), c.ExpertName(moe_layer, e, 2));
  }
  const runtime::LayerWeights& L = engine->weights().layer(moe_layer);
  ExpectWeightEquals(L.shared_expert.down, DType::kBF16, H, I, fp8(c.SharedExpertName(moe_layer, 2)), "shared down");
  ExpectWeightEquals(L.q_a, DType::kBF16, c.q_lora_rank, H, fp8(p + "self_attn.q_a_proj.weight"), "q_a_proj");
  ExpectWeightEquals(L.o, DType::kBF16, H, c.num_heads * c.v_head_dim, fp8(p + "self_attn.o_proj.weight"), "o_proj");
  // The scales are the blocks' own: each block's largest value is encoded as +-448 (scale_inv =
  // amax / 448), and the loaded weights have the drawn distribution (uniform, standard deviation
  // 0.02, so |w| <= 0.02 sqrt(3)), which a scale off by more than bf16's rounding would change.
  const TensorView* g = shard->Find(c.ExpertName(moe_layer, 7, 0));
  ASSERT_EQ(g->shape, (std::vector<int64_t>{I, H}));
  float block_max[2] = {0.f, 0.f};
  std::set<uint8_t> codes;
  for (int64_t i = 0; i < g->numel(); ++i) {
    const uint8_t code = reinterpret_cast<const uint8_t*>(g->data)[i];
    codes.insert(code);
    float& m = block_max[(i % H) / 128];
    m = std::max(m, std::fabs(F8E4M3ToF32(code)));
  }
  EXPECT_EQ(block_max[0], 448.f);
  EXPECT_EQ(block_max[1], 448.f);
  EXPECT_GT(codes.size(), 100u);
  const std::vector<float> gate7 = Values(engine->weights().host_expert(moe_layer, 7).gate);
  double sum2 = 0, amax = 0;
  for (int64_t i = 0; i < I * H; ++i) {
    const double v = gate7[i];
    sum2 += v * v;
    amax = std::max(amax, std::fabs(v));
  }
  EXPECT_NEAR(std::sqrt(sum2 / double(I * H)), 0.02, 0.001);
  EXPECT_LE(amax, 0.02 * std::sqrt(3.0) * 1.01);
  EXPECT_GE(amax, 0.02 * std::sqrt(3.0) * 0.99);

  ExpectFiniteLogits(*engine);
}

TEST_F(SyntheticModelTest, GptOss120bLoadsMxfp4ExpertsExactly) {
  const SyntheticShape s = Shape("gpt-oss-120b", 4, 32);
  const std::string dir = Write(s);
  ASSERT_FALSE(dir.empty());
  auto engine = Open(dir);
  ASSERT_TRUE(engine);
  const ModelConfig& c = engine->config();
  EXPECT_EQ(c.family, runtime::ModelFamily::kGptOss);
  EXPECT_EQ(c.quant.method, runtime::WeightQuant::kMxfp4);
  EXPECT_EQ(c.num_moe_layers(), 4);
  EXPECT_EQ(c.sliding_layers, (std::vector<bool>{true, false, true, false}));
  EXPECT_EQ(engine->weights().expert_dtype(), DType::kMxfp4);  // routed experts kept packed
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.moe_intermediate_size;
  ASSERT_EQ(H % 32, 0);
  ASSERT_EQ(I % 32, 0);
  for (int l = 0; l < c.num_layers; ++l) {
    auto shard = Shard(dir, l);
    ASSERT_TRUE(shard);
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const TensorView* gu = shard->Find(p + "mlp.experts.gate_up_proj_blocks");
    const TensorView* gus = shard->Find(p + "mlp.experts.gate_up_proj_scales");
    const TensorView* dp = shard->Find(p + "mlp.experts.down_proj_blocks");
    const TensorView* dps = shard->Find(p + "mlp.experts.down_proj_scales");
    const TensorView* gub = shard->Find(p + "mlp.experts.gate_up_proj_bias");
    const TensorView* dpb = shard->Find(p + "mlp.experts.down_proj_bias");
    ASSERT_TRUE(gu && gus && dp && dps && gub && dpb) << p;
    EXPECT_EQ(gu->dtype, DType::kU8);
    EXPECT_EQ(gu->shape, (std::vector<int64_t>{E, 2 * I, H / 32, 16}));
    EXPECT_EQ(gus->shape, (std::vector<int64_t>{E, 2 * I, H / 32}));
    EXPECT_EQ(dp->shape, (std::vector<int64_t>{E, H, I / 32, 16}));
    EXPECT_EQ(dps->shape, (std::vector<int64_t>{E, H, I / 32}));
    EXPECT_EQ(gub->dtype, DType::kBF16);
    EXPECT_EQ(gub->shape, (std::vector<int64_t>{E, 2 * I}));
    EXPECT_EQ(dpb->shape, (std::vector<int64_t>{E, H}));
    for (const char* name : {"self_attn.sinks", "self_attn.o_proj.bias", "mlp.router.weight", "mlp.router.bias"}) {
      ASSERT_TRUE(shard->Find(p + name)) << name;
      EXPECT_EQ(shard->Find(p + name)->dtype, DType::kBF16) << name;
    }
    // The reference dequantization of row `row` of expert e's [rows, cols] matrix: e2m1 x 2^(s - 127).
    auto mxfp4 = [](const TensorView* blocks, const TensorView* scales, int64_t e, int64_t rows, int64_t cols,
                    int64_t row, int64_t col) {
      const int64_t group = (e * rows + row) * (cols / 32) + col / 32;
      const uint8_t byte = reinterpret_cast<const uint8_t*>(blocks->data)[group * 16 + (col % 32) / 2];
      const uint8_t s = reinterpret_cast<const uint8_t*>(scales->data)[group];
      return runtime::E2m1ToF32(col % 2 ? byte >> 4 : byte & 15) * std::ldexp(1.f, s - 127);
    };
    auto bias = [](const TensorView* t, int64_t i) {
      uint16_t h;
      std::memcpy(&h, static_cast<const std::byte*>(t->data) + i * 2, 2);
      return Bf16ToF32(h);
    };
    for (int64_t e : {int64_t{0}, int64_t{1}, E / 2, E - 1}) {
      const runtime::ExpertWeights& ew = engine->weights().host_expert(l, static_cast<int>(e));
      const std::string what = p + "expert " + std::to_string(e);
      // gate_up's rows interleave gate (even) and up (odd).
      ExpectWeightEquals(
          ew.gate, DType::kMxfp4, I, H, [&](int64_t r, int64_t col) { return mxfp4(gu, gus, e, 2 * I, H, 2 * r, col); },
          what + " gate");
      ExpectWeightEquals(
          ew.up, DType::kMxfp4, I, H,
          [&](int64_t r, int64_t col) { return mxfp4(gu, gus, e, 2 * I, H, 2 * r + 1, col); }, what + " up");
      ExpectWeightEquals(
          ew.down, DType::kMxfp4, H, I, [&](int64_t r, int64_t col) { return mxfp4(dp, dps, e, H, I, r, col); },
          what + " down");
      ExpectWeightEquals(
          ew.gate_bias, DType::kBF16, 1, I, [&](int64_t, int64_t i) { return bias(gub, e * 2 * I + 2 * i); },
          what + " gate bias");
      ExpectWeightEquals(
          ew.up_bias, DType::kBF16, 1, I, [&](int64_t, int64_t i) { return bias(gub, e * 2 * I + 2 * i + 1); },
          what + " up bias");
      ExpectWeightEquals(
          ew.down_bias, DType::kBF16, 1, H, [&](int64_t, int64_t h) { return bias(dpb, e * H + h); },
          what + " down bias");
    }
    // The scales are the groups' own: the loaded weights keep the drawn distribution's size
    // (standard deviation 0.02; measured 0.0197 to 0.0199 after rounding to e2m1), which a shared exponent
    // off by one would double or halve.
    const std::vector<float> down = Values(engine->weights().host_expert(l, 3).down);
    double sum2 = 0;
    for (int64_t i = 0; i < H * I; ++i) sum2 += std::pow(down[i], 2);
    EXPECT_NEAR(std::sqrt(sum2 / double(H * I)), 0.02, 0.002);
  }
  ExpectFiniteLogits(*engine);
}

TEST_F(SyntheticModelTest, QuantizedShapesAreDeterministic) {
  for (const std::string name : {"deepseek-v3", "gpt-oss-120b"}) {
    const SyntheticShape s = Shape(name, 2, 64);
    const std::string dir = Write(s);
    ASSERT_FALSE(dir.empty());
    std::ifstream in(fs::path(dir) / "model-layer-00001.safetensors", std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    fs::remove_all(dir);
    const std::string again = Write(s);
    std::ifstream in2(fs::path(again) / "model-layer-00001.safetensors", std::ios::binary);
    const std::string bytes2((std::istreambuf_iterator<char>(in2)), std::istreambuf_iterator<char>());
    EXPECT_FALSE(bytes.empty());
    EXPECT_EQ(bytes, bytes2) << name;
  }
}

// The logits of a 7-token prompt.
std::vector<float> PromptLogits(runtime::Engine& e) {
  EXPECT_TRUE(e.AddSequence(0).ok());
  const std::vector<int32_t> prompt = {1, 40, 41, 42, 97, 120, 7};
  runtime::SeqChunk chunk{0, prompt, false};
  runtime::ForwardResult r;
  const Status s = e.Forward({&chunk, 1}, &r);
  EXPECT_TRUE(s.ok()) << s.ToString();
  e.RemoveSequence(0);
  return r.logits;
}

TEST_F(SyntheticModelTest, InMemoryCheckpointHoldsTheWrittenBytes) {
  const SyntheticShape s = Shape("mixtral-8x7b", 3, 64);
  const std::string dir = Write(s);
  ASSERT_FALSE(dir.empty());
  auto mem = BuildSyntheticCheckpoint(s, /*seed=*/1, root_.string(), /*distinct_layers=*/0);
  ASSERT_TRUE(mem.ok()) << mem.status().ToString();
  EXPECT_EQ(mem->distinct_layers, 3);
  EXPECT_NE(mem->dir, dir);
  EXPECT_EQ(ReadJson(fs::path(mem->dir) / "config.json"), ReadJson(fs::path(dir) / "config.json"));
  EXPECT_TRUE(fs::exists(fs::path(mem->dir) / "tokenizer.json"));
  for (const auto& f : fs::directory_iterator(mem->dir))  // no weights on disk
    EXPECT_NE(f.path().extension(), ".safetensors") << f.path();
  auto disk = runtime::Checkpoint::Open(dir);
  ASSERT_TRUE(disk.ok()) << disk.status().ToString();
  EXPECT_EQ(mem->checkpoint->num_tensors(), (*disk)->num_tensors());
  int64_t bytes = 0;
  for (const auto& file : (*disk)->files())
    for (const auto& [name, view] : file->tensors()) {
      const TensorView* m = mem->checkpoint->Find(name);
      ASSERT_NE(m, nullptr) << name;
      EXPECT_EQ(m->dtype, view.dtype) << name;
      EXPECT_EQ(m->shape, view.shape) << name;
      ASSERT_EQ(m->nbytes, view.nbytes) << name;
      EXPECT_EQ(std::memcmp(m->data, view.data, view.nbytes), 0) << name;
      bytes += static_cast<int64_t>(view.nbytes);
    }
  EXPECT_GE(mem->host_bytes, bytes);
  // An engine over either computes the same logits.
  auto from_disk = Open(dir);
  auto from_memory = Open(mem->dir, mem->checkpoint);
  ASSERT_NE(from_memory, nullptr);
  ASSERT_NE(from_disk, nullptr);
  const std::vector<float> want = PromptLogits(*from_disk);
  ASSERT_EQ(want.size(), static_cast<size_t>(s.vocab_size));
  EXPECT_EQ(PromptLogits(*from_memory), want);
}

TEST_F(SyntheticModelTest, RepeatedLayersTakeTheBytesOfGeneratedLayersOfTheirKind) {
  // deepseek-v3 of 7 layers: 0-2 dense, 3-6 MoE. Two distinct layers generate 0 and 1 (dense)
  // and 3, the first MoE layer; layer 2 repeats 0, layers 4-6 repeat 3.
  const SyntheticShape s = Shape("deepseek-v3", 7, 64);
  const ModelConfig c = Parse(s);
  ASSERT_EQ(c.num_layers, 7);
  ASSERT_FALSE(c.IsMoeLayer(2));
  ASSERT_TRUE(c.IsMoeLayer(3));
  auto mem = BuildSyntheticCheckpoint(s, /*seed=*/1, root_.string(), /*distinct_layers=*/2);
  ASSERT_TRUE(mem.ok()) << mem.status().ToString();
  EXPECT_EQ(mem->distinct_layers, 3);
  const runtime::Checkpoint& ck = *mem->checkpoint;
  auto data = [&](const std::string& name) -> const std::byte* {
    const TensorView* v = ck.Find(name);
    EXPECT_NE(v, nullptr) << name;
    if (v != nullptr) {
      EXPECT_EQ(v->name, name);
    }
    return v ? v->data : nullptr;
  };
  const std::string q = ".self_attn.q_a_proj.weight";
  EXPECT_EQ(data("model.layers.2" + q), data("model.layers.0" + q));
  EXPECT_NE(data("model.layers.1" + q), data("model.layers.0" + q));
  EXPECT_EQ(data(c.DenseMlpName(2, 0)), data(c.DenseMlpName(0, 0)));
  for (int l = 4; l < 7; ++l) {
    EXPECT_EQ(data(c.RouterName(l)), data(c.RouterName(3))) << l;
    EXPECT_EQ(data(c.ExpertName(l, 5, 2)), data(c.ExpertName(3, 5, 2))) << l;
    EXPECT_EQ(data("model.layers." + std::to_string(l) + q), data("model.layers.3" + q)) << l;
  }
  EXPECT_EQ(ck.Find(c.ExpertName(7, 0, 0)), nullptr);
  // The engine loads every layer (the packed experts of repeated layers too) and computes.
  auto engine = Open(mem->dir, mem->checkpoint);
  ASSERT_NE(engine, nullptr);
  ExpectFiniteLogits(*engine);
}

TEST(CheckpointFromFilesTest, RefusesDuplicateNamesAndDanglingAliases) {
  auto file = [](const std::string& name) {
    const float v[2] = {1.f, 2.f};
    auto f = runtime::SafetensorsFile::FromBytes(runtime::SafetensorsBytes({{name, DType::kF32, {2}, v}}), name);
    EXPECT_TRUE(f.ok()) << f.status().ToString();
    return std::move(f).value();
  };
  auto files = [&](std::vector<std::string> names) {
    std::vector<std::unique_ptr<runtime::SafetensorsFile>> out;
    for (const auto& n : names) out.push_back(file(n));
    return out;
  };
  auto ok = runtime::Checkpoint::FromFiles("mem", files({"a", "b"}), {{"c", "a"}});
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  const TensorView* c = (*ok)->Find("c");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->data, (*ok)->Find("a")->data);
  EXPECT_EQ(c->name, "c");
  EXPECT_EQ(reinterpret_cast<const float*>(c->data)[1], 2.f);

  auto twice = runtime::Checkpoint::FromFiles("mem", files({"a", "a"}));
  ASSERT_FALSE(twice.ok());
  EXPECT_NE(twice.status().message().find("\"a\" appears in more than one file"), std::string::npos)
      << twice.status().ToString();
  auto dangling = runtime::Checkpoint::FromFiles("mem", files({"a"}), {{"c", "z"}});
  ASSERT_FALSE(dangling.ok());
  EXPECT_EQ(dangling.status().code(), StatusCode::kNotFound);
  EXPECT_NE(dangling.status().message().find("\"z\""), std::string::npos) << dangling.status().ToString();
  auto shadow = runtime::Checkpoint::FromFiles("mem", files({"a", "b"}), {{"b", "a"}});
  ASSERT_FALSE(shadow.ok());
  EXPECT_NE(shadow.status().message().find("alias \"b\""), std::string::npos) << shadow.status().ToString();
}

}  // namespace
}  // namespace ef::launch
