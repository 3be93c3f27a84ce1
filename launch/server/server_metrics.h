// ServerMetrics: the counters, gauges and histograms `expertflow serve` exposes on /metrics in the
// Prometheus text format (version 0.0.4).
//
// With an expert cache (SetExpertCache), /metrics also carries its counters per MoE layer and
// expert: hits, misses, and bytes per tier (host: loaded into a slot from host memory; device:
// served from a resident slot), read from the cache's store when rendered.
//
// Communication (SetCommCounters): under mpirun, the serving rank's own expert-parallel counters
// (comm::Cluster::LiveCounters, read without a collective: the other ranks are inside their Follow
// loop): all-to-all bytes by direction and exchanges, UCX peer expert fetches. These series are
// always present; without a cluster (single-process serve) they stay 0 and
// expertflow_cluster_ranks is 1.
//
// Thread safety: every method may be called from any thread. Request counters and histograms sit
// behind one mutex (a few updates per request); per-expert routing counts are relaxed atomics
// written by the engine thread's routing hook on every MoE layer and read by /metrics.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "comm/comm_counters.h"

namespace ef::cache {
class ExpertCache;
}

namespace ef::launch {

class ServerMetrics {
 public:
  ServerMetrics(int num_layers, int num_experts);

  // One finished HTTP request on `endpoint` ("/v1/completions", ...) with its status code.
  void CountRequest(const std::string& endpoint, int status);
  void AddPromptTokens(int64_t n) { prompt_tokens_.fetch_add(n, std::memory_order_relaxed); }
  void AddGeneratedTokens(int64_t n) { generated_tokens_.fetch_add(n, std::memory_order_relaxed); }
  // A running request gave its KV blocks back (to be prefilled again later).
  void CountPreemption() { preemptions_.fetch_add(1, std::memory_order_relaxed); }
  int64_t preemptions() const { return preemptions_.load(); }
  void SetQueueDepth(int64_t waiting, int64_t running) {
    waiting_.store(waiting, std::memory_order_relaxed);
    running_.store(running, std::memory_order_relaxed);
  }
  // KV cache token rows held by sequences and allocated (Engine::kv_usage).
  void SetKvCacheTokens(int64_t used, int64_t allocated) {
    kv_used_.store(used, std::memory_order_relaxed);
    kv_allocated_.store(allocated, std::memory_order_relaxed);
  }
  // Decode steps from CUDA graphs (Engine::graph_stats): replayed, shapes recorded, refused.
  void SetGraphCounts(int64_t replayed, int64_t recorded, int64_t refused) {
    graph_replays_.store(replayed, std::memory_order_relaxed);
    graphs_recorded_.store(recorded, std::memory_order_relaxed);
    graphs_refused_.store(refused, std::memory_order_relaxed);
  }
  void ObserveLatency(double seconds);
  void ObserveTimeToFirstToken(double seconds);
  void ObserveInterTokenLatency(double seconds);
  // A forward pass of `batch_tokens` rows that took `seconds` (engine thread), its MoE layers routed
  // on the device or not (runtime::Engine::last_forward_device_routed).
  void CountStep(int64_t batch_tokens, double seconds = 0, bool device_routed = false);
  // The wall time of a whole serving-loop step: its forward pass and the host work around it
  // (sampling, detokenizing, streaming, admission).
  void AddStepSeconds(double seconds);
  // Routing hook target: `num_tokens * top_k` expert ids of MoE layer `layer`.
  void CountRouting(int layer, const int32_t* ids, int64_t n);

  // The expert cache whose counters /metrics shows (nullptr: none). Not owned; call with nullptr
  // before it goes.
  void SetExpertCache(const cache::ExpertCache* cache);
  // Where /metrics reads this rank's communication counters (empty: none, the series show 0),
  // called on the rendering thread with a lock of this object held, so it must be quick and
  // thread-safe (comm::Cluster::LiveCounters is). Call with {} before what it reads goes.
  void SetCommCounters(std::function<comm::CommCounters()> read);

  // The whole exposition, ready to serve with content type text/plain; version=0.0.4.
  std::string Render() const;

  int64_t steps() const { return steps_.load(std::memory_order_relaxed); }
  int64_t device_routed_steps() const { return device_routed_steps_.load(std::memory_order_relaxed); }
  double forward_seconds() const { return 1e-9 * static_cast<double>(forward_ns_.load(std::memory_order_relaxed)); }
  // Of forward_seconds(), the passes with the routing on the device (decode steps).
  double device_routed_seconds() const {
    return 1e-9 * static_cast<double>(device_routed_ns_.load(std::memory_order_relaxed));
  }
  double step_seconds() const { return 1e-9 * static_cast<double>(step_ns_.load(std::memory_order_relaxed)); }
  int64_t expert_tokens(int layer, int expert) const {
    return expert_tokens_[static_cast<size_t>(layer) * num_experts_ + expert].load(std::memory_order_relaxed);
  }

 private:
  static constexpr std::array<double, 15> kBuckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                      0.5,   1.0,    2.5,   5.0,  10.0,  30.0, 60.0};
  struct Histogram {
    std::array<uint64_t, kBuckets.size()> counts{};  // non-cumulative per bucket
    uint64_t count = 0;
    double sum = 0;
    void Observe(double v);
    void Render(const std::string& name, const std::string& help, std::string* out) const;
  };

  const int num_layers_;
  const int num_experts_;
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;  // (endpoint, status) -> count
  Histogram latency_, ttft_, itl_;
  std::atomic<int64_t> prompt_tokens_{0}, generated_tokens_{0}, waiting_{0}, running_{0};
  std::atomic<int64_t> preemptions_{0};
  std::atomic<int64_t> kv_used_{0}, kv_allocated_{0};
  std::atomic<int64_t> graph_replays_{0}, graphs_recorded_{0}, graphs_refused_{0};
  std::atomic<int64_t> steps_{0}, step_tokens_{0}, device_routed_steps_{0}, forward_ns_{0}, device_routed_ns_{0},
      step_ns_{0};
  std::unique_ptr<std::atomic<int64_t>[]> expert_tokens_;
  const cache::ExpertCache* expert_cache_ = nullptr;   // guarded by mu_
  std::function<comm::CommCounters()> comm_counters_;  // guarded by mu_
};

}  // namespace ef::launch
