// Compile-time limits, in one place.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ef::limits {

// A safetensors JSON header larger than this is rejected before it is read (HF's own cap).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;
inline constexpr int kMaxTensorRank = 8;
inline constexpr int kMaxLayers = 1024;
inline constexpr int kMaxExperts = 4096;
inline constexpr int kMaxTopK = 64;
inline constexpr int kMaxVocab = 1 << 22;
// OpenAI's own caps: at most 20 alternatives per token (`top_logprobs`, `logprobs: N`) and 128
// choices per request (prompts x n).
inline constexpr int kMaxTopLogprobs = 20;
inline constexpr int kMaxChoices = 128;
// Sampling temperature, the same bound for the API (OpenAI's), the config, generate and bench.
inline constexpr float kMaxTemperature = 2.f;
inline constexpr char kTemperatureRange[] = "[0, 2]";  // as the messages state it

static_assert(kMaxTopK <= kMaxExperts);
static_assert(kMaxTopLogprobs >= 1 && kMaxChoices >= 1);
static_assert(kMaxSafetensorsHeaderBytes < (1ull << 32));

}  // namespace ef::limits
