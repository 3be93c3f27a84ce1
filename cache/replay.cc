#include "cache/replay.h"

#include <algorithm>

#include "cache/cache_policy.h"
#include "cache/slot_cache.h"
#include "runtime/core/logging.h"

namespace ef::cache {
namespace {

// The oracle forecast at token i: tokens i..i+lookahead of the same sequence, probability 1 for
// the experts each actually used.
placement::RoutingForecast OracleForecast(const placement::RoutingTrace& trace, size_t i, int lookahead) {
  const int L = trace.num_layers(), E = trace.num_experts(), K = trace.top_k();
  size_t end = i + 1;
  while (end < trace.tokens.size() && end <= i + static_cast<size_t>(lookahead) &&
         trace.tokens[end].seq == trace.tokens[i].seq)
    ++end;
  placement::RoutingForecast f(static_cast<int>(end - i), L, E);
  for (size_t t = i; t < end; ++t)
    for (int l = 0; l < L; ++l)
      for (int j = 0; j < K; ++j) f.row(static_cast<int>(t - i), l)[trace.expert(t, l, j)] = 1.f;
  return f;
}

}  // namespace

StatusOr<ReplayResult> Replay(const placement::RoutingTrace& input, const ReplayOptions& options) {
  placement::RoutingTrace trace = input;
  trace.SortBySeqPos();
  const int L = trace.num_layers(), E = trace.num_experts(), K = trace.top_k();

  PolicyConfig pc;
  pc.num_layers = L;
  pc.num_experts = E;
  if (options.policy == "belady") {
    pc.future.reserve(trace.tokens.size() * L * K);
    for (size_t t = 0; t < trace.tokens.size(); ++t)
      for (int l = 0; l < L; ++l)
        for (int j = 0; j < K; ++j) pc.future.push_back({l, trace.expert(t, l, j)});
  }
  if (options.policy == "static") {
    pc.counts.assign(static_cast<size_t>(L) * E, 0);
    for (size_t t = 0; t < trace.tokens.size(); ++t)
      for (int l = 0; l < L; ++l)
        for (int j = 0; j < K; ++j) ++pc.counts[ExpertKey{l, trace.expert(t, l, j)}.Index(E)];
  }
  EF_ASSIGN_OR_RETURN(auto policy, MakeCachePolicy(options.policy, pc));
  SlotCacheOptions so;
  so.num_layers = L;
  so.num_experts = E;
  so.top_k = K;
  so.slots_per_layer = options.slots_per_layer;
  so.global_slots = options.global_slots;
  so.layer_quotas = options.layer_quotas;
  EF_ASSIGN_OR_RETURN(auto cache, SlotCache::Create(so, std::move(policy)));
  const bool oracle = options.policy == "expertflow";
  if (oracle && options.lookahead < 0) return InvalidArgument("replay: lookahead must be >= 0");

  ReplayResult r;
  r.policy = options.policy;
  r.forecast = oracle ? "oracle" : "";
  r.num_tokens = static_cast<int>(trace.tokens.size());
  r.layer_accesses.assign(L, 0);
  r.layer_hits.assign(L, 0);
  int64_t time = 0;
  std::vector<ExpertKey> pinned;
  for (size_t t = 0; t < trace.tokens.size(); ++t) {
    if (oracle) cache->policy().SetForecast(OracleForecast(trace, t, options.lookahead));
    for (int l = 0; l < L; ++l) {
      cache->policy().SetCurrentLayer(l);
      pinned.clear();
      for (int j = 0; j < K; ++j) {
        const ExpertKey k{l, trace.expert(t, l, j)};
        if (cache->Pin(k)) pinned.push_back(k);
      }
      for (int j = 0; j < K; ++j) {
        const ExpertKey k{l, trace.expert(t, l, j)};
        EF_ASSIGN_OR_RETURN(SlotCache::Result a, cache->Access(k, time++));
        ++r.layer_accesses[l];
        if (a.hit) {
          ++r.layer_hits[l];
        } else if (cache->Pin(k)) {
          pinned.push_back(k);
        }
        if (a.evicted) ++r.evictions;
      }
      for (const ExpertKey& k : pinned) cache->Unpin(k);
    }
  }
  r.layer_hit_rate.resize(L);
  for (int l = 0; l < L; ++l) {
    r.accesses += r.layer_accesses[l];
    r.hits += r.layer_hits[l];
    r.layer_hit_rate[l] = r.layer_accesses[l] ? static_cast<double>(r.layer_hits[l]) / r.layer_accesses[l] : 0.0;
  }
  r.misses = r.accesses - r.hits;
  r.hit_rate = r.accesses ? static_cast<double>(r.hits) / r.accesses : 0.0;
  EF_LOG(INFO, CACHE, "replay %s: %lld accesses, hit rate %.4f", r.policy.c_str(), static_cast<long long>(r.accesses),
         r.hit_rate);
  return r;
}

}  // namespace ef::cache
