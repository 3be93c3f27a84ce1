// Experts quantized ahead of time (cache/quantized_experts.h, cache/expert_calibration.h): the
// expert tiers and the slot fill take the file's blocks instead of rounding, experts the file
// leaves out are rounded as before, a file that does not fit the model is refused naming why, and
// a calibration on tiny-code-moe yields GPTQ blocks with a smaller output error than rounding.
#include "cache/quantized_experts.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <vector>

#include "cache/expert_calibration.h"
#include "cache/expert_tiers.h"
#include "cache/slot_fill.h"
#include "runtime/core/quant.h"
#include "runtime/core/quant_format.h"
#include "tests/cache/tiny_engine.h"

namespace ef::cache {
namespace {

namespace fs = std::filesystem;
using testing::TinyEngine;

const runtime::Weight& PartOf(const runtime::ExpertWeights& w, int p) {
  return p == 0 ? w.gate : p == 1 ? w.up : w.down;
}

// Valid blocks unlike the rounding of the checkpoint: the rounding of the weights times -0.5.
QuantizedExperts::Block OtherBlock(const runtime::ExpertWeights& w, int l, int e, int p, DType t) {
  const runtime::Weight& x = PartOf(w, p);
  std::vector<float> f(static_cast<size_t>(x.rows * x.cols));
  ConvertToF32(x.dtype, x.data, f.data(), f.size());
  for (float& v : f) v *= -0.5f;
  QuantizedExperts::Block b{l, e, p, std::vector<std::byte>(WeightBytes(t, x.rows, x.cols))};
  EXPECT_TRUE(Quantize(t, DType::kF32, f.data(), x.rows, x.cols, b.bytes.data(), b.bytes.size()).ok());
  return b;
}

class QuantizedExpertsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    engine_ = TinyEngine();
    dir_ = fs::temp_directory_path() / ("ef_qexperts_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  const runtime::ModelWeights& m() { return engine_->weights(); }
  // Blocks for every expert of the first MoE layer.
  std::vector<QuantizedExperts::Block> FirstLayerBlocks(DType t) {
    std::vector<QuantizedExperts::Block> blocks;
    const int l = m().config().MoeLayers()[0];
    for (int e = 0; e < m().config().num_experts; ++e)
      for (int p = 0; p < 3; ++p) blocks.push_back(OtherBlock(m().host_expert(l, e), l, e, p, t));
    return blocks;
  }
  std::string Write(const std::vector<QuantizedExperts::Block>& blocks, DType t, const std::string& name = "q") {
    const std::string path = (dir_ / (name + ".safetensors")).string();
    EXPECT_TRUE(QuantizedExperts::Write(path, m(), t, "test", blocks).ok());
    return path;
  }
  std::string OpenError(const std::string& path) {
    auto q = QuantizedExperts::Open(path, m());
    return q.ok() ? "opened" : q.status().ToString();
  }

  std::unique_ptr<runtime::Engine> engine_;
  fs::path dir_;
};

TEST_F(QuantizedExpertsTest, TiersAndSlotFillTakeTheFilesBlocks) {
  for (DType t : {DType::kQ8, DType::kQ4}) {
    SCOPED_TRACE(DTypeName(t));
    const std::vector<QuantizedExperts::Block> blocks = FirstLayerBlocks(t);
    auto q = QuantizedExperts::Open(Write(blocks, t), m());
    ASSERT_TRUE(q.ok()) << q.status().ToString();
    EXPECT_EQ((*q)->dtype(), t);
    EXPECT_EQ((*q)->num_experts_held(), m().config().num_experts);
    PrecisionOptions po, plain_po;
    po.precision = plain_po.precision = t == DType::kQ8 ? LoadPrecision::kInt8 : LoadPrecision::kInt4;
    po.calibrated = *q;
    ExpertTiers tiers(&m(), {}, po), plain(&m(), {}, plain_po);
    const int l0 = m().config().MoeLayers()[0], l1 = m().config().MoeLayers()[1];
    for (int e : {0, 5}) {
      std::vector<std::byte> got(tiers.Layout(l0, e).bytes()), want;
      ASSERT_TRUE(tiers.FillPacked(l0, e, got).ok());
      for (int p = 0; p < 3; ++p) {
        const auto& b = blocks[static_cast<size_t>(e * 3 + p)].bytes;
        want.insert(want.end(), b.begin(), b.end());
      }
      EXPECT_EQ(got, want) << "expert " << e << " of the file's layer";
      // A layer the file leaves out: rounded to nearest, as without the file.
      std::vector<std::byte> other(tiers.Layout(l1, e).bytes()), rounded(other.size());
      ASSERT_TRUE(tiers.FillPacked(l1, e, other).ok());
      ASSERT_TRUE(plain.FillPacked(l1, e, rounded).ok());
      EXPECT_EQ(other, rounded);
    }
    // The CUDA pinned tier's fill: the same bytes as the staged path through these tiers, which
    // differ from the plain rounding.
    const SlotLayout layout = SlotLayout::OfModel(kDeviceSlotAlignment, m(), &tiers);
    const size_t bytes = layout.Bytes(l0, 3);
    std::vector<std::byte> direct(bytes, std::byte{0}), staged(bytes, std::byte{0}), rounded(bytes, std::byte{0});
    ASSERT_TRUE(WriteExpertSlot(m(), layout, l0, 3, direct, 1, q->get()).ok());
    std::vector<std::byte> packed(tiers.Layout(l0, 3).bytes());
    ASSERT_TRUE(tiers.PackFromCheckpoint(l0, 3, packed).ok());
    ASSERT_TRUE(layout.Write(layout.Shape(l0, 3).Rebased(packed.data()), staged).ok());
    ASSERT_TRUE(WriteExpertSlot(m(), layout, l0, 3, rounded, 1, nullptr).ok());
    EXPECT_EQ(direct, staged);
    EXPECT_NE(direct, rounded);
  }
}

TEST_F(QuantizedExpertsTest, OpenRefusesAFileThatDoesNotFitTheModel) {
  std::vector<QuantizedExperts::Block> blocks = FirstLayerBlocks(DType::kQ8);
  const int l0 = m().config().MoeLayers()[0];
  // Not this format at all: the checkpoint itself.
  EXPECT_NE(OpenError(std::string(EF_MODELS_DIR) + "/tiny-code-moe/model.safetensors").find("not a quantized-experts"),
            std::string::npos);
  EXPECT_NE(OpenError((dir_ / "missing.safetensors").string()).find("quantized experts"), std::string::npos);
  // A block of the wrong size.
  auto bad = blocks;
  bad[4].bytes.resize(bad[4].bytes.size() - 16);
  EXPECT_NE(OpenError(Write(bad, DType::kQ8, "size")).find(QuantizedExpertName(l0, 1, 1)), std::string::npos);
  // int4-sized blocks under an int8 header.
  EXPECT_NE(OpenError(Write(FirstLayerBlocks(DType::kQ4), DType::kQ8, "kind")).find("expected U8"), std::string::npos);
  // An expert with two of its three matrices.
  bad = blocks;
  bad.erase(bad.begin() + 7);
  EXPECT_NE(OpenError(Write(bad, DType::kQ8, "partial")).find("2 of its 3"), std::string::npos);
  // A tensor naming no expert of this model.
  bad = blocks;
  bad.push_back(bad[0]);
  bad.back().expert = m().config().num_experts;
  EXPECT_NE(OpenError(Write(bad, DType::kQ8, "unknown")).find("names no routed expert"), std::string::npos);
  // Made from other weights of the same shapes: the fingerprint differs.
  {
    const std::string path = (dir_ / "other.safetensors").string();
    std::vector<runtime::TensorToWrite> tensors;
    for (const auto& b : blocks)
      tensors.push_back({QuantizedExpertName(b.layer, b.expert, b.part),
                         DType::kU8,
                         {static_cast<int64_t>(b.bytes.size())},
                         b.bytes.data()});
    ASSERT_TRUE(runtime::WriteSafetensors(path, tensors,
                                          {{"format", kQuantizedExpertsFormat},
                                           {"version", "1"},
                                           {"precision", "int8"},
                                           {"fingerprint", "0123456789abcdef"}})
                    .ok());
    EXPECT_NE(OpenError(path).find("made from another checkpoint"), std::string::npos);
    ASSERT_TRUE(runtime::WriteSafetensors(path, tensors,
                                          {{"format", kQuantizedExpertsFormat},
                                           {"version", "1"},
                                           {"precision", "int3"},
                                           {"fingerprint", ExpertFingerprint(m())}})
                    .ok());
    EXPECT_NE(OpenError(path).find("precision 'int3'"), std::string::npos);
    ASSERT_TRUE(runtime::WriteSafetensors(path, tensors,
                                          {{"format", kQuantizedExpertsFormat},
                                           {"version", "7"},
                                           {"precision", "int8"},
                                           {"fingerprint", ExpertFingerprint(m())}})
                    .ok());
    EXPECT_NE(OpenError(path).find("version '7'"), std::string::npos);
  }
  // A block whose scale is not finite.
  bad = blocks;
  {
    const runtime::Weight& up = m().host_expert(l0, 2).up;
    const size_t at = QuantFormat::Of(DType::kQ8).params_offset(up.rows, up.cols) + 6;
    bad[2 * 3 + 1].bytes[at] = std::byte{0x00};
    bad[2 * 3 + 1].bytes[at + 1] = std::byte{0x7e};  // fp16 NaN
  }
  EXPECT_NE(OpenError(Write(bad, DType::kQ8, "nan")).find("not finite"), std::string::npos);
  // Truncated on disk.
  {
    const std::string path = Write(blocks, DType::kQ8, "truncated");
    fs::resize_file(path, fs::file_size(path) - 100);
    EXPECT_NE(OpenError(path), "opened");
  }
}

TEST_F(QuantizedExpertsTest, CalibrationOnTheTinyModelLowersTheOutputErrorOfItsInputs) {
  const auto act = runtime::ExpertActivationParams::ForModel(m().config());
  ExpertCalibration calib(&m(), act), held_out(&m(), act);
  ExpertCalibration* into = &calib;
  engine_->set_expose_router_inputs(true);
  engine_->AddRoutingObserver([&](runtime::LayerRouting& r) { return into->Add(r); });
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> tok(3, m().config().vocab_size - 1);
  constexpr int kSeqs = 8, kLen = 128, kHeldOut = 2;
  for (int s = 0; s < kSeqs + kHeldOut; ++s) {
    into = s < kSeqs ? &calib : &held_out;
    std::vector<int32_t> ids(kLen);
    for (auto& t : ids) t = tok(rng);
    ASSERT_TRUE(engine_->AddSequence(s).ok());
    runtime::SeqChunk chunk{s, ids, false};
    runtime::ForwardResult res;
    ASSERT_TRUE(engine_->Forward({&chunk, 1}, &res).ok());
    engine_->RemoveSequence(s);
  }
  const runtime::ModelConfig& c = m().config();
  for (int l : c.MoeLayers()) {
    int64_t routed = 0;
    for (int e = 0; e < c.num_experts; ++e) routed += calib.tokens(l, e);
    EXPECT_EQ(routed, int64_t{kSeqs} * kLen * c.top_k) << "layer " << l;
  }
  for (DType t : {DType::kQ8, DType::kQ4}) {
    SCOPED_TRACE(DTypeName(t));
    ExpertCalibration::Options o;
    o.dtype = t;
    o.min_tokens = 1;
    auto r = calib.Quantize(o, nullptr, &held_out);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    std::printf("[ gptq ] %s: output error vs rounding %.3fx on the calibration inputs, %.3fx held out\n", DTypeName(t),
                r->error_ratio, r->held_out_error_ratio);
    EXPECT_GT(r->error_ratio, 0.0);
    EXPECT_LT(r->error_ratio, 0.95);
    EXPECT_LT(r->held_out_error_ratio, 1.0);
    auto q = QuantizedExperts::Open(Write(r->blocks, t, DTypeName(t)), m());
    ASSERT_TRUE(q.ok()) << q.status().ToString();
    int seen = 0;
    int64_t fewest = INT64_MAX;
    for (int l : c.MoeLayers())
      for (int e = 0; e < c.num_experts; ++e)
        if (calib.tokens(l, e) > 0) ++seen, fewest = std::min(fewest, calib.tokens(l, e));
    EXPECT_EQ(r->experts, seen);
    EXPECT_EQ(r->fewest_tokens, fewest);
    EXPECT_EQ((*q)->num_experts_held(), seen);
    // The default minimum (the widest input, 256) leaves out the experts that saw fewer tokens.
    o.min_tokens = 0;
    auto strict = calib.Quantize(o, nullptr);
    ASSERT_TRUE(strict.ok());
    int enough = 0;
    for (int l : c.MoeLayers())
      for (int e = 0; e < c.num_experts; ++e) enough += calib.tokens(l, e) >= c.moe_intermediate_size;
    EXPECT_EQ(strict->experts, enough);
    EXPECT_EQ(strict->too_few_tokens, static_cast<int>(c.MoeLayers().size()) * c.num_experts - enough);
  }
}

}  // namespace
}  // namespace ef::cache
