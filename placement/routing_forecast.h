// RoutingForecast: for each token of a batch, the probability that each expert of each MoE
// layer routes it. Produced by a Predictor before the batch runs; consumed by the cache
// (prefetch), the planner and the token scheduler.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace ef::placement {

struct RoutingForecast {
  int num_tokens = 0;
  int num_layers = 0;
  int num_experts = 0;
  std::vector<float> prob;  // [token][layer][expert], row-major

  RoutingForecast() = default;
  RoutingForecast(int tokens, int layers, int experts)
      : num_tokens(tokens),
        num_layers(layers),
        num_experts(experts),
        prob(static_cast<size_t>(tokens) * layers * experts, 0.f) {}

  float* row(int token, int layer) {
    return prob.data() + (static_cast<size_t>(token) * num_layers + layer) * num_experts;
  }
  const float* row(int token, int layer) const {
    return prob.data() + (static_cast<size_t>(token) * num_layers + layer) * num_experts;
  }
  // The k most probable experts of (token, layer), most probable first (ties: lower id first).
  std::vector<int> TopK(int token, int layer, int k) const {
    const float* p = row(token, layer);
    std::vector<int> idx(num_experts);
    std::iota(idx.begin(), idx.end(), 0);
    k = std::min(k, num_experts);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                      [p](int a, int b) { return p[a] != p[b] ? p[a] > p[b] : a < b; });
    idx.resize(k);
    return idx;
  }
};

}  // namespace ef::placement
