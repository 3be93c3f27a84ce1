// Sampler: picks the next token from a row of logits. Greedy when temperature is 0; otherwise
// softmax(logits / temperature) restricted to the top_k most likely tokens and to the smallest
// set whose probability reaches top_p, drawn from a generator seeded per request (reproducible).
// The draw is runtime::SampleRow's (runtime/core/sample_row.h): Next() gives the parameters of one
// token, with its random draw, so the backend can sample the row (Backend::SampleRows) and pick
// the token the host would.
#pragma once

#include <cstdint>
#include <random>
#include <span>

#include "runtime/core/sample_row.h"
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
  explicit Sampler(const SamplingParams& params);
  // The token drawn from a row of logits (Next(), then SampleRow).
  int32_t Sample(std::span<const float> logits);
  // The parameters of the next token, with its random draw (a greedy sampler draws nothing).
  RowSampling Next();
  // True when every token is the arg max (temperature 0, or so small that 1 / T overflows).
  bool greedy() const { return !SamplesRandomly(row_); }

 private:
  RowSampling row_;
  std::mt19937_64 rng_;
};

// Index of the largest logit (lowest index on ties).
int32_t ArgMax(std::span<const float> logits);

}  // namespace ef::runtime
