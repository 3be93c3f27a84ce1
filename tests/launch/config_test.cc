// Config parser: defaults, every section, unknown keys / wrong types / impossible values with
// line numbers, byte sizes, CLI precedence, and the shipped configs/ examples.
#include "launch/config.h"

#include <gtest/gtest.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <filesystem>
#include <fstream>

#include "launch/engine_options.h"

namespace ef::launch {
namespace {

std::string Error(const std::string& yaml) {
  auto c = ParseConfig(yaml, "t.yaml");
  if (c.ok()) return "<ok>";
  // The first line is the message; EF_RETURN_IF_ERROR breadcrumbs follow.
  const std::string& m = c.status().message();
  return m.substr(0, m.find('\n'));
}

TEST(ConfigTest, EmptyFileGivesDefaults) {
  auto c = ParseConfig("", "t.yaml");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->model.path, "models/tiny-code-moe");
  EXPECT_EQ(c->cluster.exchange, "auto");
  EXPECT_EQ(c->runtime.kv_cache_dtype, "auto");
  EXPECT_EQ(c->runtime.attention_precision, "auto");
  EXPECT_EQ(c->cluster.replication, 1);
  EXPECT_DOUBLE_EQ(c->cluster.timeout_s, 30);
  EXPECT_EQ(c->cluster.peer_fetch, "ucx");
  EXPECT_EQ(c->server.port, 8080);
  EXPECT_TRUE(c->present.empty());
}

TEST(ConfigTest, ParsesEverySection) {
  auto c = ParseConfig(R"(
model: {path: m, dtype: bf16}
runtime: {backend: cpu, device: 3, max_seq_len: 512, kv_cache_dtype: bf16, kv_block_size: 32, kv_cache_tokens: 65536, cuda_graphs: off}
cluster: {exchange: mpi, ranks_per_node: 1, peer_fetch: none, placement: round_robin,
          compute_placement: contiguous, replication: 2, timeout_s: 2.5}
cache: {device_budget: 2GiB, host_budget: auto, policy: lru, prefetch_layers: 3, prefetch_min_prob: 0.75}
predictor: {kind: path, path: p.safetensors}
routing: {replay: traces/mixtral.jsonl, key: sequence}
scheduler: {max_batch_tokens: 64, max_batch_requests: 8, regroup_window: 4, rank_assignment: round_robin,
            max_prefill_tokens: 512}
server: {host: 0.0.0.0, port: 9000, api_key: secret, max_body_bytes: 64KiB, max_tokens_limit: 256}
generate: {prompt: "hi", max_new_tokens: 5, temperature: 0.7, top_p: 0.9, top_k: 40, seed: 11}
)",
                       "t.yaml");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->model.dtype, "bf16");
  EXPECT_EQ(c->runtime.device, 3);
  EXPECT_EQ(c->runtime.kv_cache_dtype, "bf16");
  EXPECT_EQ(c->runtime.kv_block_size, 32);
  EXPECT_EQ(c->runtime.kv_cache_tokens, 65536);
  EXPECT_EQ(c->runtime.cuda_graphs, "off");
  EXPECT_EQ(c->cluster.ranks_per_node, 1);
  EXPECT_EQ(c->cluster.compute_placement, "contiguous");
  EXPECT_EQ(c->cluster.replication, 2);
  EXPECT_DOUBLE_EQ(c->cluster.timeout_s, 2.5);
  EXPECT_EQ(c->cache.device_budget, 2ull << 30);
  EXPECT_EQ(c->cache.host_budget, 0u);
  EXPECT_EQ(c->predictor.path, "p.safetensors");
  EXPECT_EQ(c->scheduler.rank_assignment, "round_robin");
  EXPECT_EQ(c->scheduler.max_prefill_tokens, 512);
  EXPECT_EQ(c->server.api_key, "secret");
  EXPECT_EQ(c->server.max_body_bytes, 64u << 10);
  EXPECT_EQ(c->server.max_tokens_limit, 256);
  EXPECT_EQ(c->generate.top_k, 40);
  EXPECT_EQ(c->generate.seed, 11u);
  EXPECT_TRUE(c->has("cluster.timeout_s"));
  EXPECT_FALSE(c->has("cluster.exchange_typo"));
  // The effective config round-trips.
  auto again = ParseConfig(ConfigToYaml(*c), "again.yaml");
  ASSERT_TRUE(again.ok()) << again.status().ToString() << "\n" << ConfigToYaml(*c);
  EXPECT_EQ(again->cluster.placement, "round_robin");
  EXPECT_EQ(again->cache.device_budget, 2ull << 30);
  EXPECT_DOUBLE_EQ(again->cache.prefetch_min_prob, 0.75);
  EXPECT_EQ(again->routing.replay, "traces/mixtral.jsonl");
  EXPECT_EQ(again->routing.key, "sequence");
  EXPECT_EQ(again->runtime.kv_cache_dtype, "bf16");
  EXPECT_EQ(again->runtime.kv_block_size, 32);
  EXPECT_EQ(again->runtime.kv_cache_tokens, 65536);
  EXPECT_EQ(again->runtime.cuda_graphs, "off");
  EXPECT_EQ(again->scheduler.max_prefill_tokens, 512);
}

TEST(ConfigTest, UnknownKeysNameKeyAndLine) {
  EXPECT_EQ(Error("model:\n  path: x\nclustr:\n  exchange: mpi\n"),
            "t.yaml:3: unknown key 'clustr' (known: cache, cluster, generate, model, predictor, routing, runtime, "
            "scheduler, server)");
  EXPECT_EQ(Error("routing:\n  replay: t.jsonl\n  key: row\n"),
            "t.yaml:3: routing.key: expected one of auto|stream|sequence, got 'row'");
  const std::string e = Error("model:\n  path: x\ncluster:\n  exchange: mpi\n  replicaton: 2\n");
  EXPECT_NE(e.find("t.yaml:5: unknown key 'cluster.replicaton'"), std::string::npos) << e;
}

TEST(ConfigTest, WrongTypesNameKeyAndLine) {
  EXPECT_EQ(Error("cluster:\n  replication: two\n"), "t.yaml:2: cluster.replication: expected an integer, got 'two'");
  EXPECT_EQ(Error("server:\n  port: [1, 2]\n"), "t.yaml:2: server.port: expected an integer, got '<list>'");
  EXPECT_EQ(Error("cluster: 3\n"), "t.yaml:1: cluster: expected a map of keys");
  EXPECT_EQ(Error("generate:\n  temperature: hot\n"), "t.yaml:2: generate.temperature: expected a number, got 'hot'");
  EXPECT_EQ(Error("cache:\n  device_budget: lots\n"),
            "t.yaml:2: cache.device_budget: expected a size (bytes, e.g. 24GiB), 'N slots', 'N slots per layer', "
            "'P%' or auto, got 'lots'");
  // A value in one of the forms names that form's rule.
  EXPECT_EQ(Error("cache:\n  device_budget: 101%\n"),
            "t.yaml:2: cache.device_budget: expected a percentage of the experts in (0, 100], got '101%'");
  EXPECT_EQ(Error("cache:\n  device_budget: 0 slots per layer\n"),
            "t.yaml:2: cache.device_budget: expected 'N slots' or 'N slots per layer' with N from 1 to 16777216, got "
            "'0 slots per layer'");
  EXPECT_EQ(Error("- a\n- b\n"), "t.yaml:1: the top level must be a map of sections");
}

TEST(ConfigTest, ImpossibleValuesNameKeyAndLine) {
  EXPECT_EQ(Error("\ncluster:\n  exchange: carrier-pigeon\n"),
            "t.yaml:3: cluster.exchange: expected one of auto|mpi|nccl, got 'carrier-pigeon'");
  EXPECT_EQ(Error("runtime:\n  kv_cache_dtype: fp16\n"),
            "t.yaml:2: runtime.kv_cache_dtype: expected one of auto|fp32|bf16, got 'fp16'");
  EXPECT_EQ(Error("runtime:\n  kv_block_size: 12\n"),
            "t.yaml:2: runtime.kv_block_size: expected a power of two (a paged block's size in tokens) or 0 "
            "(contiguous), got '12'");
  EXPECT_EQ(Error("runtime:\n  kv_block_size: 2048\n"),
            "t.yaml:2: runtime.kv_block_size: expected an integer in [0, 1024], got '2048'");
  EXPECT_EQ(Error("runtime:\n  cuda_graphs: maybe\n"),
            "t.yaml:2: runtime.cuda_graphs: expected one of on|off, got 'maybe'");
  EXPECT_EQ(Error("runtime:\n  kv_cache_tokens: -5\n"),
            "t.yaml:2: runtime.kv_cache_tokens: expected an integer in [0, 2147483647], got '-5'");
  EXPECT_EQ(Error("cluster:\n  replication: 0\n"),
            "t.yaml:2: cluster.replication: expected an integer in [1, 65536], got '0'");
  EXPECT_EQ(Error("cluster:\n  placement_mode: dynamic\n"),
            "t.yaml:2: cluster.placement_mode: expected one of static|planned, got 'dynamic'");
  EXPECT_EQ(Error("cluster:\n  planned_max_imbalance: 0.9\n"),
            "t.yaml:2: cluster.planned_max_imbalance: expected a number in [1, 1e+06], got '0.9'");
  EXPECT_EQ(Error("cluster:\n  timeout_s: 0\n"),
            "t.yaml:2: cluster.timeout_s: expected a number in (0, 86400], got '0'");
  // The API's bound (OpenAI's), as generate's and bench's --temperature.
  EXPECT_EQ(Error("generate:\n  temperature: 3\n"),
            "t.yaml:2: generate.temperature: expected a number in [0, 2], got '3'");
  EXPECT_EQ(Error("server:\n  port: 70000\n"), "t.yaml:2: server.port: expected an integer in [1, 65535], got '70000'");
  EXPECT_EQ(Error("server:\n  max_body_bytes: 10\n"),
            "t.yaml:2: server.max_body_bytes: expected a size in [1KiB, 1GiB], got '10'");
  EXPECT_EQ(Error("server:\n  max_tokens_limit: -1\n"),
            "t.yaml:2: server.max_tokens_limit: expected an integer in [0, 16777216], got '-1'");
  EXPECT_EQ(Error("generate:\n  top_p: 0\n"), "t.yaml:2: generate.top_p: expected a number in (0, 1], got '0'");
  EXPECT_EQ(Error("cluster:\n  ranks_per_node: 0\n"),
            "t.yaml:2: cluster.ranks_per_node: expected an integer in [1, 65536], got '0'");
  EXPECT_NE(Error("runtime: {backend: cpu}\ncluster: {exchange: nccl}\n").find("nccl needs runtime.backend cuda"),
            std::string::npos);
  EXPECT_EQ(Error("cluster:\n  exchange: mpi\n  exchange: nccl\n"), "t.yaml:3: cluster.exchange: key given twice");
}

TEST(ConfigTest, MalformedYamlNamesLine) {
  const std::string e = Error("cluster:\n  exchange: mpi\n  bad: [1, 2\n");
  EXPECT_EQ(e.rfind("t.yaml:", 0), 0u) << e;
  EXPECT_NE(e.find("malformed YAML"), std::string::npos) << e;
}

TEST(ConfigTest, ByteSizes) {
  EXPECT_EQ(*ParseByteSize("auto"), 0u);
  EXPECT_EQ(*ParseByteSize("1024"), 1024u);
  EXPECT_EQ(*ParseByteSize("512MiB"), 512ull << 20);
  EXPECT_EQ(*ParseByteSize("1.5GiB"), 3ull << 29);
  EXPECT_EQ(*ParseByteSize("2GB"), 2000000000u);
  EXPECT_FALSE(ParseByteSize("2 parsecs").ok());
  EXPECT_FALSE(ParseByteSize("GiB").ok());
}

// Found by tests/fuzz/cluster_config_fuzzer: sizes of 2^64 bytes or more were converted from
// double to uint64_t (undefined behaviour) instead of being rejected.
TEST(ConfigTest, ByteSizesPastTwoToTheSixtyFourAreErrors) {
  EXPECT_EQ(*ParseByteSize("15TiB"), 15ull << 40);
  auto huge = ParseByteSize("555555555555555666666666666665555555555");
  ASSERT_FALSE(huge.ok());
  EXPECT_NE(huge.status().message().find("too large"), std::string::npos) << huge.status().message();
  EXPECT_FALSE(ParseByteSize("20000000000TiB").ok());
  EXPECT_FALSE(ParseConfig("cache:\n  device_budget: 555555555555555666666666666665555555555\n", "t.yaml").ok());
}

TEST(ConfigTest, DeviceBudgetInBytesOrSlots) {
  auto budget = [](const std::string& text) {
    auto c = ParseConfig("cache:\n  device_budget: " + text + "\n", "t.yaml");
    EXPECT_TRUE(c.ok()) << text << ": " << c.status().ToString();
    return c.ok() ? c->cache : CacheSection{};
  };
  CacheSection c = budget("24GiB");
  EXPECT_EQ(c.device_budget, 24ull << 30);
  EXPECT_EQ(c.device_slots + c.device_slots_per_layer, 0);
  c = budget("96 slots");
  EXPECT_EQ(c.device_slots, 96);
  EXPECT_EQ(c.device_budget, 0u);
  EXPECT_EQ(c.DeviceBudgetText(), "96 slots");
  c = budget("3 slots per layer");
  EXPECT_EQ(c.device_slots_per_layer, 3);
  EXPECT_EQ(c.DeviceBudgetText(), "3 slots per layer");
  EXPECT_TRUE(c.has_device_budget());
  c = budget("1 slot");
  EXPECT_EQ(c.device_slots, 1);
  c = budget("25%");
  EXPECT_EQ(c.device_experts_percent, 25.0);
  EXPECT_EQ(c.device_slots + c.device_slots_per_layer, 0);
  EXPECT_EQ(c.DeviceBudgetText(), "25%");
  EXPECT_TRUE(c.has_device_budget());
  c = budget("12.5%");
  EXPECT_EQ(c.device_experts_percent, 12.5);
  c = budget("auto");
  EXPECT_FALSE(c.has_device_budget());
  EXPECT_EQ(c.DeviceBudgetText(), "auto");
  // Typos and impossible counts are rejected with the key and line.
  for (const char* bad : {"3 slots per layr", "3 slotz", "slots", "0 slots", "-2 slots", "3 slots per layer x", "0%",
                          "101%", "\"%\"", "25 %", "x%", "-5%", "nan%"})
    EXPECT_NE(
        Error(std::string("cache:\n  device_budget: ") + bad + "\n").find("t.yaml:2: cache.device_budget: expected"),
        std::string::npos)
        << bad;
  // The slot forms survive the effective-config round trip.
  auto with_slots = ParseConfig("cache: {device_budget: 3 slots per layer, policy: lru}\n", "t.yaml");
  ASSERT_TRUE(with_slots.ok());
  auto again = ParseConfig(ConfigToYaml(*with_slots), "again.yaml");
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->cache.device_slots_per_layer, 3);
  auto with_percent = ParseConfig("cache: {device_budget: 50%}\n", "t.yaml");
  ASSERT_TRUE(with_percent.ok()) << with_percent.status().ToString();
  again = ParseConfig(ConfigToYaml(*with_percent), "again.yaml");
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->cache.device_experts_percent, 50.0);
  // Cache and predictor key typos are still unknown keys.
  EXPECT_NE(Error("cache:\n  device_budgt: 2GiB\n").find("t.yaml:2: unknown key 'cache.device_budgt'"),
            std::string::npos);
  EXPECT_NE(Error("predictor:\n  knd: lookahead\n").find("t.yaml:2: unknown key 'predictor.knd'"), std::string::npos);
  EXPECT_EQ(Error("cache:\n  policy: fifo\n"),
            "t.yaml:2: cache.policy: expected one of lru|lfu|expertflow|static|belady, got 'fifo'");
}

TEST(ConfigTest, CacheFlagsOverrideTheFileAndAreValidatedLikeIt) {
  auto parse = [](std::vector<std::string> args, Config* config) {
    CLI::App app;
    CacheFlags flags;
    flags.Register(&app);
    std::reverse(args.begin(), args.end());
    app.parse(args);
    return flags.Apply(app, config);
  };
  auto file = ParseConfig(
      "cache: {device_budget: 2GiB, policy: lru, prefetch_layers: 1}\npredictor: {kind: frequency}\n", "t.yaml");
  ASSERT_TRUE(file.ok());
  Config c = *file;
  ASSERT_TRUE(parse({"--cache-device-budget", "2 slots per layer", "--predictor", "lookahead"}, &c).ok());
  EXPECT_EQ(c.cache.device_slots_per_layer, 2);
  EXPECT_EQ(c.cache.device_budget, 0u);  // the flag replaced the file's bytes
  EXPECT_EQ(c.predictor.kind, "lookahead");
  EXPECT_EQ(c.cache.policy, "lru");       // not given: the file's
  EXPECT_EQ(c.cache.prefetch_layers, 1);  // not given: the file's
  EXPECT_TRUE(c.has("predictor.kind"));
  Config d;
  Status s = parse({"--cache-policy", "fifo"}, &d);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.message().substr(0, s.message().find('\n')),
            "--cache-policy: cache.policy: expected one of lru|lfu|expertflow|static|belady, got 'fifo'");
  s = parse({"--prefetch-layers", "-1"}, &d);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("--prefetch-layers: cache.prefetch_layers: expected an integer in [0, 1024]"),
            std::string::npos)
      << s.ToString();
  ASSERT_TRUE(parse({"--cpu-experts-max-rows", "16"}, &d).ok());
  EXPECT_EQ(d.cache.cpu_compute_max_rows, 16);
  s = parse({"--cpu-experts-max-rows", "65"}, &d);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("--cpu-experts-max-rows: cache.cpu_compute_max_rows: expected an integer in [1, 64]"),
            std::string::npos)
      << s.ToString();
  EXPECT_EQ(d.cache.cpu_compute_admit, 3);
  ASSERT_TRUE(parse({"--cpu-experts-admit", "0"}, &d).ok());
  EXPECT_EQ(d.cache.cpu_compute_admit, 0);
  s = parse({"--cpu-experts-admit", "-1"}, &d);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("--cpu-experts-admit: cache.cpu_compute_admit: expected an integer in [0, 1048576]"),
            std::string::npos)
      << s.ToString();
  EXPECT_EQ(d.cache.low_precision_layers, "all");
  ASSERT_TRUE(parse({"--low-precision-layers", "last 50%"}, &d).ok());
  EXPECT_EQ(d.cache.low_precision_layers, "last 50%");
  s = parse({"--low-precision-layers", "5-3"}, &d);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("--low-precision-layers: cache.low_precision_layers: the range '5-3' runs backwards"),
            std::string::npos)
      << s.ToString();
  {
    auto yaml = ParseConfig("cache: {low_precision_layers: \"16-31\"}\n", "t.yaml");
    ASSERT_TRUE(yaml.ok()) << yaml.status().ToString();
    EXPECT_EQ(yaml->cache.low_precision_layers, "16-31");
    auto again = ParseConfig(ConfigToYaml(*yaml), "again.yaml");
    ASSERT_TRUE(again.ok()) << again.status().ToString();
    EXPECT_EQ(again->cache.low_precision_layers, "16-31");
    auto typo = ParseConfig("cache: {low_precision_layers: [1, 2]}\n", "t.yaml");
    ASSERT_FALSE(typo.ok());
    EXPECT_NE(typo.status().message().find("cache.low_precision_layers: expected a string"), std::string::npos)
        << typo.status().ToString();
    auto last = ParseConfig("cache: {low_precision_layers: last half}\n", "t.yaml");
    ASSERT_FALSE(last.ok());
    EXPECT_NE(last.status().message().find("'last' takes a percentage"), std::string::npos) << last.status().ToString();
  }
  ASSERT_TRUE(parse({"--prefetch-min-prob", "0.6"}, &d).ok());
  EXPECT_DOUBLE_EQ(d.cache.prefetch_min_prob, 0.6);
  s = parse({"--prefetch-min-prob", "1.2"}, &d);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("--prefetch-min-prob: cache.prefetch_min_prob: expected"), std::string::npos)
      << s.ToString();
  s = parse({"--cache-device-budget", "3 slotz"}, &d);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("--cache-device-budget: cache.device_budget: expected"), std::string::npos);
  s = parse({"--predictor", "path"}, &d);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("--predictor path needs a trained predictor file"), std::string::npos);
  s = parse({"--predictor", "oracle"}, &d);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("predictor.kind: expected one of"), std::string::npos);
  EXPECT_FALSE(SetConfigKey("cache.nope", "1", "--x", &d).ok());
}

TEST(ConfigTest, MissingFileIsNotFound) {
  auto c = LoadConfig("/nonexistent/x.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kNotFound);
}

TEST(ConfigTest, CommandLineFlagsWinOverFileKeys) {
  auto dir = std::filesystem::temp_directory_path() / "ef_config_test";
  std::filesystem::create_directories(dir);
  const auto path = (dir / "c.yaml").string();
  {
    std::ofstream f(path);
    f << "model: {path: from-file}\nruntime: {backend: cpu, max_seq_len: 77}\n"
         "cluster: {replication: 2, timeout_s: 9, placement: round_robin}\n";
  }
  CLI::App app;
  ModelFlags model;
  ClusterFlags cluster;
  model.Register(&app);
  cluster.Register(&app);
  std::vector<std::string> args = {"--model", "from-cli", "--timeout", "4", "--config", path};
  std::reverse(args.begin(), args.end());  // CLI11 parses a reversed vector
  app.parse(args);
  ASSERT_TRUE(cluster.Load(app, &model).ok());
  EXPECT_EQ(model.dir, "from-cli");                // flag wins
  EXPECT_EQ(model.backend, "cpu");                 // file fills
  EXPECT_EQ(model.max_seq_len, 77);                // file fills
  EXPECT_DOUBLE_EQ(cluster.cluster.timeout_s, 4);  // flag wins
  EXPECT_EQ(cluster.cluster.placement.replication, 2);
  EXPECT_EQ(cluster.cluster.placement.placement, "round_robin");
  EXPECT_EQ(cluster.cluster.exchange, "auto");  // neither: default
  std::filesystem::remove_all(dir);
}

TEST(ConfigTest, ShippedConfigsParse) {
  const std::filesystem::path root = std::filesystem::path(EF_MODELS_DIR).parent_path() / "configs";
  int n = 0;
  for (const char* name : {"demo.yaml", "single_gpu_offload.yaml", "one_node_4gpu.yaml", "two_nodes_8gpu.yaml"}) {
    auto c = LoadConfig((root / name).string());
    EXPECT_TRUE(c.ok()) << name << ": " << c.status().ToString();
    ++n;
  }
  EXPECT_EQ(n, 4);
  auto demo = LoadConfig((root / "demo.yaml").string());
  ASSERT_TRUE(demo.ok());
  EXPECT_EQ(demo->model.path, "models/tiny-code-moe");
  EXPECT_EQ(demo->runtime.backend, "cpu");
  // The single-GPU example and the 2-rank demo run expert caches (the demo's budget is per rank);
  // the multi-GPU ones keep every expert resident.
  for (const char* name : {"single_gpu_offload.yaml", "demo.yaml"}) {
    auto c = LoadConfig((root / name).string());
    ASSERT_TRUE(c.ok());
    EXPECT_TRUE(c->cache.has_device_budget()) << name;
  }
  EXPECT_EQ(demo->cache.device_slots_per_layer, 2);
  for (const char* name : {"one_node_4gpu.yaml", "two_nodes_8gpu.yaml"}) {
    auto c = LoadConfig((root / name).string());
    ASSERT_TRUE(c.ok());
    EXPECT_FALSE(c->cache.has_device_budget()) << name;
  }
}

}  // namespace
}  // namespace ef::launch
