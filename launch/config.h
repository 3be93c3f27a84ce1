// Config: one YAML file (yaml-cpp) -> validated option structs with documented defaults.
//
//   EF_ASSIGN_OR_RETURN(Config cfg, LoadConfig("configs/demo.yaml"));
//   ApplyConfig(cfg, *app, &model_flags);   // file keys fill what the command line left unset
//
// Every field below has its default in place; a file sets only what it names. Unknown keys,
// wrong types and impossible values are errors that name the file, the line and the dotted key
// ("configs/x.yaml:7: cluster.replication: expected an integer >= 1, got 0"). Precedence: an
// explicit command-line flag > the config file > the command's built-in default; `present` records
// which keys the file set so commands can tell a file value from a default. Sizes accept bytes or
// units ("2GiB", "512MiB", "auto" = 0). Plain data; thread-compatible.
#pragma once

#include <cstdint>
#include <functional>
#include <set>
#include <string>

#include "comm/cluster.h"
#include "runtime/core/status.h"

namespace CLI {
class App;
}

namespace ef::launch {

struct ModelFlags;

struct ModelSection {
  std::string path = "models/tiny-code-moe";  // Hugging Face checkpoint directory
  std::string dtype = "auto";                 // auto (the checkpoint's) | bf16 | f16 | f32: must be the checkpoint's
};

struct RuntimeSection {
  std::string backend = "auto";              // auto | cuda | cpu
  int device = -1;                           // GPU index; -1: the local rank (one rank per GPU)
  int max_seq_len = 0;                       // KV capacity per sequence; 0: the model's maximum
  std::string attention_precision = "auto";  // auto | bf16 | fp32 (cuda attention)
  std::string kv_cache_dtype = "auto";       // auto | fp32 | bf16
  int kv_block_size = 16;                    // paged KV: tokens per block (power of two); 0: contiguous
  int64_t kv_cache_tokens = 0;               // paged KV capacity over all sequences; 0: grows on demand
  std::string cuda_graphs = "on";            // on | off: decode steps recorded as CUDA graphs, replayed
};

struct ClusterSection {
  std::string exchange = "auto";           // auto (nccl on cuda, mpi on cpu) | mpi | nccl
  int ranks_per_node = 0;                  // 0 (auto): from the launcher; 1 forces UCX over TCP between ranks
  std::string peer_fetch = "ucx";          // ucx | none (every rank reads experts from its own mapping)
  std::string placement = "contiguous";    // home ranks: contiguous | round_robin | path of a JSON file
  std::string compute_placement = "home";  // compute ranks: home | contiguous | round_robin
  int replication = 1;                     // home ranks per expert, 1..world size
  // static: experts are computed on their compute ranks every step; planned: per MoE layer the
  // ranks re-plan from the step's row counts, moving an overloaded rank's rows to be computed on
  // their own token's rank (comm/row_balancer.h) until the busiest rank has at most
  // planned_max_imbalance x the mean rows.
  std::string placement_mode = "static";
  double planned_max_imbalance = 1.15;  // >= 1
  // pairs (bitwise one process) | summed (results added per rank on the computing rank: fewer
  // all-to-all bytes, within float rounding of one process)
  std::string combine = "pairs";
  double timeout_s = 30;  // every wait on a peer gives up after this many seconds
};

// The expert cache (cache/expert_cache.h). With no device budget every routed expert is uploaded
// to the backend (all resident, no cache). With one, the engine holds at most that many expert
// slots; the other experts stay in host memory (pinned on CUDA) and stream in on demand and ahead
// of use, from the predictor's forecast. Outputs do not depend on the budget (up to fp32 rounding
// where cpu_compute computes misses on the host CPU).
struct CacheSection {
  // cache.device_budget, one of (at most one field is non-zero):
  //   a size, e.g. 24GiB           -> device_budget: bytes of expert slots on the backend;
  //   "N slots"                    -> device_slots: expert slots in total, split evenly over the
  //                                   MoE layers (rounded down);
  //   "N slots per layer"          -> device_slots_per_layer: expert slots of every MoE layer;
  //   "P%" (0 < P <= 100)          -> device_experts_percent: that share of every MoE layer's
  //                                   experts, rounded to the nearest slot (25% of Mixtral's 8: 2);
  //   auto or 0 (the default)      -> no cache: every expert resident.
  // Each MoE layer must get at least the model's top-k slots; a budget larger than the backend's
  // memory is an error; one that holds every expert runs no cache.
  uint64_t device_budget = 0;
  int device_slots = 0;
  int device_slots_per_layer = 0;
  double device_experts_percent = 0;
  // Bytes of host expert memory per rank; 0 (auto): every expert. One process on CUDA: the pinned
  // host tier. Under mpirun: this rank's host shard of the experts it is home for (what peers
  // fetch over UCX). Experts past it are read from the checkpoint mapping.
  uint64_t host_budget = 0;
  std::string policy = "expertflow";  // lru | lfu | expertflow | static (belady: offline replay only)
  int prefetch_layers = 2;            // MoE layers ahead the cache prefetches, >= 0; 0: on demand only
  // Prefetch only experts some token of the batch needs with at least this forecast probability
  // (0: every forecast top-k expert), and, once the layer's slots are full, at least this much more
  // probable than the resident the load would evict (else the prefetch trades a hit for a miss and
  // adds a copy). 0.9: on a copy-bound cache (batch-1 decode over PCIe) a wrong prefetch costs a
  // whole expert copy (docs/results/offload_h200).
  double prefetch_min_prob = 0.9;
  // Precision of the expert copies loaded into slots: native (alias bf16; the checkpoint's dtype,
  // outputs unchanged), lossless (bf16 packed bit-exactly: 1.32x fewer bytes a load, 1.32x the
  // experts in a budget in bytes; runtime/core/packed_bf16_format.h), int8 or int4 (quantized at
  // load, groups of 64: a load moves 1.9x / 3.6x fewer bytes than bf16; docs/results/quant).
  std::string miss_precision = "native";
  // auto (cpu backend): HOBBIT's rule. A miss whose gate weight is below low_precision_gate for
  // every token routed to it loads in low_precision; a low-precision copy used upgrade_uses times
  // is reloaded in the checkpoint's precision (0: never). Defaults from docs/results/quant.
  std::string low_precision = "int8";
  double low_precision_gate = 0.5;
  int upgrade_uses = 16;
  // The MoE layers whose loads may be low precision: all, "last P%" or decoder layer ranges
  // "A-B,C" (cache/expert_tiers.h ParseLowPrecisionLayers); the others load in the checkpoint's
  // dtype. Quantization noise early reaches every later router: "last 50%" keeps the int8 quality
  // bar on tiny-code-moe where every layer in int8 misses it (docs/results/quant).
  std::string low_precision_layers = "all";
  // How loads in the checkpoint's precision move: native (its bytes) or lossless (bf16 packed
  // bit-exactly, 0.756x the bytes): the layers outside low_precision_layers and experts the low
  // precision cannot take; with miss_precision native, every load (= miss_precision lossless).
  std::string high_precision = "native";
  // A file of experts quantized ahead of time in the low precision (`expertflow quantize`, GPTQ
  // over calibration text; cache/quantized_experts.h); empty: rounded to nearest at load.
  std::string quantized_experts;
  // cuda: compute missed experts of at most cpu_compute_max_rows rows on the host CPU from their
  // pinned copies instead of copying them: off | auto (each miss to whichever of the copy engine
  // and the host finishes it first, then one expert split between them so both end together) |
  // whole (auto without the split) | on (every such miss on the host) | split (tests: the first
  // miss of each layer split in half, the others on the host) | default (auto where it applies and
  // off elsewhere: one process on the cuda backend, experts without biases; ExpertCache::DefaultCpuCompute
  // in cache/expert_cache.h). Given explicitly, auto/whole/on are checked: the cpu backend or
  // a model they cannot run is an error.
  std::string cpu_compute = "default";
  int cpu_compute_max_rows = 4;
  // auto/whole: a miss the host could take whose expert its layer used in at least this many more
  // decode steps than the least used resident expert the step does not need is loaded into that
  // expert's slot, one per layer and step (0: the slots keep what they hold while the host takes
  // misses). Default from docs/results/cpu_compute.
  int cpu_compute_admit = 3;

  bool has_device_budget() const {
    return device_budget > 0 || device_slots > 0 || device_slots_per_layer > 0 || device_experts_percent > 0;
  }
  // The budget as written in a file: "25769803776", "24 slots", "3 slots per layer" or "auto".
  std::string DeviceBudgetText() const;
};

// The forecast that drives the expert cache's prefetch (and the expertflow policy's eviction).
struct PredictorSection {
  // none | frequency (per-layer popularity: a trained file, else counted online) | lookahead (the
  // next layers' routers on the current hidden state; no file) | path | affinity | hybrid (trained
  // files, expertflow train-predictor)
  std::string kind = "frequency";
  std::string path;  // trained predictor file (needed by path, affinity, hybrid)
};

struct SchedulerSection {
  int max_batch_tokens = 256;                // >= 1
  int max_batch_requests = 32;               // >= 1
  int max_prefill_tokens = 0;                // serving: prompt tokens prefilled per step; 0: no limit
  int regroup_window = 2;                    // batches considered together when regrouping; 0 or 1: FIFO
  std::string rank_assignment = "locality";  // locality | round_robin | least_loaded
};

// Routing override for benchmarks: every MoE layer's experts come from a recorded routing trace
// (moe-routing-trace JSONL; its layers, experts and top-k must match the model). `bench` reads it
// when --routing-trace / --routing-key are not given.
struct RoutingSection {
  std::string replay;        // trace path; empty: the model's own routers
  std::string key = "auto";  // auto | stream | sequence (see bench --routing-key)
};

struct ServerSection {
  std::string host = "127.0.0.1";
  int port = 8080;                       // 1..65535
  std::string api_key;                   // empty: no authentication
  uint64_t max_body_bytes = 8ull << 20;  // larger request bodies get 413; 1 KiB .. 1 GiB
  int max_tokens_limit = 0;              // largest max_tokens a request may ask; 0: the context
};

struct GenerateSection {
  std::string prompt = "def main(";
  int max_new_tokens = 64;  // >= 0
  float temperature = 0.f;  // >= 0; 0: greedy
  float top_p = 1.f;        // (0, 1]
  int top_k = 0;            // >= 0; 0: no limit
  uint64_t seed = 0;
};

struct Config {
  std::string source;  // the file it came from ("" for defaults)
  ModelSection model;
  RuntimeSection runtime;
  ClusterSection cluster;
  CacheSection cache;
  PredictorSection predictor;
  SchedulerSection scheduler;
  RoutingSection routing;
  ServerSection server;
  GenerateSection generate;
  std::set<std::string> present;  // dotted keys the file set ("cluster.exchange")

  bool has(const std::string& key) const { return present.count(key) != 0; }
};

// Reads and validates a YAML file.
StatusOr<Config> LoadConfig(const std::string& path);
// Parses YAML text; `name` is used in error messages in place of a path.
StatusOr<Config> ParseConfig(const std::string& text, const std::string& name);
// The effective configuration as YAML (every key, defaults included). Without command_sections:
// only the sections every command applies alike (model, runtime, cluster, cache, predictor,
// routing), not scheduler, server and generate, whose effective values each command sets itself.
std::string ConfigToYaml(const Config& config, bool command_sections = true);

// Sets one key from text as if the file had it (same validation; errors name `origin`, e.g. the
// command-line flag, and the key) and marks it present.
Status SetConfigKey(const std::string& dotted_key, const std::string& value, const std::string& origin, Config* config);
// Parses a cache.device_budget value (see CacheSection) into `cache`'s three budget fields.
Status ParseDeviceBudget(const std::string& text, CacheSection* cache);

// Fills `flags` from the file's keys that the command line did not give (`app` is the parsed
// subcommand): model.path -> --model, runtime.backend/device/max_seq_len.
void ApplyConfig(const Config& config, const CLI::App& app, ModelFlags* flags);
// Whether an option of `app` was given on the command line (e.g. "--prompt").
bool FlagGiven(const CLI::App& app, const std::string& name);

// The cluster section as comm options.
comm::ClusterOptions ToClusterOptions(const Config& config);

// The expert cache flags (generate, score, serve). Each one given overrides its config key:
//   --cache-device-budget -> cache.device_budget   --cache-host-budget -> cache.host_budget
//   --cache-policy        -> cache.policy          --prefetch-layers   -> cache.prefetch_layers
//   --prefetch-min-prob   -> cache.prefetch_min_prob
//   --miss-precision      -> cache.miss_precision
//   --low-precision, --low-precision-gate, --upgrade-uses -> cache.low_precision, ...
//   --low-precision-layers -> cache.low_precision_layers
//   --high-precision       -> cache.high_precision
//   --quantized-experts   -> cache.quantized_experts
//   --cpu-experts         -> cache.cpu_compute     --cpu-experts-max-rows -> cache.cpu_compute_max_rows
//   --cpu-experts-admit   -> cache.cpu_compute_admit
//   --predictor           -> predictor.kind        --predictor-path    -> predictor.path
struct CacheFlags {
  std::string device_budget, host_budget, policy, prefetch_layers, prefetch_min_prob, miss_precision, low_precision,
      low_precision_gate, upgrade_uses, low_precision_layers, high_precision, quantized_experts, cpu_compute,
      cpu_compute_max_rows, cpu_compute_admit, predictor, predictor_path;

  void Register(CLI::App* app);
  // Writes the flags given on the command line into `config` (validated like the file's keys).
  Status Apply(const CLI::App& app, Config* config) const;
};

// `--config`, the cluster flags and the expert cache flags, for commands that run under mpirun
// (generate, score). Register() adds the flags; after parsing, Load() reads --config (if given),
// fills ModelFlags and `cluster` from the file where the command line was silent, applies the
// cache flags to `config`, and logs the effective config on rank 0.
struct ClusterFlags {
  std::string config_path;
  std::string stats_out;         // --comm-stats: per-rank communication counters as JSON (rank 0)
  Config config;                 // the file's values over the defaults (defaults when no file), cache flags applied
  comm::ClusterOptions cluster;  // effective cluster options
  CacheFlags cache;

  // short_config: also `-c` for --config (bench keeps -c for its concurrency).
  void Register(CLI::App* app, bool short_config = true);
  Status Load(const CLI::App& app, ModelFlags* model);
};

// Runs a command body in the distributed runtime: loads --config (a bad file is reported by
// every rank, and every rank exits 1), initialises MPI when launched by mpirun, maps the local
// rank to a GPU (runtime.device auto), logs the effective config on rank 0, runs `body`; an error
// under mpirun is reported and aborts every rank (MPI_Abort) so no peer waits for it. Finalises
// MPI. Returns the process exit code.
int RunDistributed(const CLI::App& app, ModelFlags* model, ClusterFlags* cluster,
                   const std::function<Status(comm::MpiContext*)>& body);

// Parses "2GiB", "512MiB", "1000", "auto" (0). For tests and other commands.
StatusOr<uint64_t> ParseByteSize(const std::string& text);

}  // namespace ef::launch
