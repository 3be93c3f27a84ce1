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
#include <utility>
#include <vector>

#include "runtime/core/sample_row.h"
#include "runtime/core/status.h"

namespace ef::runtime {

struct SamplingParams {
  float temperature = 0.f;  // 0: greedy
  int top_k = 0;            // 0: no limit
  float top_p = 1.f;        // 1: no limit
  uint64_t seed = 0;
  // Penalties on the logits before the temperature (Penalties): OpenAI's presence and frequency
  // penalties over the generated tokens, in [-2, 2], and the repetition penalty over the prompt's
  // and the generated tokens, in (0, 10] (1: none).
  float presence_penalty = 0.f;
  float frequency_penalty = 0.f;
  float repetition_penalty = 1.f;
  // Added to the logits of these tokens (OpenAI's logit_bias, each in [-100, 100]).
  std::vector<std::pair<int32_t, float>> logit_bias = {};
  // Until this many tokens are generated, the end tokens (Penalties' `end_tokens`) cannot be drawn.
  int min_tokens = 0;

  Status Validate() const;
  // Whether a row must be adjusted on the host before the draw (Penalties).
  bool adjusts_logits() const {
    return presence_penalty != 0.f || frequency_penalty != 0.f || repetition_penalty != 1.f || !logit_bias.empty() ||
           min_tokens > 0;
  }
};

// What SamplingParams does to one request's rows before the draw, given the tokens it has seen, in
// vLLM's order: while fewer than min_tokens are generated the end tokens get -inf; logit_bias is
// added; the repetition penalty divides a positive logit (multiplies a negative one) of every token
// of the prompt or generated; logit -= frequency_penalty x count + presence_penalty for every
// generated token (count: how often it was generated).
class Penalties {
 public:
  // end_tokens: the tokens that end a request (EOS, stop token ids), barred before min_tokens.
  Penalties(const SamplingParams& params, std::span<const int32_t> prompt, std::span<const int32_t> end_tokens = {});
  bool active() const { return active_; }
  void Add(int32_t token);                         // a generated token
  void Apply(float* logits, int64_t vocab) const;  // in place; tokens outside the row are ignored
  int count(int32_t token) const;                  // times generated

 private:
  SamplingParams params_;
  bool active_ = false;
  std::vector<int32_t> end_tokens_;
  int num_generated_ = 0;
  std::vector<int32_t> seen_;                       // prompt and generated tokens (repetition), distinct
  std::vector<std::pair<int32_t, int>> generated_;  // (token, count), in first-generated order
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
