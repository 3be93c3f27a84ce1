#include "runtime/engine/sampler.h"

#include <cmath>
#include <random>

namespace ef::runtime {

Status SamplingParams::Validate() const {
  if (!(temperature >= 0.f) || !std::isfinite(temperature))
    return InvalidArgument("temperature must be >= 0, got " + std::to_string(temperature));
  if (top_k < 0) return InvalidArgument("top_k must be >= 0, got " + std::to_string(top_k));
  if (!(top_p > 0.f && top_p <= 1.f)) return InvalidArgument("top_p must be in (0, 1], got " + std::to_string(top_p));
  return Status::Ok();
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
