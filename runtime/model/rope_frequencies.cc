#include "runtime/model/rope_frequencies.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace ef::runtime {
namespace {

// YaRN's magnitude correction: 0.1 * mscale * ln(scale) + 1 when stretching (scale > 1).
double YarnMscale(double scale, double mscale) { return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0; }

// The dimension index at which a frequency makes num_rotations turns over max_pos positions.
double CorrectionDim(double num_rotations, int dim, double base, int max_pos) {
  return dim * std::log(max_pos / (num_rotations * 2 * std::numbers::pi)) / (2 * std::log(base));
}

}  // namespace

RopeFrequencies RopeFrequencies::ForModel(const ModelConfig& c) {
  RopeFrequencies r;
  const int dim = c.rope_dim(), half = dim / 2;
  const double base = c.rope.theta;
  r.inv_freq.resize(half);
  // transformers computes base ** (arange(0, dim, 2) / dim) in fp32; the float pow matches it.
  std::vector<float> pos_freq(half);
  for (int i = 0; i < half; ++i)
    pos_freq[i] = std::pow(static_cast<float>(base), static_cast<float>(2 * i) / static_cast<float>(dim));
  if (c.rope.type != "yarn") {
    for (int i = 0; i < half; ++i) r.inv_freq[i] = 1.0f / pos_freq[i];
    return r;
  }
  const double factor = c.rope.factor;
  if (c.rope.attention_factor > 0) {
    r.attention_factor = c.rope.attention_factor;
  } else if (c.rope.mscale > 0 && c.rope.mscale_all_dim > 0) {
    r.attention_factor =
        static_cast<float>(YarnMscale(factor, c.rope.mscale) / YarnMscale(factor, c.rope.mscale_all_dim));
  } else {
    r.attention_factor = static_cast<float>(YarnMscale(factor, 1.0));
  }
  // Dimensions below `low` keep their frequency (extrapolate), above `high` are divided by the
  // factor (interpolate), with a linear ramp between.
  const int orig = c.rope.original_max_position_embeddings;
  double low = CorrectionDim(c.rope.beta_fast, dim, base, orig);
  double high = CorrectionDim(c.rope.beta_slow, dim, base, orig);
  if (c.rope.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // transformers: prevents a division by zero
  for (int i = 0; i < half; ++i) {
    const float ramp = std::clamp(static_cast<float>((i - low) / (high - low)), 0.f, 1.f);
    const float extrapolation = 1.f - ramp;
    const float inv_extra = 1.0f / pos_freq[i];
    const float inv_inter = 1.0f / (static_cast<float>(factor) * pos_freq[i]);
    r.inv_freq[i] = inv_inter * (1 - extrapolation) + inv_extra * extrapolation;
  }
  return r;
}

float AttentionSoftmaxScale(const ModelConfig& c) {
  double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  if (c.mla && c.rope.type == "yarn" && c.rope.mscale_all_dim > 0) {
    const double m = YarnMscale(c.rope.factor, c.rope.mscale_all_dim);
    scale *= m * m;
  }
  return static_cast<float>(scale);
}

}  // namespace ef::runtime
