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
  std::string dtype = "auto";                 // auto (the checkpoint's) | bf16 | f16 | f32
};

struct RuntimeSection {
  std::string backend = "auto";  // auto | cuda | cpu
  int device = -1;               // GPU index; -1: the local rank (one rank per GPU)
  int max_seq_len = 0;           // KV capacity per sequence; 0: the model's maximum
};

struct ClusterSection {
  std::string exchange = "auto";           // auto (nccl on cuda, mpi on cpu) | mpi | nccl
  int ranks_per_node = 0;                  // 0 (auto): from the launcher; 1 forces UCX over TCP between ranks
  std::string peer_fetch = "ucx";          // ucx | none (every rank reads experts from its own mapping)
  std::string placement = "contiguous";    // home ranks: contiguous | round_robin | path of a JSON file
  std::string compute_placement = "home";  // compute ranks: home | contiguous | round_robin
  int replication = 1;                     // home ranks per expert, 1..world size
  double timeout_s = 30;                   // every wait on a peer gives up after this many seconds
};

struct CacheSection {
  uint64_t device_budget = 0;         // bytes of GPU expert slots; 0 (auto): what fits
  uint64_t host_budget = 0;           // bytes of pinned host expert memory; 0 (auto)
  std::string policy = "expertflow";  // lru | lfu | expertflow | static | belady
  int prefetch_layers = 2;            // layers ahead the prefetcher works, >= 0
};

struct PredictorSection {
  std::string kind = "frequency";  // none | frequency | affinity | path | lookahead | hybrid
  std::string path;                // trained predictor file (kind: path)
};

struct SchedulerSection {
  int max_batch_tokens = 256;                // >= 1
  int max_batch_requests = 32;               // >= 1
  int regroup_window = 2;                    // batches considered together when regrouping, >= 1
  std::string rank_assignment = "locality";  // locality | round_robin | least_loaded
};

struct ServerSection {
  std::string host = "127.0.0.1";
  int port = 8080;      // 1..65535
  std::string api_key;  // empty: no authentication
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
  ServerSection server;
  GenerateSection generate;
  std::set<std::string> present;  // dotted keys the file set ("cluster.exchange")

  bool has(const std::string& key) const { return present.count(key) != 0; }
};

// Reads and validates a YAML file.
StatusOr<Config> LoadConfig(const std::string& path);
// Parses YAML text; `name` is used in error messages in place of a path.
StatusOr<Config> ParseConfig(const std::string& text, const std::string& name);
// The effective configuration as YAML (every key, defaults included).
std::string ConfigToYaml(const Config& config);

// Fills `flags` from the file's keys that the command line did not give (`app` is the parsed
// subcommand): model.path -> --model, runtime.backend/device/max_seq_len.
void ApplyConfig(const Config& config, const CLI::App& app, ModelFlags* flags);
// Whether an option of `app` was given on the command line (e.g. "--prompt").
bool FlagGiven(const CLI::App& app, const std::string& name);

// The cluster section as comm options.
comm::ClusterOptions ToClusterOptions(const Config& config);

// `--config` and the cluster flags, for commands that run under mpirun (generate, score, serve,
// bench). Register() adds the flags; after parsing, Load() reads --config (if given), fills
// ModelFlags and `cluster` from the file where the command line was silent, and logs the
// effective config on rank 0.
struct ClusterFlags {
  std::string config_path;
  std::string stats_out;         // --comm-stats: per-rank communication counters as JSON (rank 0)
  Config config;                 // the file's values over the defaults (defaults when no file)
  comm::ClusterOptions cluster;  // effective cluster options

  void Register(CLI::App* app);
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
