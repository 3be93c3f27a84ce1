// Sampler: picks the next token from a row of logits. Greedy when temperature is 0; otherwise
// softmax(logits / temperature) restricted to the top_k most likely tokens and to the smallest
// set whose probability reaches top_p, drawn from a generator seeded per request (reproducible).
#pragma once

#include <cstdint>
#include <random>
#include <span>

#include "runtime/core/status.h"

namespace ef::runtime {

struct SamplingParams {
  float temperature = 0.f;  // 0: greedy
  int top_k = 0;            // 0: no limit
  float top_p = 1.f;        // 1: no limit
  uint64_t seed = 0;

  Status Validate() const;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  int32_t Sample(std::span<const float> logits);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

// Index of the largest logit (lowest index on ties).
int32_t ArgMax(std::span<const float> logits);

}  // namespace ef::runtime
