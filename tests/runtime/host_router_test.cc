// HostRouter against hand-worked routings: DeepSeek-V3's bias-corrected group-limited choice
// (weights from the uncorrected scores), DeepSeek-V2's group-limited greedy, GPT-OSS's softmax
// over the selected logits.
#include "runtime/engine/host_router.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace ef::runtime {
namespace {

float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

TEST(HostRouter, DeepseekV3GroupLimitedWithCorrectionBias) {
  ModelConfig c;
  c.num_experts = 8;
  c.top_k = 2;
  c.n_group = 4;
  c.topk_group = 2;
  c.router_scoring = RouterScoring::kSigmoid;
  c.topk_method = TopkMethod::kNoAuxTc;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5f;
  // Groups {0,1} {2,3} {4,5} {6,7}. Expert 6 has the highest logit but its group's two-expert sum
  // loses; the bias lifts expert 3 above expert 2 for selection only.
  std::vector<float> logits = {1.0f, 0.9f, 0.5f, 0.4f, -3.f, -3.f, 2.0f, -4.f};
  std::vector<float> bias = {0, 0, 0, 0.3f, 0, 0, 0, 0};
  std::vector<int32_t> ids(2);
  std::vector<float> w(2);
  HostRouter(c).Route(logits.data(), 1, bias, ids.data(), w.data());
  // Group sums (score + bias): g0 1.44, g1 1.52, g2 0.09, g3 0.90 -> groups 1, 0. Best: 3 (0.90), 0 (0.73).
  EXPECT_EQ(ids, (std::vector<int32_t>{3, 0}));
  const float s3 = Sigmoid(0.4f), s0 = Sigmoid(1.0f);
  EXPECT_NEAR(w[0], 2.5f * s3 / (s3 + s0), 1e-6);
  EXPECT_NEAR(w[1], 2.5f * s0 / (s3 + s0), 1e-6);
}

TEST(HostRouter, DeepseekV2GroupLimitedGreedyScoresAGroupByItsBest) {
  ModelConfig c;
  c.num_experts = 6;
  c.top_k = 2;
  c.n_group = 3;
  c.topk_group = 1;
  c.router_scoring = RouterScoring::kSoftmax;
  c.topk_method = TopkMethod::kGroupLimitedGreedy;
  c.routed_scaling_factor = 16.f;
  std::vector<float> logits = {0.f, 0.f, 2.f, -5.f, 1.5f, 1.5f};
  std::vector<int32_t> ids(2);
  std::vector<float> w(2);
  HostRouter(c).Route(logits.data(), 1, {}, ids.data(), w.data());
  EXPECT_EQ(ids, (std::vector<int32_t>{2, 3}));  // group 1 (best single expert), both of its experts
  float sum = 0;
  for (float l : logits) sum += std::exp(l);
  EXPECT_NEAR(w[0], 16.f * std::exp(2.f) / sum, 1e-5);
  EXPECT_NEAR(w[1], 16.f * std::exp(-5.f) / sum, 1e-5);
}

TEST(HostRouter, GptOssSoftmaxOverTheSelectedLogits) {
  ModelConfig c;
  c.num_experts = 4;
  c.top_k = 2;
  c.router_scoring = RouterScoring::kSoftmaxTopK;
  std::vector<float> logits = {0.5f, 3.f, -1.f, 2.f};
  std::vector<int32_t> ids(2);
  std::vector<float> w(2);
  HostRouter(c).Route(logits.data(), 1, {}, ids.data(), w.data());
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 3}));
  EXPECT_NEAR(w[0], 1.f / (1.f + std::exp(-1.f)), 1e-6);
  EXPECT_NEAR(w[1], 1.f / (1.f + std::exp(1.f)), 1e-6);
}

}  // namespace
}  // namespace ef::runtime
