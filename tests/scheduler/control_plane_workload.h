// Routing workloads for the control plane at scale (tests/perf/control_plane_bench.cc and
// control_plane_scale_test.cc): a batch's oracle forecast (probability 1 for every expert the
// token is routed to) from a recorded trace, or from a synthetic skewed router of a given shape.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "placement/routing_forecast.h"
#include "placement/routing_trace.h"

namespace ef::scheduler::testing {

// Tokens [first, first + n) of a trace (file order) as a forecast.
inline placement::RoutingForecast ForecastFromTrace(const placement::RoutingTrace& trace, size_t first, int n) {
  const int layers = trace.header.num_layers, experts = trace.header.num_experts, k = trace.header.top_k;
  placement::RoutingForecast f(n, layers, experts);
  for (int t = 0; t < n; ++t) {
    const placement::TraceToken& tok = trace.tokens[(first + t) % trace.tokens.size()];
    for (int l = 0; l < layers; ++l)
      for (int j = 0; j < k; ++j) f.row(t, l)[tok.experts[static_cast<size_t>(l) * k + j]] = 1.f;
  }
  return f;
}

// A skewed router: at each layer expert popularity follows Zipf(s) over a per-layer permutation;
// each token takes top_k distinct experts drawn by popularity. DeepSeek-V3's MoE shape is 58 layers
// x 256 experts, top-8.
inline placement::RoutingForecast SkewedForecast(int tokens, int layers, int experts, int top_k, double s,
                                                 uint64_t seed) {
  std::mt19937_64 rng(seed);
  placement::RoutingForecast f(tokens, layers, experts);
  std::vector<double> w(experts);
  std::vector<int> perm(experts);
  for (int l = 0; l < layers; ++l) {
    std::iota(perm.begin(), perm.end(), 0);
    std::mt19937_64 layer_rng(seed * 7919 + l);
    std::shuffle(perm.begin(), perm.end(), layer_rng);
    for (int i = 0; i < experts; ++i) w[perm[i]] = 1.0 / std::pow(i + 1, s);
    for (int t = 0; t < tokens; ++t) {
      std::vector<double> left = w;
      for (int j = 0; j < top_k; ++j) {
        std::discrete_distribution<int> pick(left.begin(), left.end());
        const int e = pick(rng);
        f.row(t, l)[e] = 1.f;
        left[e] = 0;
      }
    }
  }
  return f;
}

}  // namespace ef::scheduler::testing
