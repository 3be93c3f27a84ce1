// ExpertPathSet: the predicted routing path of each of a set of tokens as one bitset per token.
//
// Bit (layer * num_experts + expert) of a token's row is set when the token is predicted to use
// `expert` at `layer`. Layers are packed densely into 64-bit words (a layer may straddle two
// words), so the number of distinct experts a batch activates, summed over layers, is simply the
// popcount of the OR of its rows. This keeps every scheduler objective a handful of word
// operations: 8 layers x 64 experts is 8 words, 32 layers x 8 experts is 4 words.
//
// Rows are immutable after construction. Not thread-safe for concurrent mutation; concurrent
// reads are fine.
#pragma once

#include <bit>
#include <cstdint>
#include <span>
#include <vector>

#include "placement/routing_forecast.h"
#include "placement/routing_trace.h"
#include "runtime/core/status.h"

namespace ef::scheduler {

// Up to this many experts per layer (the scheduler's bitsets support 256: DeepSeek-V3 size).
inline constexpr int kMaxExpertsPerLayer = 256;
inline constexpr int kMaxLayers = 256;

class ExpertPathSet {
 public:
  ExpertPathSet() = default;
  // num_tokens rows, all clear.
  ExpertPathSet(int num_tokens, int num_layers, int num_experts);

  // The true routing of trace tokens `indices` (an "oracle" forecast), in the given order.
  static StatusOr<ExpertPathSet> FromTrace(const placement::RoutingTrace& trace, std::span<const size_t> indices);
  // The top_k most probable experts of every (token, layer) of a forecast.
  static StatusOr<ExpertPathSet> FromForecast(const placement::RoutingForecast& forecast, int top_k);

  int num_tokens() const { return num_tokens_; }
  int num_layers() const { return num_layers_; }
  int num_experts() const { return num_experts_; }
  int num_words() const { return num_words_; }

  void Set(int token, int layer, int expert) {
    const int bit = layer * num_experts_ + expert;
    words_[static_cast<size_t>(token) * num_words_ + bit / 64] |= uint64_t{1} << (bit % 64);
  }
  bool Test(int token, int layer, int expert) const {
    const int bit = layer * num_experts_ + expert;
    return (words_[static_cast<size_t>(token) * num_words_ + bit / 64] >> (bit % 64)) & 1;
  }
  const uint64_t* row(int token) const { return words_.data() + static_cast<size_t>(token) * num_words_; }
  uint64_t* row(int token) { return words_.data() + static_cast<size_t>(token) * num_words_; }

  // Distinct (layer, expert) pairs activated by a group of tokens (sum over layers of distinct experts).
  int CountDistinct(std::span<const int> tokens) const;
  // Distinct experts of one layer activated by a group of tokens.
  int CountDistinctInLayer(std::span<const int> tokens, int layer) const;

 private:
  int num_tokens_ = 0;
  int num_layers_ = 0;
  int num_experts_ = 0;
  int num_words_ = 0;
  std::vector<uint64_t> words_;  // [token][word]
};

}  // namespace ef::scheduler
