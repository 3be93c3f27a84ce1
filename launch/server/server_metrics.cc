#include "launch/server/server_metrics.h"

#include <cstdio>

#include "cache/expert_cache.h"

namespace ef::launch {
namespace {

void Header(std::string* out, const char* name, const char* type, const char* help) {
  *out += "# HELP ";
  *out += name;
  *out += ' ';
  *out += help;
  *out += "\n# TYPE ";
  *out += name;
  *out += ' ';
  *out += type;
  *out += '\n';
}

std::string Num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

}  // namespace

ServerMetrics::ServerMetrics(int num_layers, int num_experts)
    : num_layers_(num_layers),
      num_experts_(num_experts),
      expert_tokens_(new std::atomic<int64_t>[static_cast<size_t>(num_layers) * num_experts]) {
  for (size_t i = 0; i < static_cast<size_t>(num_layers) * num_experts; ++i) expert_tokens_[i].store(0);
}

void ServerMetrics::Histogram::Observe(double v) {
  for (size_t i = 0; i < kBuckets.size(); ++i) {
    if (v <= kBuckets[i]) {
      ++counts[i];
      break;
    }
  }
  ++count;
  sum += v;
}

void ServerMetrics::Histogram::Render(const std::string& name, const std::string& help, std::string* out) const {
  Header(out, name.c_str(), "histogram", help.c_str());
  uint64_t cum = 0;
  for (size_t i = 0; i < kBuckets.size(); ++i) {
    cum += counts[i];
    *out += name + "_bucket{le=\"" + Num(kBuckets[i]) + "\"} " + std::to_string(cum) + "\n";
  }
  *out += name + "_bucket{le=\"+Inf\"} " + std::to_string(count) + "\n";
  *out += name + "_sum " + Num(sum) + "\n";
  *out += name + "_count " + std::to_string(count) + "\n";
}

void ServerMetrics::CountRequest(const std::string& endpoint, int status) {
  std::lock_guard<std::mutex> lock(mu_);
  ++requests_[{endpoint, status}];
}

void ServerMetrics::ObserveLatency(double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  latency_.Observe(seconds);
}

void ServerMetrics::ObserveTimeToFirstToken(double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  ttft_.Observe(seconds);
}

void ServerMetrics::ObserveInterTokenLatency(double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  itl_.Observe(seconds);
}

void ServerMetrics::CountStep(int64_t batch_tokens, double seconds, bool device_routed) {
  steps_.fetch_add(1, std::memory_order_relaxed);
  step_tokens_.fetch_add(batch_tokens, std::memory_order_relaxed);
  if (device_routed) {
    device_routed_steps_.fetch_add(1, std::memory_order_relaxed);
    device_routed_ns_.fetch_add(static_cast<int64_t>(seconds * 1e9), std::memory_order_relaxed);
  }
  forward_ns_.fetch_add(static_cast<int64_t>(seconds * 1e9), std::memory_order_relaxed);
}

void ServerMetrics::AddStepSeconds(double seconds) {
  step_ns_.fetch_add(static_cast<int64_t>(seconds * 1e9), std::memory_order_relaxed);
}

void ServerMetrics::CountRouting(int layer, const int32_t* ids, int64_t n) {
  if (layer < 0 || layer >= num_layers_) return;
  std::atomic<int64_t>* row = &expert_tokens_[static_cast<size_t>(layer) * num_experts_];
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] >= 0 && ids[i] < num_experts_) row[ids[i]].fetch_add(1, std::memory_order_relaxed);
  }
}

void ServerMetrics::SetExpertCache(const cache::ExpertCache* cache) {
  std::lock_guard<std::mutex> lock(mu_);
  expert_cache_ = cache;
}

void ServerMetrics::SetCommCounters(std::function<comm::CommCounters()> read) {
  std::lock_guard<std::mutex> lock(mu_);
  comm_counters_ = std::move(read);
}

namespace {

// The serving rank's own communication counters (comm::Cluster::LiveCounters); zeros without one.
void RenderComm(const comm::CommCounters& c, std::string* out) {
  Header(out, "expertflow_cluster_ranks", "gauge", "Ranks in the expert-parallel cluster (1 without mpirun).");
  *out += "expertflow_cluster_ranks " + std::to_string(c.world_size) + "\n";
  Header(out, "expertflow_a2a_bytes_total", "counter",
         "Token-row payload bytes this serving rank sent to / received from other ranks in the expert-parallel "
         "all-to-all (self rows excluded; other ranks not included); 0 without a cluster (single-process serve).");
  *out += "expertflow_a2a_bytes_total{direction=\"sent\"} " + std::to_string(c.a2a_bytes_sent) + "\n";
  *out += "expertflow_a2a_bytes_total{direction=\"received\"} " + std::to_string(c.a2a_bytes_received) + "\n";
  Header(out, "expertflow_a2a_layer_bytes_total", "counter",
         "expertflow_a2a_bytes_total by decoder layer (dense layers stay 0); absent without a cluster.");
  for (size_t l = 0; l < c.a2a_layer_bytes_sent.size() && l < c.a2a_layer_bytes_received.size(); ++l) {
    const std::string layer = "{layer=\"" + std::to_string(l) + "\",direction=";
    *out +=
        "expertflow_a2a_layer_bytes_total" + layer + "\"sent\"} " + std::to_string(c.a2a_layer_bytes_sent[l]) + "\n";
    *out += "expertflow_a2a_layer_bytes_total" + layer + "\"received\"} " +
            std::to_string(c.a2a_layer_bytes_received[l]) + "\n";
  }
  Header(out, "expertflow_a2a_exchanges_total", "counter",
         "All-to-all-v exchanges this serving rank joined (dispatch and combine per MoE layer and step, idle steps "
         "included); 0 without a cluster.");
  *out += "expertflow_a2a_exchanges_total " + std::to_string(c.a2a_exchanges) + "\n";
  Header(out, "expertflow_peer_fetch_bytes_total", "counter",
         "Expert weight bytes this serving rank read from peers' host shards with UCX gets; 0 without a cluster or "
         "when every expert is computed at its home.");
  *out += "expertflow_peer_fetch_bytes_total " + std::to_string(c.peer_fetch_bytes) + "\n";
  Header(out, "expertflow_peer_fetches_total", "counter", "UCX gets behind expertflow_peer_fetch_bytes_total.");
  *out += "expertflow_peer_fetches_total " + std::to_string(c.peer_fetches) + "\n";
}

// The expert cache's counters (cache/expert_store.h), per MoE layer and expert.
void RenderExpertCache(const cache::ExpertCache& c, std::string* out) {
  const cache::ExpertStoreStats st = c.stats();
  const cache::CacheBudget& b = c.budget();
  Header(out, "expertflow_expert_cache_slots_per_layer", "gauge",
         "Expert slots each MoE layer may hold on the device.");
  *out += "expertflow_expert_cache_slots_per_layer " + std::to_string(b.slots_per_layer) + "\n";
  Header(out, "expertflow_expert_cache_slot_bytes", "gauge", "Device bytes of one expert slot.");
  *out += "expertflow_expert_cache_slot_bytes " + std::to_string(b.slot_bytes) + "\n";
  struct Series {
    const char* name;
    const char* help;
    int64_t cache::ExpertCounters::*field;
  };
  const Series series[] = {
      {"expertflow_expert_cache_hits_total", "Expert accesses served by a resident slot.",
       &cache::ExpertCounters::hits},
      {"expertflow_expert_cache_misses_total", "Expert accesses that had to load the expert first.",
       &cache::ExpertCounters::misses},
      {"expertflow_expert_cache_prefetches_total", "Expert loads started ahead of need from the forecast.",
       &cache::ExpertCounters::prefetch_issued},
      {"expertflow_expert_cache_prefetches_used_total", "Prefetched experts acquired before their eviction.",
       &cache::ExpertCounters::prefetch_used},
  };
  auto label = [](int l, int e) { return "{layer=\"" + std::to_string(l) + "\",expert=\"" + std::to_string(e) + "\""; };
  auto at = [&](int l, int e) -> const cache::ExpertCounters& {
    return st.per_expert[static_cast<size_t>(l) * st.num_experts + e];
  };
  const std::vector<int>& layers = b.moe_layers;  // dense layers have no slots
  for (const Series& s : series) {
    Header(out, s.name, "counter", s.help);
    for (int l : layers)
      for (int e = 0; e < st.num_experts; ++e)
        *out += std::string(s.name) + label(l, e) + "} " + std::to_string(at(l, e).*s.field) + "\n";
  }
  Header(out, "expertflow_expert_cache_bytes_total", "counter",
         "Expert bytes by tier: host = loaded into a device slot from host memory, device = served from a "
         "resident slot.");
  for (int l : layers)
    for (int e = 0; e < st.num_experts; ++e) {
      *out += "expertflow_expert_cache_bytes_total" + label(l, e) + ",tier=\"host\"} " +
              std::to_string(at(l, e).bytes_from_host) + "\n";
      *out += "expertflow_expert_cache_bytes_total" + label(l, e) + ",tier=\"device\"} " +
              std::to_string(at(l, e).bytes_from_device) + "\n";
    }
}

}  // namespace

std::string ServerMetrics::Render() const {
  std::string out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Header(&out, "expertflow_requests_total", "counter", "HTTP requests served, by endpoint and status code.");
    for (const auto& [key, n] : requests_) {
      out += "expertflow_requests_total{endpoint=\"" + key.first + "\",status=\"" + std::to_string(key.second) +
             "\"} " + std::to_string(n) + "\n";
    }
    latency_.Render("expertflow_request_latency_seconds", "Time from arrival to the last token of a generation.", &out);
    ttft_.Render("expertflow_time_to_first_token_seconds", "Time from arrival to the first generated token.", &out);
    itl_.Render("expertflow_inter_token_latency_seconds", "Time between consecutive generated tokens of a request.",
                &out);
  }
  Header(&out, "expertflow_prompt_tokens_total", "counter", "Prompt tokens prefilled.");
  out += "expertflow_prompt_tokens_total " + std::to_string(prompt_tokens_.load()) + "\n";
  Header(&out, "expertflow_generated_tokens_total", "counter", "Tokens generated.");
  out += "expertflow_generated_tokens_total " + std::to_string(generated_tokens_.load()) + "\n";
  Header(&out, "expertflow_preemptions_total", "counter",
         "Running requests that gave their KV cache blocks back to be prefilled again later.");
  out += "expertflow_preemptions_total " + std::to_string(preemptions_.load()) + "\n";
  Header(&out, "expertflow_queue_depth", "gauge", "Requests waiting for admission to the running batch.");
  out += "expertflow_queue_depth " + std::to_string(waiting_.load()) + "\n";
  Header(&out, "expertflow_running_requests", "gauge", "Requests in the running batch.");
  out += "expertflow_running_requests " + std::to_string(running_.load()) + "\n";
  Header(&out, "expertflow_kv_cache_used_tokens", "gauge", "KV cache token rows held by sequences.");
  out += "expertflow_kv_cache_used_tokens " + std::to_string(kv_used_.load()) + "\n";
  Header(&out, "expertflow_kv_cache_allocated_tokens", "gauge",
         "KV cache token rows allocated (a paged pool's size; contiguous: the context limit per sequence).");
  out += "expertflow_kv_cache_allocated_tokens " + std::to_string(kv_allocated_.load()) + "\n";
  Header(&out, "expertflow_cuda_graph_replays_total", "counter",
         "Decode steps run from a recorded CUDA graph (runtime.cuda_graphs).");
  out += "expertflow_cuda_graph_replays_total " + std::to_string(graph_replays_.load()) + "\n";
  Header(&out, "expertflow_cuda_graphs_recorded_total", "counter",
         "Decode step shapes recorded as CUDA graphs (again after memory the graphs point into moved).");
  out += "expertflow_cuda_graphs_recorded_total " + std::to_string(graphs_recorded_.load()) + "\n";
  Header(&out, "expertflow_cuda_graphs_refused_total", "counter",
         "Decode step shapes the backend could not record (they run op by op).");
  out += "expertflow_cuda_graphs_refused_total " + std::to_string(graphs_refused_.load()) + "\n";
  Header(&out, "expertflow_engine_steps_total", "counter", "Forward passes run by the engine thread.");
  out += "expertflow_engine_steps_total " + std::to_string(steps_.load()) + "\n";
  Header(&out, "expertflow_engine_step_tokens_total", "counter", "Tokens computed by those forward passes.");
  out += "expertflow_engine_step_tokens_total " + std::to_string(step_tokens_.load()) + "\n";
  Header(&out, "expertflow_engine_device_routed_steps_total", "counter",
         "Forward passes whose MoE layers kept the routing on the device (no host round trip per layer).");
  out += "expertflow_engine_device_routed_steps_total " + std::to_string(device_routed_steps_.load()) + "\n";
  Header(&out, "expertflow_engine_forward_seconds_total", "counter", "Wall time of those forward passes.");
  out += "expertflow_engine_forward_seconds_total " + std::to_string(forward_seconds()) + "\n";
  Header(&out, "expertflow_engine_step_seconds_total", "counter",
         "Wall time of the serving loop's steps: the forward passes and the host work around them.");
  out += "expertflow_engine_step_seconds_total " + std::to_string(step_seconds()) + "\n";
  Header(&out, "expertflow_expert_tokens_total", "counter", "Tokens routed to each expert of each MoE layer.");
  for (int l = 0; l < num_layers_; ++l) {
    for (int e = 0; e < num_experts_; ++e) {
      out += "expertflow_expert_tokens_total{layer=\"" + std::to_string(l) + "\",expert=\"" + std::to_string(e) +
             "\"} " + std::to_string(expert_tokens(l, e)) + "\n";
    }
  }
  comm::CommCounters comm;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (comm_counters_) comm = comm_counters_();
  }
  RenderComm(comm, &out);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (expert_cache_) RenderExpertCache(*expert_cache_, &out);
  }
  return out;
}

}  // namespace ef::launch
