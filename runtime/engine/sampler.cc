#include "runtime/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "runtime/core/limits.h"

namespace ef::runtime {

Status SamplingParams::Validate() const {
  if (!(temperature >= 0.f && temperature <= limits::kMaxTemperature))
    return InvalidArgument(std::string("temperature must be in ") + limits::kTemperatureRange + ", got " +
                           std::to_string(temperature));
  if (top_k < 0) return InvalidArgument("top_k must be >= 0, got " + std::to_string(top_k));
  if (!(top_p > 0.f && top_p <= 1.f)) return InvalidArgument("top_p must be in (0, 1], got " + std::to_string(top_p));
  if (!(presence_penalty >= -2.f && presence_penalty <= 2.f))
    return InvalidArgument("presence_penalty must be in [-2, 2], got " + std::to_string(presence_penalty));
  if (!(frequency_penalty >= -2.f && frequency_penalty <= 2.f))
    return InvalidArgument("frequency_penalty must be in [-2, 2], got " + std::to_string(frequency_penalty));
  if (!(repetition_penalty > 0.f && repetition_penalty <= 10.f))
    return InvalidArgument("repetition_penalty must be in (0, 10], got " + std::to_string(repetition_penalty));
  for (const auto& [token, bias] : logit_bias)
    if (token < 0 || !(bias >= -100.f && bias <= 100.f))
      return InvalidArgument("logit_bias of token " + std::to_string(token) +
                             " must be in [-100, 100] for a token >= 0");
  if (min_tokens < 0) return InvalidArgument("min_tokens must be >= 0, got " + std::to_string(min_tokens));
  return Status::Ok();
}

Penalties::Penalties(const SamplingParams& params, std::span<const int32_t> prompt, std::span<const int32_t> end_tokens)
    : params_(params), active_(params.adjusts_logits()), end_tokens_(end_tokens.begin(), end_tokens.end()) {
  if (params.repetition_penalty != 1.f) {
    seen_.assign(prompt.begin(), prompt.end());
    std::sort(seen_.begin(), seen_.end());
    seen_.erase(std::unique(seen_.begin(), seen_.end()), seen_.end());
  }
}

void Penalties::Add(int32_t token) {
  if (!active_) return;
  ++num_generated_;
  if (params_.repetition_penalty != 1.f) {
    auto it = std::lower_bound(seen_.begin(), seen_.end(), token);
    if (it == seen_.end() || *it != token) seen_.insert(it, token);
  }
  for (auto& [t, n] : generated_)
    if (t == token) {
      ++n;
      return;
    }
  generated_.emplace_back(token, 1);
}

int Penalties::count(int32_t token) const {
  for (const auto& [t, n] : generated_)
    if (t == token) return n;
  return 0;
}

void Penalties::Apply(float* logits, int64_t vocab) const {
  if (!active_) return;
  if (num_generated_ < params_.min_tokens)
    for (int32_t t : end_tokens_)
      if (t >= 0 && t < vocab) logits[t] = -std::numeric_limits<float>::infinity();
  for (const auto& [t, bias] : params_.logit_bias)
    if (t >= 0 && t < vocab) logits[t] += bias;
  const float rp = params_.repetition_penalty;
  if (rp != 1.f)
    for (int32_t t : seen_)
      if (t >= 0 && t < vocab) logits[t] = logits[t] > 0.f ? logits[t] / rp : logits[t] * rp;
  if (params_.presence_penalty != 0.f || params_.frequency_penalty != 0.f)
    for (const auto& [t, n] : generated_)
      if (t >= 0 && t < vocab)
        logits[t] -= params_.frequency_penalty * static_cast<float>(n) + params_.presence_penalty;
}

Sampler::Sampler(const SamplingParams& params) : rng_(params.seed) {
  // A temperature so small that 1 / T overflows is greedy (every weight but the top one is 0).
  const float inv_t = params.temperature > 0.f ? 1.f / params.temperature : 0.f;
  row_.inv_temperature = std::isfinite(inv_t) ? inv_t : 0.f;
  row_.top_k = params.top_k;
  row_.top_p = params.top_p;
}

RowSampling Sampler::Next() {
  RowSampling r = row_;
  if (!greedy()) r.uniform = std::generate_canonical<double, 53>(rng_);
  return r;
}

int32_t Sampler::Sample(std::span<const float> logits) {
  return SampleRow(logits.data(), static_cast<int64_t>(logits.size()), Next());
}

int32_t ArgMax(std::span<const float> logits) { return ArgMaxRow(logits.data(), static_cast<int64_t>(logits.size())); }

}  // namespace ef::runtime
