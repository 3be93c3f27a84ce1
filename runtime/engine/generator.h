// Generator: batched prefill + KV-cache decode for a set of prompts, on one engine.
//
// All prompts prefill in one forward; then every unfinished sequence decodes one token per step,
// batched. A sequence stops at max_new_tokens, at an end-of-sequence token (unless ignore_eos),
// or at the KV capacity. on_token(index, token) streams tokens as they come; returning false
// from it stops that sequence.
#pragma once

#include <functional>
#include <vector>

#include "runtime/engine/engine.h"
#include "runtime/engine/sampler.h"

namespace ef::runtime {

struct GenerateRequest {
  std::vector<int32_t> prompt;
  int max_new_tokens = 16;
  SamplingParams sampling;
  bool ignore_eos = false;
};

enum class FinishReason { kLength, kStop, kContext, kCancelled };
const char* FinishReasonName(FinishReason r);

struct GenerateResult {
  std::vector<int32_t> tokens;  // new tokens only
  FinishReason finish = FinishReason::kLength;
};

using TokenCallback = std::function<bool(size_t index, int32_t token)>;

StatusOr<std::vector<GenerateResult>> Generate(Engine& engine, const std::vector<GenerateRequest>& requests,
                                               const TokenCallback& on_token = nullptr);

}  // namespace ef::runtime
