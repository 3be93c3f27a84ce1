// `expertflow bench` end to end: the real binary on synthetic weights, its JSON record and its
// errors. Each run writes into its own temporary directory.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

namespace ef::launch {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kMixtralTrace = std::string(EF_TEST_DATA) + "/traces/mixtral8x7b_gsm8k_decode.jsonl";

class BenchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("ef_bench_test_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Runs `expertflow bench ARGS` with synthetic checkpoints cached in the test's directory;
  // returns the exit code; stdout and stderr go to files read by Out()/Err().
  int Bench(const std::string& args) {
    const std::string cmd = std::string(EF_BINARY) + " bench --backend cpu --synthetic-dir " +
                            (dir_ / "synth").string() + " " + args + " >" + (dir_ / "stdout").string() + " 2>" +
                            (dir_ / "stderr").string();
    const int rc = std::system(cmd.c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  }
  std::string Read(const fs::path& p) {
    std::ifstream in(p);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  std::string Out() { return Read(dir_ / "stdout"); }
  std::string Err() { return Read(dir_ / "stderr"); }

  fs::path dir_;
};

// A budget as a share of the experts: 25% of tiny's 8 experts per layer is 2 slots; 10% (one
// slot) is below its top-k of 2, refused naming both numbers.
TEST_F(BenchTest, DeviceBudgetAsAShareOfTheExperts) {
  const fs::path out = dir_ / "out.json";
  ASSERT_EQ(
      Bench("--synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 4 --cache-device-budget 25% --json " + out.string()),
      0)
      << Err();
  json j = json::parse(Read(out), nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << Read(out);
  EXPECT_EQ(j["cache"]["slots_per_layer"], 2);
  EXPECT_NE(Out().find("2 of 8 slots per MoE layer (25% of the experts"), std::string::npos) << Out();
  EXPECT_NE(Bench("--synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 4 --cache-device-budget 10%"), 0);
  EXPECT_NE(Err().find("1 per MoE layer"), std::string::npos) << Err();
  EXPECT_NE(Err().find("top-k (2)"), std::string::npos) << Err();
  // A running batch of no sequence would never admit a request: refused up front, not a hang.
  EXPECT_NE(Bench("--synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 4 --max-batch 0"), 0);
  EXPECT_NE(Err().find("--max-batch"), std::string::npos) << Err();
}

// int8 in the last half of the layers: each layer's slots are its experts' size. A budget in slots
// gives every layer as many; the same bytes as a budget of 2 checkpoint-dtype slots per layer buy
// the int8 layers more slots, which serve more hits and move fewer bytes for the same tokens (the
// precision is fixed per layer, so the tokens and their routing are the same).
TEST_F(BenchTest, ByteBudgetBuysTheInt8LayersMoreSlots) {
  const std::string run =
      "--synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 16 --cache-policy lru --prefetch-layers 0 "
      "--miss-precision int8 --low-precision-layers 'last 50%' --json ";
  const fs::path slots = dir_ / "slots.json", bytes = dir_ / "bytes.json";
  ASSERT_EQ(Bench(run + slots.string() + " --cache-device-budget '2 slots per layer'"), 0) << Err();
  const json a = json::parse(Read(slots), nullptr, false);
  ASSERT_FALSE(a.is_discarded()) << Read(slots);
  EXPECT_EQ(a["cache"]["slots_per_moe_layer"], json::array({2, 2, 2, 2}));
  // tiny: 4 MoE layers; a checkpoint-dtype slot of its experts is 48 KiB.
  ASSERT_NE(Out().find("2 of 8 slots of 48.0 KiB in MoE layers 0-1"), std::string::npos) << Out();
  ASSERT_EQ(Bench(run + bytes.string() + " --cache-device-budget " + std::to_string(4 * 2 * 48 * 1024)), 0) << Err();
  const json b = json::parse(Read(bytes), nullptr, false);
  ASSERT_FALSE(b.is_discarded()) << Read(bytes);
  const json& per = b["cache"]["slots_per_moe_layer"];
  ASSERT_EQ(per.size(), 4u) << b["cache"];
  EXPECT_EQ(per[0], 2);
  EXPECT_EQ(per[1], 2);
  EXPECT_GE(per[2].get<int>(), 3);
  EXPECT_GE(per[3].get<int>(), 3);
  EXPECT_GT(b["cache"]["budget_fraction"].get<double>(), 0.25);
  EXPECT_EQ(b["results"]["generated_tokens"], a["results"]["generated_tokens"]);
  EXPECT_GT(b["cache"]["hits"].get<int64_t>(), a["cache"]["hits"].get<int64_t>());
  EXPECT_LT(b["results"]["bytes_moved"].get<int64_t>(), a["results"]["bytes_moved"].get<int64_t>());
  // The record says what the loads were: the precision, where, and the loads and bytes in each.
  EXPECT_EQ(b["cache"]["miss_precision"], "int8");
  EXPECT_EQ(b["cache"]["low_precision_layers"], "last 50%");
  EXPECT_GT(b["cache"]["low_precision_loads"].get<int64_t>(), 0) << b["cache"];
  EXPECT_GT(b["cache"]["native_loads"].get<int64_t>(), 0) << b["cache"];
  EXPECT_EQ(b["cache"]["low_precision_bytes"].get<int64_t>() + b["cache"]["native_bytes"].get<int64_t>(),
            b["cache"]["bytes_from_host"].get<int64_t>())
      << b["cache"];
}

TEST_F(BenchTest, SyntheticTinyWritesTheJsonRecord) {
  const fs::path out = dir_ / "out.json";
  ASSERT_EQ(
      Bench("--synthetic tiny -n 4 -c 2 --prompt-len 8 --gen-len 8 --cache-device-budget '4 slots per layer' --json " +
            out.string()),
      0)
      << Err();
  const std::string stdout_text = Out();
  EXPECT_EQ(stdout_text.rfind("# expertflow bench", 0), 0u) << stdout_text;
  EXPECT_NE(stdout_text.find("# synthetic tiny"), std::string::npos) << stdout_text;
  EXPECT_NE(stdout_text.find("hit_rate"), std::string::npos) << stdout_text;

  json j = json::parse(Read(out), nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << Read(out);
  for (const char* key : {"git_sha", "build_type", "model", "model_shape", "synthetic", "cache", "workload", "results"})
    EXPECT_TRUE(j.contains(key)) << key;
  const json& r = j["results"];
  for (const char* key : {"output_tokens_per_s", "total_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50",
                          "itl_ms_p99", "wall_s", "generated_tokens", "hit_rate", "bytes_moved", "stall_ms"})
    EXPECT_TRUE(r.contains(key)) << key;
  EXPECT_EQ(r["generated_tokens"].get<int64_t>(), 4 * 8);
  EXPECT_GT(r["output_tokens_per_s"].get<double>(), 0);
  EXPECT_EQ(j["synthetic"]["shape"], "tiny");
  EXPECT_EQ(j["model_shape"]["num_experts"], 8);
  EXPECT_EQ(j["model_shape"]["num_layers"], 4);
  const json& c = j["cache"];
  EXPECT_TRUE(c["enabled"].get<bool>());
  EXPECT_EQ(c["slots_per_layer"], 4);
  // Every token row acquires top-2 experts in each of the 4 MoE layers.
  EXPECT_GT(c["hits"].get<int64_t>() + c["misses"].get<int64_t>(), 0);
  EXPECT_GT(c["misses"].get<int64_t>(), 0);  // cold start
  EXPECT_GT(c["bytes_from_host"].get<int64_t>(), 0);
  EXPECT_GE(r["hit_rate"].get<double>(), 0.0);
  EXPECT_LE(r["hit_rate"].get<double>(), 1.0);
  // The engine's forward passes: at least a prefill and the decode steps of the longest request
  // (8 tokens: the prefill gives the first), none device-routed on the CPU backend.
  const json& e = j["engine"];
  EXPECT_GE(e["forward_passes"].get<int64_t>(), 8);
  EXPECT_EQ(e["device_routed_passes"].get<int64_t>(), 0);
  // kv_cache_dtype auto on the CPU backend: the exact cache (bf16 only beside bf16 attention).
  EXPECT_EQ(e["kv_cache_dtype"], "fp32");
  EXPECT_EQ(e["prefill_attention"], "fp32");
  EXPECT_NE(stdout_text.find("# kv cache fp32 (kv_cache_dtype auto), attention fp32"), std::string::npos)
      << stdout_text;
  EXPECT_GT(e["forward_seconds"].get<double>(), 0.0);
  EXPECT_LE(e["forward_seconds"].get<double>(), r["wall_s"].get<double>());
  EXPECT_EQ(e["device_routed_seconds"].get<double>(), 0.0);
  // A step is its forward pass and the host work around it.
  EXPECT_GE(e["step_seconds"].get<double>(), e["forward_seconds"].get<double>());
  EXPECT_LE(e["step_seconds"].get<double>(), r["wall_s"].get<double>());
  EXPECT_NE(stdout_text.find("# engine: "), std::string::npos) << stdout_text;
  EXPECT_EQ(e["sampled_on_backend"].get<int64_t>(), 0);  // greedy
  EXPECT_EQ(e["sampled_on_host"].get<int64_t>(), 0);
}

TEST_F(BenchTest, SampledTokensAreDrawnOnTheBackend) {
  const fs::path out = dir_ / "out.json";
  ASSERT_EQ(Bench("--synthetic tiny -n 4 -c 2 --prompt-len 8 --gen-len 8 --temperature 0.8 --top-p 0.9 --json " +
                  out.string()),
            0)
      << Err();
  EXPECT_NE(Out().find("# sampling: 32 tokens drawn on the backend, 0 on the host"), std::string::npos) << Out();
  json j = json::parse(Read(out), nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << Read(out);
  EXPECT_EQ(j["engine"]["sampled_on_backend"].get<int64_t>(), 32);
  EXPECT_EQ(j["engine"]["sampled_on_host"].get<int64_t>(), 0);
}

TEST_F(BenchTest, SyntheticCheckpointIsReusedAndDeterministic) {
  ASSERT_EQ(Bench("--synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 2"), 0) << Err();
  const fs::path ckpt = dir_ / "synth" / "tiny-L4-x1-s1";
  ASSERT_TRUE(fs::exists(ckpt / "config.json"));
  const auto mtime = fs::last_write_time(ckpt / "model-layer-00000.safetensors");
  const std::string bytes = Read(ckpt / "model-layer-00000.safetensors");
  ASSERT_EQ(Bench("--synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 2"), 0) << Err();
  EXPECT_EQ(fs::last_write_time(ckpt / "model-layer-00000.safetensors"), mtime);  // reused, not rewritten
  fs::remove_all(ckpt);
  ASSERT_EQ(Bench("--synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 2"), 0) << Err();
  EXPECT_EQ(Read(ckpt / "model-layer-00000.safetensors"), bytes);  // same seed, same weights
}

TEST_F(BenchTest, SyntheticDeepseekV3AndGptOssRunFromTheirQuantizedCheckpoints) {
  struct Case {
    std::string args, header;
    int experts, layers;
  };
  for (const Case& c : {Case{"--synthetic deepseek-v3 --synthetic-scale 64 --synthetic-layers 3",
                             "# synthetic deepseek-v3: random bf16 + block FP8 weights", 256, 3},
                        Case{"--synthetic gpt-oss-120b --synthetic-scale 64 --synthetic-layers 2",
                             "# synthetic gpt-oss-120b: random bf16 + MXFP4 weights", 128, 2}}) {
    SCOPED_TRACE(c.args);
    const fs::path out = dir_ / "out.json";
    ASSERT_EQ(Bench(c.args + " -n 1 -c 1 --prompt-len 8 --gen-len 4 --json " + out.string()), 0) << Err();
    EXPECT_NE(Out().find(c.header), std::string::npos) << Out();
    json j = json::parse(Read(out), nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << Read(out);
    EXPECT_EQ(j["model_shape"]["num_experts"], c.experts);
    EXPECT_EQ(j["model_shape"]["num_layers"], c.layers);
    EXPECT_EQ(j["results"]["generated_tokens"].get<int64_t>(), 4);
  }
  // An unknown shape is refused with the known ones listed.
  EXPECT_NE(Bench("--synthetic deepseek-v4 -n 1 -c 1"), 0);
  EXPECT_NE(Err().find("gpt-oss-120b"), std::string::npos) << Err();
}

TEST_F(BenchTest, SyntheticInMemoryWritesNoWeights) {
  ASSERT_TRUE(fs::exists(kMixtralTrace)) << kMixtralTrace << " is missing (tests/data/traces)";
  const fs::path out = dir_ / "out.json";
  // 32 layers, 2 of them generated, through the expert cache's host tier and the Mixtral trace.
  ASSERT_EQ(Bench("--synthetic mixtral-8x7b --synthetic-scale 256 --synthetic-in-memory --synthetic-distinct-layers 2 "
                  "-n 2 -c 2 --prompt-len 4 --gen-len 4 --routing-trace " +
                  kMixtralTrace + " --cache-device-budget '4 slots per layer' --json " + out.string()),
            0)
      << Err();
  EXPECT_NE(Out().find("# weights generated in host memory"), std::string::npos) << Out();
  json j = json::parse(Read(out), nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << Read(out);
  EXPECT_EQ(j["model_shape"]["num_layers"], 32);
  EXPECT_TRUE(j["synthetic"]["in_memory"].get<bool>());
  EXPECT_EQ(j["synthetic"]["distinct_layers"], 2);
  EXPECT_EQ(j["results"]["generated_tokens"].get<int64_t>(), 8);
  EXPECT_GT(j["cache"]["bytes_from_host"].get<int64_t>(), 0);
  for (const auto& f : fs::recursive_directory_iterator(dir_ / "synth"))
    EXPECT_NE(f.path().extension(), ".safetensors") << f.path();
  // The flags' misuse is refused by name.
  EXPECT_EQ(Bench("--synthetic tiny --synthetic-distinct-layers 2 -n 1 -c 1"), 1);
  EXPECT_NE(Err().find("--synthetic-distinct-layers needs --synthetic-in-memory"), std::string::npos) << Err();
  EXPECT_EQ(Bench("--synthetic-in-memory -n 1 -c 1"), 1);
  EXPECT_NE(Err().find("need --synthetic SHAPE"), std::string::npos) << Err();
}

TEST_F(BenchTest, TraceOfTheWrongShapeExitsOne) {
  ASSERT_TRUE(fs::exists(kMixtralTrace)) << kMixtralTrace << " is missing (tests/data/traces)";
  // The trace has 32 layers; the tiny shape has 4.
  EXPECT_EQ(Bench("--synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 2 --routing-trace " + kMixtralTrace), 1);
  EXPECT_NE(Err().find("does not match the model"), std::string::npos) << Err();
}

// An output file that cannot be written is refused when the flags are read, before the run.
TEST_F(BenchTest, UnwritableJsonIsRefusedBeforeTheRun) {
  EXPECT_NE(Bench("--synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 2 --json " + (dir_ / "no" / "r.json").string()),
            0);
  EXPECT_NE(Err().find("--json: " + (dir_ / "no" / "r.json").string() + ": the directory " + (dir_ / "no").string() +
                       " does not exist"),
            std::string::npos)
      << Err();
  EXPECT_FALSE(fs::exists(dir_ / "synth")) << "the run started before the check";
  EXPECT_NE(Bench("--synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 2 --json " + dir_.string()), 0);
  EXPECT_NE(Err().find("is a directory, not a file"), std::string::npos) << Err();
}

TEST_F(BenchTest, ConfigRoutingReplayIsTheTraceUnlessTheFlagIsGiven) {
  ASSERT_TRUE(fs::exists(kMixtralTrace)) << kMixtralTrace << " is missing (tests/data/traces)";
  const fs::path yaml = dir_ / "routing.yaml";
  std::ofstream(yaml) << "routing:\n  replay: " << kMixtralTrace << "\n  key: stream\n";
  const fs::path out = dir_ / "out.json";
  ASSERT_EQ(Bench("--config " + yaml.string() +
                  " --synthetic mixtral-8x7b --synthetic-scale 256 -n 1 -c 1 --prompt-len 4 --gen-len 2 --json " +
                  out.string()),
            0)
      << Err();
  json j = json::parse(Read(out), nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["routing_trace"], kMixtralTrace);
  // The tiny shape does not fit the 32-layer trace: the error names the config key.
  EXPECT_EQ(Bench("--config " + yaml.string() + " --synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 2"), 1);
  EXPECT_NE(Err().find("routing.replay " + kMixtralTrace), std::string::npos) << Err();
  EXPECT_NE(Err().find("does not match the model"), std::string::npos) << Err();
  // The flag wins over the file: a missing trace given on the command line is what fails.
  EXPECT_EQ(Bench("--config " + yaml.string() +
                  " --synthetic mixtral-8x7b --synthetic-scale 256 -n 1 -c 1 --prompt-len 4 --gen-len 2 "
                  "--routing-trace " +
                  (dir_ / "absent.jsonl").string()),
            1);
  EXPECT_NE(Err().find("absent.jsonl"), std::string::npos) << Err();
}

// The config's scheduler section sets what the flags leave out (as for `serve`); a flag wins.
TEST_F(BenchTest, ConfigSchedulerSectionUnlessTheFlagIsGiven) {
  const fs::path yaml = dir_ / "scheduler.yaml";
  std::ofstream(yaml) << "scheduler:\n  max_batch_requests: 1\n  max_prefill_tokens: 4\n  regroup_window: 4\n";
  const fs::path out = dir_ / "out.json";
  const std::string run = "--config " + yaml.string() + " --synthetic tiny -n 2 -c 2 --prompt-len 8 --gen-len 2";
  ASSERT_EQ(Bench(run + " --json " + out.string()), 0) << Err();
  json j = json::parse(Read(out), nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["workload"]["max_batch"], 1);
  EXPECT_EQ(j["workload"]["max_prefill_tokens"], 4);
  // One request at a time, each prompt in two chunks of 4, then its second token: 3 passes each.
  EXPECT_EQ(j["engine"]["forward_passes"].get<int64_t>(), 6);
  // No trace to forecast from: the window is dropped with a warning, admission stays FIFO.
  EXPECT_EQ(j["admission"]["regroup_window"], 0);
  EXPECT_NE(Err().find("scheduler.regroup_window 4 has no effect"), std::string::npos) << Err();
  ASSERT_EQ(Bench(run + " --max-batch 2 --max-prefill-tokens 0 --json " + out.string()), 0) << Err();
  j = json::parse(Read(out), nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["workload"]["max_batch"], 2);
  EXPECT_EQ(j["workload"]["max_prefill_tokens"], 0);
  EXPECT_LT(j["engine"]["forward_passes"].get<int64_t>(), 6);  // batched, whole prompts: fewer passes
}

// model.dtype is the checkpoint's dtype or auto: the weights are not cast at load, so another one
// is refused naming both (the synthetic tiny checkpoint is bf16).
TEST_F(BenchTest, ModelDtypeOtherThanTheCheckpointsIsRefused) {
  const fs::path yaml = dir_ / "dtype.yaml";
  const std::string run = " --synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 2";
  std::ofstream(yaml) << "model:\n  dtype: f16\n";
  EXPECT_EQ(Bench("--config " + yaml.string() + run), 1);
  EXPECT_NE(Err().find("model.dtype f16: the checkpoint's weights are bf16"), std::string::npos) << Err();
  std::ofstream(yaml) << "model:\n  dtype: bf16\n";
  EXPECT_EQ(Bench("--config " + yaml.string() + run), 0) << Err();
}

TEST_F(BenchTest, MixtralShapeTakesTheMixtralTrace) {
  ASSERT_TRUE(fs::exists(kMixtralTrace)) << kMixtralTrace << " is missing (tests/data/traces)";
  const fs::path out = dir_ / "out.json";
  ASSERT_EQ(
      Bench("--synthetic mixtral-8x7b --synthetic-scale 256 -n 2 -c 2 --prompt-len 4 --gen-len 4 "
            "--routing-trace " +
            kMixtralTrace + " --cache-device-budget '4 slots per layer' --cache-policy lru --json " + out.string()),
      0)
      << Err();
  json j = json::parse(Read(out), nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["model_shape"]["num_layers"], 32);
  // The store counts one access per (forward, layer, distinct expert): at least one forward's
  // worth (32 layers x top-2), at most one per token row (2 requests x (4 prompt + 3 decode) rows).
  const int64_t accesses = j["cache"]["hits"].get<int64_t>() + j["cache"]["misses"].get<int64_t>();
  EXPECT_GE(accesses, 32 * 2);
  EXPECT_LE(accesses, 2 * (4 + 3) * 32 * 2);
  // No expert is computed on the host on the CPU backend: every use is a slot access, and the hit
  // rate is hits over them.
  EXPECT_EQ(j["cache"]["expert_uses"].get<int64_t>(), accesses);
  EXPECT_EQ(j["cache"]["cpu_computed_experts"].get<int64_t>(), 0);
  EXPECT_NEAR(j["results"]["hit_rate"].get<double>(),
              static_cast<double>(j["cache"]["hits"].get<int64_t>()) / static_cast<double>(accesses), 1e-12);
}

TEST_F(BenchTest, OraclePrefetchWithoutACacheIsAnError) {
  EXPECT_EQ(Bench("--synthetic tiny -n 1 -c 1 --prompt-len 4 --gen-len 2 --oracle-prefetch"), 1);
  EXPECT_NE(Err().find("--oracle-prefetch needs --cache-device-budget"), std::string::npos) << Err();
}

TEST_F(BenchTest, OraclePrefetchUsesTheTraceAsForecast) {
  ASSERT_TRUE(fs::exists(kMixtralTrace)) << kMixtralTrace << " is missing (tests/data/traces)";
  const fs::path out = dir_ / "out.json";
  ASSERT_EQ(Bench("--synthetic mixtral-8x7b --synthetic-scale 256 -n 2 -c 1 --prompt-len 4 --gen-len 8 "
                  "--routing-trace " +
                  kMixtralTrace +
                  " --cache-device-budget '2 slots per layer' --cache-policy expertflow --prefetch-layers 1 "
                  "--oracle-prefetch --json " +
                  out.string()),
            0)
      << Err();
  json j = json::parse(Read(out), nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["cache"]["predictor"], "oracle");
  EXPECT_EQ(j["cache"]["slots_per_layer"], 2);
  // The true next-layer experts were prefetched, and prefetches were used.
  EXPECT_GT(j["cache"]["prefetch_issued"].get<int64_t>(), 0);
  EXPECT_GT(j["cache"]["prefetch_used"].get<int64_t>(), 0);
}

TEST_F(BenchTest, OracleForecastEvictsForTheNextTokenAndMovesFewerBytesThanLru) {
  // With 4 of 8 slots per layer, the oracle also tells the expertflow policy the next token's
  // routing, so it keeps what that token needs: fewer bytes loaded than LRU on the same decode.
  ASSERT_TRUE(fs::exists(kMixtralTrace)) << kMixtralTrace << " is missing (tests/data/traces)";
  const std::string common =
      "--synthetic mixtral-8x7b --synthetic-scale 256 -n 1 -c 1 --prompt-len 4 --gen-len 24 "
      "--routing-trace " +
      kMixtralTrace + " --cache-device-budget '4 slots per layer' ";
  std::map<std::string, int64_t> bytes;
  for (const std::string mode : {"lru", "oracle"}) {
    const fs::path out = dir_ / (mode + ".json");
    const std::string flags = mode == "lru" ? "--cache-policy lru --prefetch-layers 0 --predictor none"
                                            : "--cache-policy expertflow --prefetch-layers 1 --oracle-prefetch";
    ASSERT_EQ(Bench(common + flags + " --json " + out.string()), 0) << Err();
    json j = json::parse(Read(out), nullptr, false);
    ASSERT_FALSE(j.is_discarded());
    bytes[mode] = j["cache"]["bytes_from_host"].get<int64_t>();
  }
  EXPECT_GT(bytes["lru"], 0);
  EXPECT_LT(bytes["oracle"], bytes["lru"]);
}

}  // namespace
}  // namespace ef::launch
