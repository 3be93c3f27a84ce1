// SlotLayout: parts back to back at alignment 1 (the packed bytes the tiers write), on 256-byte
// boundaries for the device slots; Write then At gives back every part's bytes; a destination
// shorter than the layout is an error; the tiers' resident layout under one precision is what every
// load writes, whichever path wrote it.
#include "cache/slot_layout.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "cache/expert_tiers.h"
#include "runtime/engine/engine.h"

namespace ef::cache {
namespace {

runtime::ExpertWeights Shape(bool bias) {
  runtime::ExpertWeights w;
  w.gate = runtime::Weight{DType::kF32, nullptr, 5, 3};  // 60 bytes
  w.up = runtime::Weight{DType::kF32, nullptr, 5, 3};
  w.down = runtime::Weight{DType::kF32, nullptr, 3, 5};
  if (bias) {
    w.gate_bias = runtime::Weight{DType::kF32, nullptr, 1, 5};
    w.up_bias = runtime::Weight{DType::kF32, nullptr, 1, 5};
    w.down_bias = runtime::Weight{DType::kF32, nullptr, 1, 3};
  }
  return w;
}

TEST(SlotLayout, PackedAndDeviceOffsets) {
  const runtime::ExpertWeights s = Shape(false);
  const SlotLayout packed(1, [&](int, int) { return s; });
  EXPECT_EQ(packed.Offsets(s), (std::vector<size_t>{0, 60, 120}));
  EXPECT_EQ(packed.Bytes(0, 0), s.nbytes());
  const SlotLayout device(kDeviceSlotAlignment, [&](int, int) { return s; });
  EXPECT_EQ(device.Offsets(s), (std::vector<size_t>{0, 256, 512}));
  EXPECT_EQ(device.Bytes(0, 0), 512u + 60u);
  EXPECT_EQ(device.Offsets(Shape(true)).size(), 6u);  // the biases follow, each aligned too
}

TEST(SlotLayout, WriteThenAtGivesEveryPartBack) {
  const runtime::ExpertWeights s = Shape(true);
  for (size_t alignment : {size_t{1}, kDeviceSlotAlignment}) {
    const SlotLayout layout(alignment, [&](int, int) { return s; });
    // The expert packed, with distinct bytes, as the tiers write it.
    std::vector<std::byte> packed(s.nbytes());
    for (size_t i = 0; i < packed.size(); ++i) packed[i] = static_cast<std::byte>(i * 7 + 1);
    const runtime::ExpertWeights from = s.Rebased(packed.data());
    std::vector<std::byte> slot(layout.Bytes(s), std::byte{0});
    ASSERT_TRUE(layout.Write(from, slot).ok());
    const runtime::ExpertWeights got = layout.At(3, 4, slot.data());
    const std::vector<const runtime::Weight*> a = from.parts(), b = got.parts();
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(b[i]->rows, a[i]->rows);
      EXPECT_EQ(std::memcmp(a[i]->data, b[i]->data, a[i]->nbytes()), 0) << "alignment " << alignment << " part " << i;
    }
    std::vector<std::byte> short_slot(layout.Bytes(s) - 1);
    const Status st = layout.Write(from, short_slot);
    EXPECT_FALSE(st.ok());
    EXPECT_NE(st.message().find("spans"), std::string::npos) << st.ToString();
  }
}

TEST(SlotLayout, ResidentLayoutOfOnePrecisionIsItsLayoutBeforeAnyLoad) {
  runtime::EngineOptions o;
  o.backend = "cpu";
  auto engine = runtime::Engine::Create(std::string(EF_MODELS_DIR) + "/tiny-code-moe", o);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const runtime::ModelWeights& m = (*engine)->weights();
  const int l = (*engine)->config().MoeLayers()[0];
  PrecisionOptions p;
  p.precision = LoadPrecision::kInt8;
  ExpertTiers tiers(&m, {}, p);
  // A CUDA pinned tier is filled with PackFromCheckpoint, which FillPacked never sees: the slot
  // still holds the int8 layout.
  const SlotLayout layout = SlotLayout::OfModel(kDeviceSlotAlignment, m, &tiers);
  EXPECT_EQ(layout.Shape(l, 0).gate.dtype, DType::kQ8);
  EXPECT_LT(layout.Bytes(l, 0), m.host_expert(l, 0).nbytes());
  const SlotLayout native = SlotLayout::OfModel(1, m, nullptr);
  EXPECT_EQ(native.Bytes(l, 0), m.host_expert(l, 0).nbytes());
}

}  // namespace
}  // namespace ef::cache
