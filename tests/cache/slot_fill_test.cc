// WriteExpertSlots: the slots written straight from the checkpoint on several threads hold the
// bytes the staged path wrote (tiers' PackFromCheckpoint, then SlotLayout::Write), in every load
// precision and without tiers; a slot too small stops the fill with an error naming its expert.
#include "cache/slot_fill.h"

#include <gtest/gtest.h>

#include <vector>

#include "runtime/engine/engine.h"
#include "tests/cache/tiny_engine.h"

namespace ef::cache {
namespace {

using testing::TinyEngine;

TEST(WriteExpertSlots, SameBytesAsTheStagedPathInEveryPrecision) {
  auto engine = TinyEngine();
  const runtime::ModelWeights& m = engine->weights();
  const runtime::ModelConfig& c = engine->config();
  for (LoadPrecision p : {LoadPrecision::kNative, LoadPrecision::kInt8, LoadPrecision::kInt4}) {
    SCOPED_TRACE(LoadPrecisionName(p));
    PrecisionOptions po;
    po.precision = p;
    ExpertTiers tiers(&m, {}, po);
    for (bool with_tiers : {true, false}) {
      if (!with_tiers && p != LoadPrecision::kNative) continue;
      const ExpertTiers* t = with_tiers ? &tiers : nullptr;
      const SlotLayout layout = SlotLayout::OfModel(kDeviceSlotAlignment, m, t);
      const size_t bytes = layout.Bytes(c.MoeLayers()[0], 0);
      std::vector<std::vector<std::byte>> staged, direct;
      std::vector<SlotFill> fills;
      for (int l : c.MoeLayers())
        for (int e = 0; e < c.num_experts; ++e) {
          std::vector<std::byte>& want = staged.emplace_back(bytes, std::byte{0});
          const runtime::ExpertWeights shape = layout.Shape(l, e);
          if (t) {
            std::vector<std::byte> packed(shape.nbytes());
            ASSERT_TRUE(tiers.PackFromCheckpoint(l, e, packed).ok());
            ASSERT_TRUE(layout.Write(shape.Rebased(packed.data()), want).ok());
          } else {
            ASSERT_TRUE(layout.Write(m.host_expert(l, e), want).ok());
          }
          direct.emplace_back(bytes, std::byte{0});
        }
      size_t i = 0;
      for (int l : c.MoeLayers())
        for (int e = 0; e < c.num_experts; ++e, ++i) fills.push_back({l, e, direct[i]});
      Progress bar("test", 0);
      ASSERT_TRUE(WriteExpertSlots(m, layout, fills, &bar, 3).ok());
      for (size_t k = 0; k < staged.size(); ++k)
        EXPECT_EQ(direct[k], staged[k]) << "expert " << fills[k].expert << " of layer " << fills[k].layer
                                        << (with_tiers ? "" : ", no tiers");
      if (p != LoadPrecision::kNative) {
        EXPECT_LT(bytes, m.host_expert(c.MoeLayers()[0], 0).nbytes());
      }
    }
  }
}

TEST(WriteExpertSlots, ASlotTooSmallStopsTheFillNamingItsExpert) {
  auto engine = TinyEngine();
  const runtime::ModelWeights& m = engine->weights();
  const runtime::ModelConfig& c = engine->config();
  PrecisionOptions po;
  po.precision = LoadPrecision::kInt4;
  ExpertTiers tiers(&m, {}, po);
  const SlotLayout layout = SlotLayout::OfModel(kDeviceSlotAlignment, m, &tiers);
  const int l = c.MoeLayers().back();
  const size_t bytes = layout.Bytes(l, 0);
  std::vector<std::vector<std::byte>> slots(c.num_experts, std::vector<std::byte>(bytes));
  slots[5].resize(bytes - 1);
  std::vector<SlotFill> fills;
  for (int e = 0; e < c.num_experts; ++e) fills.push_back({l, e, slots[e]});
  for (int threads : {1, 4}) {
    const Status st = WriteExpertSlots(m, layout, fills, nullptr, threads);
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find("expert 5 of layer " + std::to_string(l)), std::string::npos) << st.ToString();
  }
}

}  // namespace
}  // namespace ef::cache
