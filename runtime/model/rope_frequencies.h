// RopeFrequencies: the rotary inverse frequencies and attention factor of a model, computed as
// transformers computes them (modeling_rope_utils: default and YaRN), plus MLA's softmax scale.
#pragma once

#include <vector>

#include "runtime/model/model_config.h"

namespace ef::runtime {

struct RopeFrequencies {
  std::vector<float> inv_freq;   // [rope_dim / 2]
  float attention_factor = 1.f;  // multiplies cos and sin (YaRN); 1 for default rope

  static RopeFrequencies ForModel(const ModelConfig& c);
};

// 1/sqrt(head_dim), times DeepSeek's yarn mscale(factor, mscale_all_dim)^2 under MLA with YaRN.
float AttentionSoftmaxScale(const ModelConfig& c);

}  // namespace ef::runtime
