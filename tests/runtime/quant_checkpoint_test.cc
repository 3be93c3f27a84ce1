// Quantized checkpoints as published (runtime/model/checkpoint_quant.h, ModelWeights): the
// transformers fixtures of gpt_oss (MXFP4 experts) and deepseek_v3 (block FP8 linears) are
// written in those layouts by tests/runtime/quant_checkpoint_writer.h, then
//   (i)   the loaded weights equal this file's own dequantization of the written bytes, bit for bit,
//         whether the routed experts are kept packed (kMxfp4, kFp8Block: the default, at their
//         stored size) or dequantized at load (LoadOptions::dequantize_experts);
//   (ii)  `expertflow score` on them equals score on that dequantization written as a plain F32
//         checkpoint, and stays within a measured bound of score on the unquantized fixture; packed
//         experts give the logits of experts dequantized at load;
//   (iii) malformed blocks, scales, grids and configs are errors naming the tensor or key.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "runtime/core/block_scaled.h"
#include "runtime/engine/engine.h"
#include "runtime/model/checkpoint_quant.h"
#include "runtime/model/model_config.h"
#include "tests/runtime/prompt_run.h"
#include "tests/runtime/quant_checkpoint_writer.h"

namespace ef::runtime {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using testing::OwnedTensor;
using testing::QuantWriteOptions;
using testing::TensorMap;

// --- reference decoders, written from the format definitions (not the runtime's tables) ---

// e2m1: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal (m x 0.5).
double RefE2m1(uint8_t code) {
  const int exp = (code >> 1) & 3, m = code & 1;
  const double mag = exp == 0 ? 0.5 * m : (1.0 + 0.5 * m) * std::ldexp(1.0, exp - 1);
  return code & 8 ? -mag : mag;
}

// e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal.
double RefE4m3(uint8_t code) {
  const int exp = (code >> 3) & 15, m = code & 7;
  const double mag = exp == 0 ? m / 8.0 * std::ldexp(1.0, -6) : (1.0 + m / 8.0) * std::ldexp(1.0, exp - 7);
  return code & 0x80 ? -mag : mag;
}

// Value [row, col] of matrix `e` of an MXFP4 pair [.., rows, cols / 32, 16] / [.., rows, cols / 32].
float RefMxfp4(const TensorView& blocks, const TensorView& scales, int64_t e, int64_t rows, int64_t cols, int64_t row,
               int64_t col) {
  const int64_t group = (e * rows + row) * (cols / 32) + col / 32;
  const uint8_t byte = reinterpret_cast<const uint8_t*>(blocks.data)[group * 16 + (col % 32) / 2];
  const uint8_t s = reinterpret_cast<const uint8_t*>(scales.data)[group];
  return static_cast<float>(std::ldexp(RefE2m1(col % 2 ? byte >> 4 : byte & 15), s - 127));
}

// A block FP8 weight dequantized: the product is exact in double and rounded once to fp32.
std::vector<float> RefFp8(const TensorView& w, const TensorView& s, int br, int bc) {
  const int64_t rows = w.dim(0), cols = w.dim(1), gc = s.dim(1);
  std::vector<float> out(static_cast<size_t>(rows * cols));
  const auto* q = reinterpret_cast<const uint8_t*>(w.data);
  const auto* sc = reinterpret_cast<const float*>(s.data);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      out[r * cols + c] = static_cast<float>(RefE4m3(q[r * cols + c]) * double(sc[(r / br) * gc + c / bc]));
  return out;
}

// The float values a weight of dtype `dt` holds for the fp32 values `v` (rounded to nearest even).
std::vector<float> As(DType dt, std::vector<float> v) {
  for (float& x : v) x = dt == DType::kBF16 ? Bf16ToF32(F32ToBf16(x)) : x;
  return v;
}

// Counts the values of `got` (host bytes: the CPU backend) that differ from `want` bit for bit; a
// packed weight's values are those its rows dequantize to.
void ExpectWeightEquals(const Weight& got, DType dtype, int64_t rows, int64_t cols, const std::vector<float>& want,
                        const std::string& what) {
  ASSERT_EQ(got.dtype, dtype) << what;
  ASSERT_EQ(got.rows, rows) << what;
  ASSERT_EQ(got.cols, cols) << what;
  ASSERT_EQ(want.size(), static_cast<size_t>(rows * cols)) << what;
  std::vector<float> f(want.size());
  if (IsBlockScaled(got.dtype)) {
    for (int64_t r = 0; r < rows; ++r) DequantizeBlockScaledRow(got.dtype, got.data, rows, cols, r, &f[r * cols]);
  } else {
    ConvertToF32(got.dtype, got.data, f.data(), f.size());
  }
  size_t wrong = 0, first = 0;
  for (size_t i = 0; i < f.size(); ++i)
    if (std::memcmp(&f[i], &want[i], 4) != 0 && wrong++ == 0) first = i;
  EXPECT_EQ(wrong, 0u) << what << ": first at " << first << ": " << f[first] << " vs " << want[first];
}

struct RunResult {
  int exit_code;
  bool signaled;
  std::string output;
};
RunResult RunBinary(const std::string& args) {
  const std::string cmd = std::string(EF_BINARY) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  const int st = pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, WIFSIGNALED(st), out};
}

class QuantCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("ef_quant_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  static std::string Fixture(const std::string& family) { return std::string(EF_TEST_DATA) + "/" + family; }
  // Writes the fixture of `family` quantized into dir_/name and returns the directory.
  std::string Write(const std::string& family, const std::string& name, const QuantWriteOptions& o = {}) {
    const std::string out = (dir_ / name).string();
    Status s = testing::WriteQuantizedFixture(Fixture(family), out, o);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return out;
  }
  static StatusOr<std::unique_ptr<Engine>> Open(const std::string& dir, bool dequantize_experts = false) {
    EngineOptions o;
    o.backend = "cpu";
    o.dequantize_experts = dequantize_experts;
    return Engine::Create(dir, o);
  }
  // The logits of `expertflow score` on the fixture's reference input ids.
  std::vector<float> Score(const std::string& model, const std::string& family) {
    const fs::path ids = dir_ / "ids.json", out = dir_ / "score.json";
    std::ifstream ref(Fixture(family) + "/reference.json");
    std::ofstream(ids) << json{{"input_ids", json::parse(ref)["input_ids"]}}.dump();
    RunResult r =
        RunBinary("score --backend cpu --model " + model + " --ids-file " + ids.string() + " --out " + out.string());
    EXPECT_EQ(r.exit_code, 0) << r.output;
    std::vector<float> logits;
    if (r.exit_code != 0) return logits;
    std::ifstream in(out);
    const json result = json::parse(in);
    for (const json& seq : result["logits"])
      for (const json& tok : seq)
        for (const json& v : tok) logits.push_back(v.get<float>());
    return logits;
  }
  static double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
    EXPECT_EQ(a.size(), b.size());
    double m = 0;
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
    return m;
  }
  static double MaxAbs(const std::vector<float>& a) {
    double m = 0;
    for (float x : a) m = std::max(m, std::fabs(double(x)));
    return m;
  }
  // Loading `dir` fails with a message containing every one of `parts`.
  static void ExpectLoadError(const std::string& dir, const std::vector<std::string>& parts) {
    auto e = Open(dir);
    ASSERT_FALSE(e.ok()) << dir << " loaded";
    for (const std::string& p : parts)
      EXPECT_NE(e.status().message().find(p), std::string::npos) << e.status().ToString();
  }

  fs::path dir_;
};

// --- the element formats ---

TEST(CheckpointQuantFormats, E2m1AndE4m3DecodeAsDefined) {
  for (int c = 0; c < 16; ++c) EXPECT_EQ(E2m1ToF32(static_cast<uint8_t>(c)), RefE2m1(static_cast<uint8_t>(c))) << c;
  for (int c = 0; c < 256; ++c) {
    const float got = F8E4M3ToF32(static_cast<uint8_t>(c));
    if ((c & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(got)) << c;
    } else {
      EXPECT_EQ(got, RefE4m3(static_cast<uint8_t>(c))) << c;
    }
  }
  EXPECT_EQ(F8E4M3ToF32(0x7e), 448.f);
  EXPECT_EQ(F8E4M3ToF32(0x01), 0x1p-9f);
  EXPECT_EQ(F8E4M3ToF32(0xb8), -1.f);
  DType t;
  ASSERT_TRUE(ParseDType("F8_E4M3", &t));
  EXPECT_EQ(t, DType::kF8E4M3);
  EXPECT_EQ(DTypeSize(t), 1u);
  EXPECT_STREQ(DTypeName(t), "F8_E4M3");
}

TEST(CheckpointQuantFormats, Mxfp4ExtremeScalesAreExactOrErrors) {
  // One row of 32 values: codes 1..15 and 0 repeated, at the smallest and a large scale.
  uint8_t blocks[16];
  for (int k = 0; k < 16; ++k) blocks[k] = static_cast<uint8_t>((2 * k + 1) % 16 | (((2 * k + 2) % 16) << 4));
  float f32[32];
  uint16_t bf16[32];
  for (uint8_t s : {uint8_t{0}, uint8_t{1}, uint8_t{127}, uint8_t{200}, uint8_t{252}}) {
    ASSERT_TRUE(DequantizeMxfp4(blocks, &s, 1, 32, DType::kF32, f32, "t").ok()) << int(s);
    ASSERT_TRUE(DequantizeMxfp4(blocks, &s, 1, 32, DType::kBF16, bf16, "t").ok()) << int(s);
    for (int i = 0; i < 32; ++i) {
      const uint8_t code = i % 2 ? blocks[i / 2] >> 4 : blocks[i / 2] & 15;
      EXPECT_EQ(f32[i], static_cast<float>(std::ldexp(RefE2m1(code), s - 127))) << int(s) << " " << i;
      EXPECT_EQ(Bf16ToF32(bf16[i]), f32[i]) << int(s) << " " << i;
    }
  }
  // 6 x 2^127 overflows fp32; 255 is NaN; 2^-127 is below F16's range.
  uint8_t s = 254;
  Status st = DequantizeMxfp4(blocks, &s, 1, 32, DType::kF32, f32, "tensor \"x\", expert 2");
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("tensor \"x\", expert 2, row 0, group 0 (scale byte 254)"), std::string::npos)
      << st.ToString();
  s = 255;
  st = DequantizeMxfp4(blocks, &s, 1, 32, DType::kF32, f32, "t");
  EXPECT_NE(st.message().find("NaN"), std::string::npos) << st.ToString();
  s = 0;
  uint16_t f16[32];
  st = DequantizeMxfp4(blocks, &s, 1, 32, DType::kF16, f16, "t");
  EXPECT_NE(st.message().find("not representable in F16"), std::string::npos) << st.ToString();
}

TEST(CheckpointQuantFormats, LargeMatricesReportTheFirstBadRowWhateverTheSplit) {
  // 512 x 1024 values: rows go to the thread pool in chunks of at least 64.
  const int64_t rows = 512, cols = 1024;
  std::vector<uint8_t> blocks(rows * cols / 2), scales(rows * cols / 32), q(rows * cols);
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = static_cast<uint8_t>(i * 37);
  for (size_t i = 0; i < scales.size(); ++i) scales[i] = static_cast<uint8_t>(100 + i % 40);
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<uint8_t>((i * 11) % 0x7e);
  std::vector<float> out(rows * cols);
  ASSERT_TRUE(DequantizeMxfp4(blocks.data(), scales.data(), rows, cols, DType::kF32, out.data(), "m").ok());
  for (int64_t r = 0; r < rows; r += 37)
    for (int64_t c = 0; c < cols; c += 5) {
      const uint8_t b = blocks[(r * cols + c) / 2];
      EXPECT_EQ(out[r * cols + c], std::ldexp(RefE2m1(c % 2 ? b >> 4 : b & 15), scales[(r * cols + c) / 32] - 127));
    }
  scales[(450 * cols + 64) / 32] = 255;
  scales[(300 * cols + 96) / 32] = 255;
  Status st = DequantizeMxfp4(blocks.data(), scales.data(), rows, cols, DType::kF32, out.data(), "m");
  EXPECT_NE(st.message().find("m, row 300, group 3 (scale byte 255)"), std::string::npos) << st.ToString();

  std::vector<float> grid = {0.5f, 2.f, 0.25f, 4.f};  // blocks of [256, 512]
  TensorView w{"w", DType::kF8E4M3, {rows, cols}, reinterpret_cast<const std::byte*>(q.data()), q.size()};
  TensorView sv{"s", DType::kF32, {2, 2}, reinterpret_cast<const std::byte*>(grid.data()), grid.size() * 4};
  ASSERT_TRUE(CheckFp8(w, sv, 256, 512).ok());
  ASSERT_TRUE(DequantizeFp8(w, sv, 256, 512, DType::kF32, out.data()).ok());
  for (int64_t r = 0; r < rows; r += 37)
    for (int64_t c = 0; c < cols; c += 5)
      EXPECT_EQ(out[r * cols + c], static_cast<float>(RefE4m3(q[r * cols + c]) * grid[(r / 256) * 2 + c / 512]));
  q[400 * cols + 3] = 0x7f;
  q[100 * cols + 900] = 0xff;
  st = DequantizeFp8(w, sv, 256, 512, DType::kF32, out.data());
  EXPECT_NE(st.message().find("tensor \"w\": the FP8 code at [100, 900] is NaN"), std::string::npos) << st.ToString();
}

TEST(CheckpointQuantFormats, QuantizationConfigIsParsedOrRefusedByKey) {
  const std::string base = R"({"model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts_per_tok": 2, "n_routed_experts": 4,
    "intermediate_size": 128, "moe_intermediate_size": 32, "kv_lora_rank": 32, "q_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_group": 1, "topk_group": 1,
    "quantization_config": )";
  auto parse = [&](const std::string& q) { return ModelConfig::FromJson(base + q + "}", "config.json"); };
  auto c = parse(R"({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                     "weight_block_size": [128, 64]})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->quant.method, WeightQuant::kFp8);
  EXPECT_EQ(c->quant.block_rows, 128);
  EXPECT_EQ(c->quant.block_cols, 64);
  const std::pair<std::string, std::string> bad[] = {
      {R"({"quant_method": "awq"})", "quantization_config.quant_method \"awq\" is not supported"},
      {R"({"bits": 4})", "\"quant_method\" is missing"},
      {R"({"quant_method": "mxfp4"})", "\"mxfp4\" is supported for gpt_oss only"},
      {R"({"quant_method": "fp8", "fmt": "e5m2"})", "quantization_config.fmt \"e5m2\""},
      {R"({"quant_method": "fp8", "activation_scheme": "static"})", "activation_scheme \"static\""},
      {R"({"quant_method": "fp8", "weight_block_size": [128]})", "\"weight_block_size\" must be"},
      {R"({"quant_method": "fp8", "weight_block_size": [0, 128]})", "\"weight_block_size\" must be"},
      {R"("fp8")", "\"quantization_config\" must be an object"},
  };
  for (const auto& [q, want] : bad) {
    auto r = parse(q);
    ASSERT_FALSE(r.ok()) << q;
    EXPECT_NE(r.status().message().find(want), std::string::npos) << q << ": " << r.status().ToString();
  }
}

// --- (i) loaded weights equal the reference dequantization ---

// `dtype`: the biases' (and experts dequantized at load); packed experts are kMxfp4.
void CheckMxfp4Experts(const Engine& engine, const std::string& written, DType dtype, bool packed) {
  const ModelWeights& m = engine.weights();
  const ModelConfig& c = m.config();
  auto file = SafetensorsFile::Open(written + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.moe_intermediate_size;
  const DType wt = packed ? DType::kMxfp4 : dtype;
  EXPECT_EQ(m.expert_dtype(), wt);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.experts.";
    const TensorView* gu = (*file)->Find(p + "gate_up_proj_blocks");
    const TensorView* gus = (*file)->Find(p + "gate_up_proj_scales");
    const TensorView* dp = (*file)->Find(p + "down_proj_blocks");
    const TensorView* dps = (*file)->Find(p + "down_proj_scales");
    const TensorView* gub = (*file)->Find(p + "gate_up_proj_bias");
    const TensorView* dpb = (*file)->Find(p + "down_proj_bias");
    ASSERT_TRUE(gu && gus && dp && dps && gub && dpb) << p;
    ASSERT_EQ(gu->shape, (std::vector<int64_t>{E, 2 * I, H / 32, 16}));
    ASSERT_EQ(dp->shape, (std::vector<int64_t>{E, H, I / 32, 16}));
    std::vector<float> bias_gu(gub->numel()), bias_d(dpb->numel());
    ConvertToF32(gub->dtype, gub->data, bias_gu.data(), bias_gu.size());
    ConvertToF32(dpb->dtype, dpb->data, bias_d.data(), bias_d.size());
    for (int64_t e = 0; e < E; ++e) {
      std::vector<float> gate(I * H), up(I * H), down(H * I), gb(I), ub(I), db(H);
      for (int64_t i = 0; i < I; ++i) {
        for (int64_t h = 0; h < H; ++h) {
          gate[i * H + h] = RefMxfp4(*gu, *gus, e, 2 * I, H, 2 * i, h);
          up[i * H + h] = RefMxfp4(*gu, *gus, e, 2 * I, H, 2 * i + 1, h);
          down[h * I + i] = RefMxfp4(*dp, *dps, e, H, I, h, i);
        }
        gb[i] = bias_gu[e * 2 * I + 2 * i];
        ub[i] = bias_gu[e * 2 * I + 2 * i + 1];
      }
      for (int64_t h = 0; h < H; ++h) db[h] = bias_d[e * H + h];
      const ExpertWeights& ew = m.host_expert(l, static_cast<int>(e));
      const std::string what = p + " expert " + std::to_string(e);
      ExpectWeightEquals(ew.gate, wt, I, H, gate, what + " gate");
      ExpectWeightEquals(ew.up, wt, I, H, up, what + " up");
      ExpectWeightEquals(ew.down, wt, H, I, down, what + " down");
      ExpectWeightEquals(ew.gate_bias, dtype, 1, I, gb, what + " gate bias");
      ExpectWeightEquals(ew.up_bias, dtype, 1, I, ub, what + " up bias");
      ExpectWeightEquals(ew.down_bias, dtype, 1, H, db, what + " down bias");
    }
  }
}

TEST_F(QuantCheckpointTest, Mxfp4ExpertsEqualTheReferenceDequantization) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    QuantWriteOptions o;
    o.float_dtype = dt;
    const std::string dir = Write("gpt_oss", std::string("mxfp4_") + DTypeName(dt), o);
    for (bool packed : {true, false}) {
      SCOPED_TRACE(std::string(DTypeName(dt)) + (packed ? " packed" : " dequantized at load"));
      auto engine = Open(dir, /*dequantize_experts=*/!packed);
      ASSERT_TRUE(engine.ok()) << engine.status().ToString();
      EXPECT_EQ((*engine)->config().quant.method, WeightQuant::kMxfp4);
      CheckMxfp4Experts(**engine, dir, dt, packed);
    }
  }
}

// `dtype`: the weights dequantized at load; packed experts are kFp8Block, whose values are the
// fp32 products (not rounded to dtype).
void CheckFp8Weights(const Engine& engine, const std::string& written, DType dtype, int br, int bc,
                     bool packed_experts) {
  const ModelWeights& m = engine.weights();
  const ModelConfig& c = m.config();
  auto file = SafetensorsFile::Open(written + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  int checked = 0;
  auto ref = [&](const std::string& name, DType as) {
    const TensorView* w = (*file)->Find(name);
    const TensorView* s = (*file)->Find(name + "_scale_inv");
    EXPECT_TRUE(w && s && w->dtype == DType::kF8E4M3) << name;
    ++checked;
    return w && s ? As(as, RefFp8(*w, *s, br, bc)) : std::vector<float>();
  };
  auto check = [&](const Weight& got, const std::string& name, DType as) {
    const TensorView* w = (*file)->Find(name);
    ASSERT_TRUE(w) << name;
    ExpectWeightEquals(got, as, w->dim(0), w->dim(1), ref(name, as == DType::kFp8Block ? DType::kF32 : as), name);
  };
  const int64_t nh = c.num_heads, nope = c.qk_nope_head_dim, vd = c.v_head_dim, r = c.kv_lora_rank;
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = m.layer(l);
    const std::string p = "model.layers." + std::to_string(l) + ".";
    check(L.q_a, p + "self_attn.q_a_proj.weight", dtype);
    check(L.q, p + "self_attn.q_b_proj.weight", dtype);
    check(L.kv_a, p + "self_attn.kv_a_proj_with_mqa.weight", dtype);
    check(L.o, p + "self_attn.o_proj.weight", dtype);
    // kv_b_proj is held repacked per head: W_uk transposed, W_uv contiguous.
    const std::vector<float> kvb = ref(p + "self_attn.kv_b_proj.weight", dtype);
    std::vector<float> key(nh * r * nope), value(nh * vd * r);
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t j = 0; j < r; ++j) {
        for (int64_t i = 0; i < nope; ++i) key[(h * r + j) * nope + i] = kvb[(h * (nope + vd) + i) * r + j];
        for (int64_t v = 0; v < vd; ++v) value[(h * vd + v) * r + j] = kvb[(h * (nope + vd) + nope + v) * r + j];
      }
    ExpectWeightEquals(L.kv_b_key, dtype, nh * r, nope, key, p + "kv_b key");
    ExpectWeightEquals(L.kv_b_value, dtype, nh * vd, r, value, p + "kv_b value");
    if (!c.IsMoeLayer(l)) {
      check(L.dense_mlp.gate, p + "mlp.gate_proj.weight", dtype);
      check(L.dense_mlp.up, p + "mlp.up_proj.weight", dtype);
      check(L.dense_mlp.down, p + "mlp.down_proj.weight", dtype);
      continue;
    }
    check(L.shared_expert.gate, c.SharedExpertName(l, 0), dtype);
    check(L.shared_expert.up, c.SharedExpertName(l, 1), dtype);
    check(L.shared_expert.down, c.SharedExpertName(l, 2), dtype);
    const DType expert_dtype = packed_experts ? DType::kFp8Block : dtype;
    for (int e = 0; e < c.num_experts; ++e) {
      check(m.host_expert(l, e).gate, c.ExpertName(l, e, 0), expert_dtype);
      check(m.host_expert(l, e).up, c.ExpertName(l, e, 1), expert_dtype);
      check(m.host_expert(l, e).down, c.ExpertName(l, e, 2), expert_dtype);
    }
    // The router is not quantized: the checkpoint's values.
    const TensorView* router = (*file)->Find(c.RouterName(l));
    ASSERT_TRUE(router);
    EXPECT_EQ(router->dtype, dtype);
    EXPECT_EQ(std::memcmp(L.router.data, router->data, router->nbytes), 0);
  }
  // Every quantized tensor of the file was compared.
  int quantized = 0;
  for (const auto& [name, t] : (*file)->tensors()) quantized += t.dtype == DType::kF8E4M3;
  EXPECT_EQ(checked, quantized);
}

TEST_F(QuantCheckpointTest, Fp8WeightsEqualTheReferenceDequantization) {
  // [128, 128] as published (one partial block per fixture weight; routed experts kept packed
  // unless dequantize_experts); [16, 24] leaves partial blocks in both dimensions (rows 40 and 96,
  // columns 32 and 64), a block size kFp8Block does not hold: every weight is dequantized.
  for (auto [br, bc] : {std::pair{128, 128}, std::pair{16, 24}}) {
    for (DType dt : {DType::kF32, DType::kBF16}) {
      QuantWriteOptions o;
      o.block_rows = br;
      o.block_cols = bc;
      o.float_dtype = dt;
      const std::string dir = Write("deepseek_v3", "fp8_" + std::to_string(bc) + DTypeName(dt), o);
      for (bool dequantize_experts : {false, true}) {
        SCOPED_TRACE(std::to_string(br) + "x" + std::to_string(bc) + " " + DTypeName(dt) +
                     (dequantize_experts ? " experts dequantized at load" : ""));
        auto engine = Open(dir, dequantize_experts);
        ASSERT_TRUE(engine.ok()) << engine.status().ToString();
        EXPECT_EQ((*engine)->config().quant.method, WeightQuant::kFp8);
        CheckFp8Weights(**engine, dir, dt, br, bc, /*packed_experts=*/br == 128 && !dequantize_experts);
      }
    }
  }
}

// Packed experts hold the checkpoint's bytes: values and scales, each part padded to 16 bytes
// (the fixtures' MXFP4 parts need none; an FP8 part of [32, 64] has 2048 value bytes and one
// 4-byte scale, padded to 2064), not the float size they dequantize to.
TEST_F(QuantCheckpointTest, PackedExpertsHoldTheirStoredSize) {
  QuantWriteOptions o;
  o.float_dtype = DType::kBF16;  // as published
  for (const std::string family : {"gpt_oss", "deepseek_v3"}) {
    SCOPED_TRACE(family);
    const std::string dir = Write(family, family + "_bf16", o);
    auto packed = Open(dir);
    auto dequantized = Open(dir, /*dequantize_experts=*/true);
    ASSERT_TRUE(packed.ok() && dequantized.ok());
    const ModelConfig& c = (*packed)->config();
    const int l = c.MoeLayers().front();
    const int64_t H = c.hidden_size, I = c.moe_intermediate_size;
    auto file = SafetensorsFile::Open(dir + "/model.safetensors");
    ASSERT_TRUE(file.ok());
    auto pad = [](int64_t b) { return static_cast<size_t>((b + 15) / 16 * 16); };
    size_t stored = 0;  // expert 0 of layer l, as the checkpoint stores it
    if (family == "gpt_oss") {
      // gate and up: I rows each of gate_up's [2I, H]; down [H, I]; biases 2I + H values.
      stored = 2 * pad(I * H / 2 + I * H / 32) + pad(H * I / 2 + H * I / 32) + static_cast<size_t>(2 * I + H) * 2;
    } else {
      for (int p = 0; p < 3; ++p) {
        const TensorView* w = (*file)->Find(c.ExpertName(l, 0, p));
        const TensorView* s = (*file)->Find(Fp8ScaleName(c.ExpertName(l, 0, p)));
        ASSERT_TRUE(w && s);
        stored += pad(static_cast<int64_t>(w->nbytes)) + pad(static_cast<int64_t>(s->nbytes));
      }
    }
    const size_t held = (*packed)->weights().host_expert(l, 0).nbytes();
    const size_t as_float = (*dequantized)->weights().host_expert(l, 0).nbytes();
    std::printf("%s: expert bytes %zu packed (stored %zu), %zu dequantized to BF16\n", family.c_str(), held, stored,
                as_float);
    EXPECT_EQ(held, stored);
    EXPECT_EQ((*packed)->weights().max_expert_bytes(), stored);
    EXPECT_LT(held, as_float);
  }
}

// --- (ii) score on the quantized checkpoints ---

// The written checkpoint with every quantized tensor replaced by its reference dequantization
// (F32, in the unquantized layout and names) and no quantization_config. Also returns the RMS of
// (dequantized - fixture) over the RMS of the fixture's weights, over the quantized tensors.
double WriteDequantized(const std::string& written, const std::string& fixture, const std::string& out, int br,
                        int bc) {
  auto file = SafetensorsFile::Open(written + "/model.safetensors");
  auto ref = SafetensorsFile::Open(fixture + "/model.safetensors");
  EXPECT_TRUE(file.ok() && ref.ok());
  if (!file.ok() || !ref.ok()) return 0;
  TensorMap tensors;
  double err2 = 0, ref2 = 0;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
    const TensorView* orig = (*ref)->Find(name);
    EXPECT_TRUE(orig && orig->shape == shape) << name;
    if (!orig || orig->shape != shape) return;
    std::vector<float> o(orig->numel());
    ConvertToF32(orig->dtype, orig->data, o.data(), o.size());
    for (size_t i = 0; i < v.size(); ++i) {
      err2 += (double(v[i]) - o[i]) * (double(v[i]) - o[i]);
      ref2 += double(o[i]) * o[i];
    }
    tensors[name] = testing::FloatTensor(DType::kF32, std::move(shape), v);
  };
  for (const auto& [name, t] : (*file)->tensors()) {
    if (name.ends_with("_blocks")) {
      const std::string base = name.substr(0, name.size() - 7);
      const TensorView* scales = (*file)->Find(base + "_scales");
      EXPECT_NE(scales, nullptr) << name;
      if (!scales) return 0;
      const int64_t E = t.dim(0), rows = t.dim(1), cols = t.dim(2) * 32;
      std::vector<float> v(E * cols * rows);  // [E, in, out]: x @ W
      for (int64_t e = 0; e < E; ++e)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) v[(e * cols + c) * rows + r] = RefMxfp4(t, *scales, e, rows, cols, r, c);
      add(base, {E, cols, rows}, v);
    } else if (t.dtype == DType::kF8E4M3) {
      const TensorView* scales = (*file)->Find(Fp8ScaleName(name));
      EXPECT_NE(scales, nullptr) << name;
      if (!scales) return 0;
      add(name, t.shape, RefFp8(t, *scales, br, bc));
    } else if (!name.ends_with("_scales") && !name.ends_with("_scale_inv")) {
      tensors[name] = testing::ReadTensor(t);
    }
  }
  json config = testing::ReadConfig(written);
  config.erase("quantization_config");
  Status st = testing::WriteCheckpoint(out, tensors, config);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return std::sqrt(err2 / ref2);
}

// Score on the quantized checkpoint equals score on its reference dequantization exactly (the
// same weights reach the same kernels), and differs from score on the unquantized fixture by the
// quantization error. Measured (docs/results/quant/checkpoints.md; the encoding is deterministic):
//   gpt_oss      MXFP4 experts, weight error 11.4% rms: max |dlogit| 0.116 (max |logit| 0.68)
//   deepseek_v3  FP8 linears, weight error 2.6% rms:     max |dlogit| 0.042 (max |logit| 0.64)
// roughly the weight error times the logits' size, plus routing flips in these small random
// models. The bounds are about twice that: 0.25 and 0.1. A layout mistake that the loader and
// the reference decoder would share (gate and up rows not interleaved) moves gpt_oss's logits by
// 0.65, well past its bound.
TEST_F(QuantCheckpointTest, ScoreMatchesTheDequantizedCheckpointAndStaysNearTheFixture) {
  struct Case {
    std::string family;
    double bound;  // max |logit(quantized) - logit(fixture)|
  };
  for (const Case& k : {Case{"gpt_oss", 0.25}, Case{"deepseek_v3", 0.1}}) {
    SCOPED_TRACE(k.family);
    const std::string quantized = Write(k.family, k.family + "_q");
    const std::string dequantized = (dir_ / (k.family + "_dq")).string();
    const double weight_err = WriteDequantized(quantized, Fixture(k.family), dequantized, 128, 128);
    const std::vector<float> fixture = Score(Fixture(k.family), k.family);
    const std::vector<float> q = Score(quantized, k.family);
    const std::vector<float> dq = Score(dequantized, k.family);
    ASSERT_FALSE(fixture.empty());
    EXPECT_EQ(MaxAbsDiff(q, dq), 0.0) << "quantized vs its dequantization";
    const double diff = MaxAbsDiff(q, fixture);
    std::printf("%s: weight rms error %.4f, max |logit| %.4f, max |logit(quantized) - logit(fixture)| %.4g\n",
                k.family.c_str(), weight_err, MaxAbs(fixture), diff);
    EXPECT_LT(diff, k.bound);
  }
}

// The CPU backend dequantizes a packed expert's rows to the fp32 values the loader would have
// stored and sums them in the same order, so packed experts give the logits of experts dequantized
// at load bit for bit, except block FP8 dequantized into BF16 at load: those weights are rounded
// once more (to 8 significant bits), which packed experts are not. That case differs by the
// rounding: measured max |dlogit| 1.7e-4 (max |logit| 0.61); bound about twice that.
TEST_F(QuantCheckpointTest, PackedExpertsGiveTheLogitsOfExpertsDequantizedAtLoad) {
  const std::vector<int32_t> prompt = {1, 17, 42, 5, 99, 7, 23, 64, 3, 11};
  for (const std::string family : {"gpt_oss", "deepseek_v3"}) {
    for (DType dt : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE(family + " " + DTypeName(dt));
      QuantWriteOptions o;
      o.float_dtype = dt;
      const std::string dir = Write(family, family + "_" + DTypeName(dt), o);
      auto packed = Open(dir);
      auto dequantized = Open(dir, /*dequantize_experts=*/true);
      ASSERT_TRUE(packed.ok() && dequantized.ok());
      ASSERT_TRUE(IsBlockScaled((*packed)->weights().expert_dtype()));
      ASSERT_EQ((*dequantized)->weights().expert_dtype(), dt);
      const ef::testing::PromptRun a = ef::testing::RunPrompt(**packed, prompt, 4);
      const ef::testing::PromptRun b = ef::testing::RunPrompt(**dequantized, prompt, 4);
      ASSERT_FALSE(a.logits.empty());
      const double diff = MaxAbsDiff(a.logits, b.logits);
      std::printf("%s %s: max |logit(packed) - logit(dequantized at load)| %.4g (max |logit| %.4f)\n", family.c_str(),
                  DTypeName(dt), diff, MaxAbs(b.logits));
      if (family == "deepseek_v3" && dt == DType::kBF16) {
        EXPECT_LT(diff, 4e-4);
      } else {
        EXPECT_EQ(diff, 0.0);
        EXPECT_EQ(a.tokens, b.tokens);
      }
    }
  }
}

// --- (iii) bad input: errors naming the tensor or key, never a crash ---

TEST_F(QuantCheckpointTest, BadMxfp4TensorsAreErrorsNamingThem) {
  const std::string p = "model.layers.0.mlp.experts.";
  auto write = [&](const std::string& name, std::function<void(TensorMap&, json&)> mutate) {
    QuantWriteOptions o;
    o.mutate = std::move(mutate);
    return Write("gpt_oss", name, o);
  };
  // Blocks of 8 bytes per group of 32 values: half of what the scales describe.
  ExpectLoadError(write("half_blocks",
                        [&](TensorMap& t, json&) {
                          OwnedTensor& b = t[p + "gate_up_proj_blocks"];
                          b.shape = {8, 128, 2, 8};
                          b.bytes.resize(b.bytes.size() / 2);
                        }),
                  {"\"" + p + "gate_up_proj_blocks\" has shape [8, 128, 2, 8]", "must be [8, 128, 2, 16]"});
  // Scales of one group too many per row.
  ExpectLoadError(write("wide_scales",
                        [&](TensorMap& t, json&) {
                          OwnedTensor& s = t[p + "down_proj_scales"];
                          s.shape = {8, 64, 3};
                          s.bytes.resize(8 * 64 * 3);
                        }),
                  {"\"" + p + "down_proj_scales\" has shape [8, 64, 3]", "must be [8, 64, 2]"});
  ExpectLoadError(write("float_scales",
                        [&](TensorMap& t, json&) {
                          OwnedTensor& s = t[p + "down_proj_scales"];
                          s = testing::FloatTensor(DType::kF32, s.shape, std::vector<float>(s.bytes.size(), 1.f));
                        }),
                  {"\"" + p + "down_proj_scales\" has dtype F32", "must be U8"});
  ExpectLoadError(write("no_scales", [&](TensorMap& t, json&) { t.erase(p + "gate_up_proj_scales"); }),
                  {"\"" + p + "gate_up_proj_scales\" is missing"});
  // A NaN scale (e8m0 255) in expert 3, row 5 (up row 2), second group.
  ExpectLoadError(
      write("nan_scale", [&](TensorMap& t, json&) { t[p + "gate_up_proj_scales"].bytes[(3 * 128 + 5) * 2 + 1] = 255; }),
      {"tensor \"" + p + "gate_up_proj_blocks\", expert 3, row 5, group 1 (scale byte 255)", "NaN"});
  // MXFP4 tensors without the quantization_config that announces them.
  ExpectLoadError(write("no_config", [](TensorMap&, json& c) { c.erase("quantization_config"); }),
                  {"holds MXFP4 experts", "gate_up_proj_blocks", "quant_method \"mxfp4\""});
}

TEST_F(QuantCheckpointTest, BadFp8TensorsAreErrorsNamingThem) {
  const std::string kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight";
  auto write = [&](const std::string& name, std::function<void(TensorMap&, json&)> mutate) {
    QuantWriteOptions o;
    o.block_rows = 16;
    o.block_cols = 24;
    o.mutate = std::move(mutate);
    return Write("deepseek_v3", name, o);
  };
  // kv_a [40, 64] in blocks of [16, 24] needs a grid of [3, 3]: a grid of [2, 3] leaves rows 32..39 out.
  ExpectLoadError(write("short_grid",
                        [&](TensorMap& t, json&) {
                          OwnedTensor& s = t[kv_a + "_scale_inv"];
                          s.shape = {2, 3};
                          s.bytes.resize(2 * 3 * 4);
                        }),
                  {"\"" + kv_a + "_scale_inv\" has shape [2, 3]", "weight_block_size [16, 24]",
                   "\"" + kv_a + "\" [40, 64] needs a grid of [3, 3]"});
  // The config's block size disagrees with the scales written: the first FP8 weight loaded fails.
  ExpectLoadError(
      write("other_block",
            [](TensorMap&, json& c) {
              c["quantization_config"]["weight_block_size"] = {32, 24};
            }),
      {"q_a_proj.weight_scale_inv\" has shape [2, 3]", "weight_block_size [32, 24]", "needs a grid of [1, 3]"});
  ExpectLoadError(write("no_scale", [&](TensorMap& t, json&) { t.erase(kv_a + "_scale_inv"); }),
                  {"\"" + kv_a + "_scale_inv\" is missing"});
  ExpectLoadError(write("bf16_scale",
                        [&](TensorMap& t, json&) {
                          OwnedTensor& s = t[kv_a + "_scale_inv"];
                          s = testing::FloatTensor(DType::kBF16, s.shape, testing::AsF32(s));
                        }),
                  {"\"" + kv_a + "_scale_inv\" has dtype BF16", "must be F32"});
  ExpectLoadError(write("inf_scale",
                        [&](TensorMap& t, json&) {
                          OwnedTensor& s = t[kv_a + "_scale_inv"];
                          const float inf = INFINITY;
                          std::memcpy(&s.bytes[4 * 4], &inf, 4);  // block [1, 1]
                        }),
                  {"\"" + kv_a + "_scale_inv\": the scale of block [1, 1] is inf"});
  ExpectLoadError(write("nan_code", [&](TensorMap& t, json&) { t[kv_a].bytes[7 * 64 + 9] = 0xff; }),
                  {"\"" + kv_a + "\": the FP8 code at [7, 9] is NaN"});
  // FP8 weights without the quantization_config that announces them.
  ExpectLoadError(write("no_config", [](TensorMap&, json& c) { c.erase("quantization_config"); }),
                  {"q_a_proj.weight\" has dtype F8_E4M3", "quant_method fp8"});
}

TEST_F(QuantCheckpointTest, UnknownQuantMethodIsAnErrorNamingTheKey) {
  QuantWriteOptions o;
  o.mutate = [](TensorMap&, json& c) { c["quantization_config"] = {{"quant_method", "awq"}, {"bits", 4}}; };
  const std::string dir = Write("deepseek_v3", "awq", o);
  ExpectLoadError(dir, {"config.json", "quantization_config.quant_method \"awq\" is not supported"});
  std::ofstream(dir_ / "ids.json") << R"({"input_ids": [[1, 2, 3]]})";
  RunResult r = RunBinary("score --backend cpu --model " + dir + " --ids-file " + (dir_ / "ids.json").string());
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_FALSE(r.signaled);
  EXPECT_NE(r.output.find("quantization_config.quant_method \"awq\""), std::string::npos) << r.output;
}

}  // namespace
}  // namespace ef::runtime
