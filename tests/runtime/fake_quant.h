// The fake-quantized values of a weight: fp32 Dequantize(Quantize(w)) in the runtime's kQ8/kQ4
// format, or w itself where the format's group does not divide its width (the expert tiers keep
// those in the checkpoint's precision). The reference for what low-precision expert loads compute.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/core/quant.h"

namespace ef::testing {

inline std::vector<float> FakeQuantized(const runtime::Weight& w, DType t) {
  std::vector<float> v(static_cast<size_t>(w.rows * w.cols));
  ConvertToF32(w.dtype, w.data, v.data(), v.size());
  if (QuantFormat::Of(t).divides(w.cols)) {
    std::vector<std::byte> q(WeightBytes(t, w.rows, w.cols));
    EXPECT_TRUE(Quantize(t, DType::kF32, v.data(), w.rows, w.cols, q.data(), q.size()).ok());
    EXPECT_TRUE(Dequantize(t, q.data(), w.rows, w.cols, v.data()).ok());
  }
  return v;
}

}  // namespace ef::testing
