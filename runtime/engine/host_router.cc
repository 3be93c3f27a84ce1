#include "runtime/engine/host_router.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace ef::runtime {
namespace {

// Indices of the k largest values, highest first, ties to the lower index.
void TopK(const std::vector<float>& v, int k, std::vector<int>* order) {
  order->resize(v.size());
  std::iota(order->begin(), order->end(), 0);
  std::partial_sort(order->begin(), order->begin() + k, order->end(),
                    [&](int a, int b) { return v[a] != v[b] ? v[a] > v[b] : a < b; });
  order->resize(k);
}

}  // namespace

HostRouter::HostRouter(const ModelConfig& c)
    : scoring_(c.router_scoring),
      method_(c.topk_method),
      num_experts_(c.num_experts),
      top_k_(c.top_k),
      n_group_(c.n_group),
      topk_group_(c.topk_group),
      norm_topk_prob_(c.norm_topk_prob),
      routed_scaling_factor_(c.routed_scaling_factor) {}

void HostRouter::Route(const float* logits, int64_t rows, std::span<const float> correction_bias, int32_t* ids,
                       float* weights) const {
  const int E = num_experts_, K = top_k_, per_group = E / n_group_;
  std::vector<float> score(E), choice(E), group_score(n_group_);
  std::vector<int> order, groups;
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits + r * E;
    if (scoring_ == RouterScoring::kSigmoid) {
      for (int e = 0; e < E; ++e) score[e] = 1.0f / (1.0f + std::exp(-l[e]));
    } else if (scoring_ == RouterScoring::kSoftmax) {
      const float mx = *std::max_element(l, l + E);
      float sum = 0;
      for (int e = 0; e < E; ++e) sum += (score[e] = std::exp(l[e] - mx));
      for (int e = 0; e < E; ++e) score[e] /= sum;
    } else {
      std::copy(l, l + E, score.begin());
    }
    // Selection scores: the bias steers which experts are chosen, never their weights.
    for (int e = 0; e < E; ++e) choice[e] = score[e] + (correction_bias.empty() ? 0.f : correction_bias[e]);
    if (method_ != TopkMethod::kGreedy) {
      for (int g = 0; g < n_group_; ++g) {
        std::vector<float> in(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
        std::sort(in.begin(), in.end(), std::greater<float>());
        group_score[g] = method_ == TopkMethod::kNoAuxTc ? in[0] + in[1] : in[0];
      }
      TopK(group_score, topk_group_, &groups);
      std::vector<bool> keep(n_group_, false);
      for (int g : groups) keep[g] = true;
      for (int e = 0; e < E; ++e)
        if (!keep[e / per_group]) choice[e] = -INFINITY;
    }
    TopK(choice, K, &order);
    float* w = weights + r * K;
    if (scoring_ == RouterScoring::kSoftmaxTopK) {
      const float mx = score[order[0]];
      float sum = 0;
      for (int j = 0; j < K; ++j) sum += (w[j] = std::exp(score[order[j]] - mx));
      for (int j = 0; j < K; ++j) w[j] /= sum;
    } else {
      float sum = 0;
      for (int j = 0; j < K; ++j) sum += (w[j] = score[order[j]]);
      if (norm_topk_prob_)
        for (int j = 0; j < K; ++j) w[j] /= sum + 1e-20f;
      for (int j = 0; j < K; ++j) w[j] *= routed_scaling_factor_;
    }
    for (int j = 0; j < K; ++j) ids[r * K + j] = order[j];
  }
}

}  // namespace ef::runtime
