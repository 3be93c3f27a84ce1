// `expertflow replay`: trace-driven expert cache simulation (cache/replay.h states the convention).
//
//   expertflow replay --trace T.jsonl --policy lru --slots-per-layer 4 [--json]
//   expertflow replay --trace T.jsonl --policy all --slots-per-layer 4      (comparison table)
//   expertflow replay --trace T.jsonl --policy expertflow --global-slots 64 --lookahead 2
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cache/cache_policy.h"
#include "cache/replay.h"
#include "launch/command.h"
#include "placement/routing_trace.h"

namespace ef::launch {
namespace {

struct ReplayArgs {
  std::string trace;
  std::string policy = "lru";
  int slots_per_layer = 0;
  int global_slots = 0;
  int lookahead = 4;
  bool json = false;
};

Status Validate(const ReplayArgs& a, const placement::RoutingTrace& t) {
  const int K = t.top_k(), E = t.num_experts(), L = t.num_layers();
  if (a.slots_per_layer < 0 || a.global_slots < 0)
    return InvalidArgument("--slots-per-layer and --global-slots count slots: they must be >= 1");
  if ((a.slots_per_layer > 0) == (a.global_slots > 0))
    return InvalidArgument("give exactly one of --slots-per-layer N or --global-slots M");
  if (a.slots_per_layer > 0 && (a.slots_per_layer < K || a.slots_per_layer > E))
    return InvalidArgument("--slots-per-layer " + std::to_string(a.slots_per_layer) + " outside [top_k = " +
                           std::to_string(K) + ", num_experts = " + std::to_string(E) + "] of trace " + a.trace);
  if (a.global_slots > 0 && (a.global_slots < K || a.global_slots > L * E))
    return InvalidArgument("--global-slots " + std::to_string(a.global_slots) +
                           " outside [top_k = " + std::to_string(K) +
                           ", num_layers x num_experts = " + std::to_string(L * E) + "] of trace " + a.trace);
  if (a.lookahead < 0) return InvalidArgument("--lookahead must be >= 0");
  return Status::Ok();
}

nlohmann::json ToJson(const cache::ReplayResult& r, const ReplayArgs& a, const placement::RoutingTrace& t) {
  nlohmann::json j;
  j["hit_rate"] = r.hit_rate;
  j["per_layer"] = r.layer_hit_rate;
  j["accesses"] = r.accesses;
  j["hits"] = r.hits;
  j["misses"] = r.misses;
  j["evictions"] = r.evictions;
  j["policy"] = r.policy;
  j["slots_per_layer"] = a.slots_per_layer > 0 ? nlohmann::json(a.slots_per_layer) : nlohmann::json(nullptr);
  j["global_slots"] = a.global_slots > 0 ? nlohmann::json(a.global_slots) : nlohmann::json(nullptr);
  j["forecast"] = r.forecast.empty() ? nlohmann::json(nullptr) : nlohmann::json(r.forecast);
  if (!r.forecast.empty()) j["lookahead"] = a.lookahead;
  j["trace"] = a.trace;
  j["model"] = t.header.model;
  j["num_layers"] = t.num_layers();
  j["num_experts"] = t.num_experts();
  j["top_k"] = t.top_k();
  j["tokens"] = r.num_tokens;
  return j;
}

void PrintHeader(const ReplayArgs& a, const placement::RoutingTrace& t) {
  std::printf("# trace %s\n# model %s, %d layers x %d experts, top-%d, %zu tokens\n", a.trace.c_str(),
              t.header.model.c_str(), t.num_layers(), t.num_experts(), t.top_k(), t.tokens.size());
  if (a.slots_per_layer > 0)
    std::printf("# per-layer caches of %d slots\n", a.slots_per_layer);
  else
    std::printf("# global budget of %d slots\n", a.global_slots);
}

void PrintOne(const cache::ReplayResult& r) {
  std::printf("# policy %s%s\n", r.policy.c_str(),
              r.forecast.empty() ? "" : (" (forecast: " + r.forecast + ")").c_str());
  std::printf("%6s %10s %10s %9s\n", "layer", "accesses", "hits", "hit_rate");
  for (size_t l = 0; l < r.layer_hit_rate.size(); ++l)
    std::printf("%6zu %10lld %10lld %9.4f\n", l, static_cast<long long>(r.layer_accesses[l]),
                static_cast<long long>(r.layer_hits[l]), r.layer_hit_rate[l]);
  std::printf("%6s %10lld %10lld %9.4f\n", "all", static_cast<long long>(r.accesses), static_cast<long long>(r.hits),
              r.hit_rate);
}

int Run(const ReplayArgs& a) {
  auto trace = placement::ReadRoutingTrace(a.trace);
  if (!trace.ok()) return ReportError(trace.status());
  if (Status s = Validate(a, *trace); !s.ok()) return ReportError(s);
  std::vector<std::string> policies;
  if (a.policy == "all")
    policies = cache::CachePolicyNames();
  else
    policies = {a.policy};
  std::vector<cache::ReplayResult> results;
  for (const std::string& p : policies) {
    cache::ReplayOptions o;
    o.policy = p;
    o.slots_per_layer = a.slots_per_layer;
    o.global_slots = a.global_slots;
    o.lookahead = a.lookahead;
    auto r = cache::Replay(*trace, o);
    if (!r.ok()) return ReportError(r.status());
    results.push_back(std::move(*r));
  }
  if (a.json) {
    nlohmann::json out;
    if (a.policy == "all") {
      out["policy"] = "all";
      out["results"] = nlohmann::json::array();
      for (const auto& r : results) out["results"].push_back(ToJson(r, a, *trace));
    } else {
      out = ToJson(results[0], a, *trace);
    }
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  PrintHeader(a, *trace);
  if (results.size() == 1) {
    PrintOne(results[0]);
    return 0;
  }
  std::printf("%-12s %-8s %10s %10s %10s %9s\n", "policy", "forecast", "accesses", "hits", "evictions", "hit_rate");
  for (const auto& r : results)
    std::printf("%-12s %-8s %10lld %10lld %10lld %9.4f\n", r.policy.c_str(),
                r.forecast.empty() ? "-" : r.forecast.c_str(), static_cast<long long>(r.accesses),
                static_cast<long long>(r.hits), static_cast<long long>(r.evictions), r.hit_rate);
  return 0;
}

}  // namespace

Command AddReplayCommand(CLI::App& root) {
  Command c;
  c.app = root.add_subcommand("replay", "Trace-driven expert cache simulation (hit rates per policy and layer)");
  auto args = std::make_shared<ReplayArgs>();
  c.app->add_option("--trace", args->trace, "Routing trace (moe-routing-trace JSONL)")->required();
  c.app->add_option("--policy", args->policy, "lru | lfu | belady | static | expertflow | all")->capture_default_str();
  c.app->add_option("--slots-per-layer", args->slots_per_layer, "Per-layer caches of N slots (top_k <= N <= experts)");
  c.app->add_option("--global-slots", args->global_slots, "One budget of M slots shared by all layers");
  c.app->add_option("--lookahead", args->lookahead, "expertflow: tokens of oracle forecast after the running one")
      ->capture_default_str();
  c.app->add_flag("--json", args->json, "Print one JSON object to stdout");
  c.run = [args] { return Run(*args); };
  return c;
}

}  // namespace ef::launch
