// Trace-driven replay of an expert cache, following the cache-simulation convention of the shared
// traces README so numbers compare across tools:
//   - accesses in (seq, pos) order; for each token, layers 0..L-1; at each layer the token's
//     experts in listed order; a hit is an access to a resident expert; caches start empty;
//   - per-layer caches of N slots (or a global budget / per-layer quotas, see SlotCache);
//   - while a token runs a layer, its top-k experts of that layer are pinned (they must be
//     resident together to compute), so a miss never evicts another expert of the same token and
//     layer. With this rule LRU gives 0.601 and Belady 0.733 on mixtral8x7b_gsm8k_decode at N = 4.
// Policy inputs come from the trace itself: `belady` gets the full access sequence, `static` the
// trace's expert counts, `expertflow` an oracle forecast (the true routing of the running token
// and of the next `lookahead` tokens of the same sequence), labelled "oracle".
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "placement/routing_trace.h"
#include "runtime/core/status.h"

namespace ef::cache {

struct ReplayOptions {
  std::string policy = "lru";     // a MakeCachePolicy name
  int slots_per_layer = 0;        // per-layer caches of this many slots, or
  int global_slots = 0;           // one budget shared by all layers, or
  std::vector<int> layer_quotas;  // fixed per-layer quotas (exactly one of the three)
  int lookahead = 4;              // expertflow: tokens after the running one in the oracle forecast
};

struct ReplayResult {
  std::string policy;
  std::string forecast;  // "oracle" for expertflow, "" otherwise
  int num_tokens = 0;
  int64_t accesses = 0;
  int64_t hits = 0;
  int64_t misses = 0;  // accesses - hits
  int64_t evictions = 0;
  double hit_rate = 0.0;  // hits / accesses
  std::vector<int64_t> layer_accesses;
  std::vector<int64_t> layer_hits;
  std::vector<double> layer_hit_rate;
};

// Errors: unknown policy, a budget the trace's shape cannot use (smaller than top_k, larger than
// num_experts per layer) -> InvalidArgument.
StatusOr<ReplayResult> Replay(const placement::RoutingTrace& trace, const ReplayOptions& options);

}  // namespace ef::cache
