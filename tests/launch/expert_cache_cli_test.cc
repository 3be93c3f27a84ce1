// The expert cache flags of `expertflow generate` and `score` end to end (the real binary on
// tiny-code-moe): the same ids and logits with and without a cache, the effective cache printed
// once, bad budgets reported, and mpirun: a bounded cache refused on every rank, a budget that
// holds every expert accepted.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>

namespace ef::launch {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kModelDir = std::string(EF_MODELS_DIR) + "/tiny-code-moe";

class ExpertCacheCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("ef_cache_cli_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
    std::ofstream(dir_ / "ids.json")
        << R"({"input_ids": [[1, 483, 291, 1461, 272, 1191, 508, 10, 80], [1, 5, 77, 1024]]})";
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Runs `PREFIX expertflow ARGS`, stdout and stderr to files; returns the exit code.
  int Run(const std::string& args, const std::string& prefix = "") {
    const std::string cmd = "timeout 120 " + prefix + std::string(EF_BINARY) + " " + args + " >" +
                            (dir_ / "stdout").string() + " 2>" + (dir_ / "stderr").string();
    const int rc = std::system(cmd.c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  }
  std::string Read(const std::string& name) {
    std::ifstream in(dir_ / name);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  // The "new ids:" line of generate --show-ids.
  std::string NewIds() {
    const std::string err = Read("stderr");
    const size_t at = err.find("new ids:");
    return at == std::string::npos ? "" : err.substr(at, err.find('\n', at) - at);
  }

  fs::path dir_;
};

TEST_F(ExpertCacheCliTest, GenerateGivesTheSameIdsWithEveryBudget) {
  const std::string base = "generate --backend cpu --model " + kModelDir + " -p 'def fibonacci(n):' -n 16 --show-ids";
  ASSERT_EQ(Run(base), 0) << Read("stderr");
  const std::string want = NewIds();
  ASSERT_FALSE(want.empty()) << Read("stderr");
  EXPECT_EQ(Read("stderr").find("expert cache"), std::string::npos);  // no budget: no cache
  for (const char* flags : {"--cache-device-budget '2 slots per layer' --predictor lookahead",
                            "--cache-device-budget '32 slots' --cache-policy lru --predictor frequency",
                            "--cache-device-budget 3MiB --cache-policy lfu --prefetch-layers 0 --predictor none"}) {
    ASSERT_EQ(Run(base + " " + flags), 0) << flags << "\n" << Read("stderr");
    EXPECT_EQ(NewIds(), want) << flags;
    const std::string err = Read("stderr");
    EXPECT_NE(err.find("expert cache: "), std::string::npos) << err;
    EXPECT_NE(err.find(" of 8 slots per MoE layer ("), std::string::npos) << err;
    EXPECT_NE(err.find(" hits, "), std::string::npos) << err;
  }
}

TEST_F(ExpertCacheCliTest, ScoreGivesTheSameLogitsFromTheConfigFile) {
  const std::string base = "score --backend cpu --model " + kModelDir + " --ids-file " + (dir_ / "ids.json").string();
  ASSERT_EQ(Run(base + " --out " + (dir_ / "want.json").string()), 0) << Read("stderr");
  std::ofstream(dir_ / "c.yaml") << "cache:\n  device_budget: 2 slots per layer\n  policy: expertflow\n"
                                    "predictor:\n  kind: lookahead\n";
  ASSERT_EQ(Run(base + " --config " + (dir_ / "c.yaml").string() + " --out " + (dir_ / "got.json").string()), 0)
      << Read("stderr");
  EXPECT_NE(Read("stderr").find("expert cache: 2 of 8 slots per MoE layer (25% of the experts"), std::string::npos)
      << Read("stderr");
  const json want = json::parse(Read("want.json")), got = json::parse(Read("got.json"));
  EXPECT_EQ(got["router_topk"], want["router_topk"]);
  EXPECT_EQ(got["logits"], want["logits"]);  // the same floats, printed the same
  // A flag overrides the file's budget.
  ASSERT_NE(Run(base + " --config " + (dir_ / "c.yaml").string() + " --cache-device-budget '1 slot per layer'"), 0);
  EXPECT_NE(Read("stderr").find("fewer than the model's top-k (2)"), std::string::npos) << Read("stderr");
}

// --miss-precision lossless: score prints the same logits as without a cache, and bench moves 0.77x
// the bytes of native loads for the same tokens and hits (tiny-code-moe's rows of 128; 0.756x on
// Mixtral's), the JSON record saying what the loads were.
TEST_F(ExpertCacheCliTest, LosslessLoadsScoreTheSameLogitsAtFewerBytes) {
  const std::string base = "score --backend cpu --model " + kModelDir + " --ids-file " + (dir_ / "ids.json").string();
  ASSERT_EQ(Run(base + " --out " + (dir_ / "want.json").string()), 0) << Read("stderr");
  ASSERT_EQ(Run(base + " --cache-device-budget '2 slots per layer' --miss-precision lossless --out " +
                (dir_ / "got.json").string()),
            0)
      << Read("stderr");
  EXPECT_NE(Read("stderr").find("loads in lossless"), std::string::npos) << Read("stderr");
  EXPECT_EQ(json::parse(Read("got.json"))["logits"], json::parse(Read("want.json"))["logits"]);

  std::map<std::string, json> rec;
  for (const char* p : {"native", "lossless"}) {
    const fs::path out = dir_ / (std::string(p) + ".json");
    ASSERT_EQ(Run("bench --backend cpu --model " + kModelDir +
                  " -n 1 -c 1 --prompt-len 8 --gen-len 16 --cache-policy lru --prefetch-layers 0 "
                  "--cache-device-budget '2 slots per layer' --miss-precision " +
                  p + " --json " + out.string()),
              0)
        << Read("stderr");
    rec[p] = json::parse(Read(std::string(p) + ".json"), nullptr, false);
    ASSERT_FALSE(rec[p].is_discarded()) << Read(std::string(p) + ".json");
  }
  // int8 in the last half and the other half packed (--high-precision lossless): fewer bytes than
  // int8 in the last half alone, for the same tokens.
  for (const char* high : {"native", "lossless"}) {
    const fs::path out = dir_ / (std::string("half_") + high + ".json");
    ASSERT_EQ(Run("bench --backend cpu --model " + kModelDir +
                  " -n 1 -c 1 --prompt-len 8 --gen-len 16 --cache-policy lru --prefetch-layers 0 "
                  "--cache-device-budget 6MiB --miss-precision int8 --low-precision-layers 'last 50%' "
                  "--high-precision " +
                  high + " --json " + out.string()),
              0)
        << Read("stderr");
    rec[std::string("half_") + high] = json::parse(Read(out.filename().string()), nullptr, false);
  }
  EXPECT_EQ(rec["half_lossless"]["cache"]["high_precision"], "lossless");
  EXPECT_EQ(rec["half_lossless"]["cache"]["load_precision"], "int8");
  EXPECT_EQ(rec["lossless"]["cache"]["load_precision"], "lossless");
  EXPECT_NE(Read("stdout").find("(4 MoE layers lossless)"), std::string::npos) << Read("stdout");
  EXPECT_EQ(rec["half_lossless"]["results"]["generated_tokens"], rec["half_native"]["results"]["generated_tokens"]);
  EXPECT_LT(rec["half_lossless"]["results"]["bytes_moved"].get<double>(),
            0.8 * rec["half_native"]["results"]["bytes_moved"].get<double>());
  const json &n = rec["native"], &l = rec["lossless"];
  EXPECT_EQ(l["results"]["generated_tokens"], n["results"]["generated_tokens"]);
  EXPECT_EQ(l["cache"]["hits"], n["cache"]["hits"]);
  EXPECT_EQ(l["cache"]["miss_precision"], "lossless");
  EXPECT_EQ(l["cache"]["native_loads"], 0) << l["cache"];
  const double ratio = l["results"]["bytes_moved"].get<double>() / n["results"]["bytes_moved"].get<double>();
  EXPECT_NEAR(ratio, 0.769, 0.001);
}

TEST_F(ExpertCacheCliTest, BadFlagsAreReported) {
  const std::string base = "generate --backend cpu --model " + kModelDir + " -n 2";
  EXPECT_EQ(Run(base + " --cache-device-budget '3 slots per layr'"), 1);
  EXPECT_NE(Read("stderr").find("error: --cache-device-budget: cache.device_budget: expected"), std::string::npos)
      << Read("stderr");
  EXPECT_EQ(Run(base + " --cache-device-budget 1000TiB"), 1);
  EXPECT_NE(Read("stderr").find("is larger than cpu"), std::string::npos) << Read("stderr");
  EXPECT_EQ(Run(base + " --cache-device-budget '2 slots per layer' --cache-policy belady"), 1);
  EXPECT_NE(Read("stderr").find("offline analysis"), std::string::npos) << Read("stderr");
  // Cache settings without a budget run every expert resident, and say that they did nothing.
  EXPECT_EQ(Run(base + " --miss-precision int8 --cache-policy lru"), 0) << Read("stderr");
  EXPECT_NE(Read("stderr").find("cache.policy, cache.miss_precision have no effect without cache.device_budget"),
            std::string::npos)
      << Read("stderr");
  EXPECT_EQ(Run(base), 0) << Read("stderr");
  EXPECT_EQ(Read("stderr").find("no effect"), std::string::npos) << Read("stderr");
  // A prefetch deeper than the model is cut to its MoE layers, with a word.
  EXPECT_EQ(Run(base + " --cache-device-budget '2 slots per layer' --prefetch-layers 100"), 0) << Read("stderr");
  EXPECT_NE(Read("stderr").find("cache.prefetch_layers 100: the model has 8 MoE layers, so at most 7 ahead"),
            std::string::npos)
      << Read("stderr");
  // A word that is not a command, a model path that is a file: named as what they are.
  EXPECT_EQ(Run("generat -n 2"), 2);
  EXPECT_NE(Read("stderr").find("unknown command 'generat' (commands: generate,"), std::string::npos) << Read("stderr");
  EXPECT_EQ(Run("generate --backend cpu -n 2 --model " + kModelDir + "/config.json"), 1);
  EXPECT_NE(Read("stderr").find("config.json is a file: give the checkpoint's directory"), std::string::npos)
      << Read("stderr");
  // Without --model the shipped model is found from any working directory (beside the build folder).
  EXPECT_EQ(Run("generate --backend cpu -n 2 -p 'def f'", "env -C / "), 0) << Read("stderr");
  EXPECT_EQ(Read("stdout").rfind("def f", 0), 0u) << Read("stdout");
  // A placement file that is not there is refused in one process too.
  EXPECT_EQ(Run(base + " --placement no_such_placement.json"), 1);
  EXPECT_NE(Read("stderr").find("cluster.placement (--placement) 'no_such_placement.json': neither"), std::string::npos)
      << Read("stderr");
  // A prompt past the context is refused before it is echoed; a context that fills up says so.
  EXPECT_EQ(Run(base + " --max-seq-len 8 -p 'def f(a, b, c, d, e, f, g, h):'"), 1);
  EXPECT_NE(Read("stderr").find("do not fit the context of 8 tokens"), std::string::npos) << Read("stderr");
  EXPECT_EQ(Read("stdout"), "");
  EXPECT_EQ(Run("generate --backend cpu --model " + kModelDir + " -n 40 --max-seq-len 10 -p 'def f'"), 0);
  EXPECT_NE(Read("stderr").find("of 40 tokens: the context of 10 tokens is full (--max-seq-len)"), std::string::npos)
      << Read("stderr");
  // A fixed KV cache too small for the answer is refused before anything is printed.
  EXPECT_EQ(Run("generate --backend cpu --model " + kModelDir + " -n 40 --kv-cache-tokens 17 -p 'def f'"), 1);
  EXPECT_NE(Read("stderr").find("tokens of KV cache, more than the"), std::string::npos) << Read("stderr");
  EXPECT_EQ(Read("stdout"), "");
  // A seed outside uint64 is refused, not wrapped.
  for (const char* seed : {"-5", "18446744073709551616", "1e3"}) {
    EXPECT_NE(Run(base + " --seed " + seed), 0) << seed;
    EXPECT_NE(Read("stderr").find(std::string("--seed: expected an integer from 0 to 18446744073709551615, got '") +
                                  seed + "'"),
              std::string::npos)
        << Read("stderr");
  }
  EXPECT_EQ(Run(base + " --seed 18446744073709551615 --temperature 0.7"), 0) << Read("stderr");
  // Sampling settings are checked before the model loads: nothing is generated.
  EXPECT_EQ(Run(base + " -p 'def f' --top-p 2"), 1);
  EXPECT_NE(Read("stderr").find("top_p must be in (0, 1]"), std::string::npos) << Read("stderr");
  EXPECT_EQ(Read("stdout"), "");
}

// `expertflow quantize` writes GPTQ experts that score loads with --quantized-experts (other
// logits than rounding to nearest, within int8's reach of the model's); mismatches are refused.
TEST_F(ExpertCacheCliTest, QuantizeWritesExpertsTheCacheLoads) {
  {
    std::ofstream text(dir_ / "calib.py");
    for (int i = 0; i < 40; ++i)
      text << "def f" << i << "(x, y=" << i << "):\n    \"\"\"Return x plus y.\"\"\"\n    return x + y * " << i
           << "\n\n";
  }
  const std::string q8 = (dir_ / "q8.safetensors").string();
  const std::string quantize = "quantize --backend cpu --model " + kModelDir + " --calibration " +
                               (dir_ / "calib.py").string() + " --min-tokens 1";
  // An output directory that does not exist is refused before the calibration runs.
  ASSERT_NE(Run(quantize + " --seq-len 64 --out " + (dir_ / "missing" / "q8.safetensors").string()), 0);
  EXPECT_NE(Read("stderr").find("missing does not exist"), std::string::npos) << Read("stderr");
  EXPECT_EQ(Read("stderr").find("calibration:"), std::string::npos) << Read("stderr");
  ASSERT_EQ(Run(quantize + " --seq-len 64 --out " + q8), 0) << Read("stderr");
  EXPECT_NE(Read("stderr").find("output error vs rounding to nearest"), std::string::npos) << Read("stderr");
  const std::string score = "score --backend cpu --model " + kModelDir + " --ids-file " + (dir_ / "ids.json").string() +
                            " --cache-device-budget '4 slots per layer' --cache-policy lru";
  ASSERT_EQ(Run(score + " --miss-precision int8"), 0) << Read("stderr");
  const json rounded = json::parse(Read("stdout"));
  ASSERT_EQ(Run(score + " --miss-precision int8 --quantized-experts " + q8), 0) << Read("stderr");
  const json gptq = json::parse(Read("stdout"));
  ASSERT_EQ(Run(score), 0) << Read("stderr");
  const json native = json::parse(Read("stdout"));
  double diff_rounded = 0, diff_native = 0;
  for (size_t b = 0; b < native["logits"].size(); ++b)
    for (size_t t = 0; t < native["logits"][b].size(); ++t)
      for (size_t v = 0; v < native["logits"][b][t].size(); ++v) {
        const double g = gptq["logits"][b][t][v].get<double>();
        diff_rounded = std::max(diff_rounded, std::abs(g - rounded["logits"][b][t][v].get<double>()));
        diff_native = std::max(diff_native, std::abs(g - native["logits"][b][t][v].get<double>()));
      }
  EXPECT_GT(diff_rounded, 0.0) << "the file's experts were not used";
  EXPECT_LT(diff_native, 1.0);
  // The wrong precision, no low precision at all, a file that is not one.
  ASSERT_NE(Run(score + " --miss-precision int4 --quantized-experts " + q8), 0);
  EXPECT_NE(Read("stderr").find("holds int8 experts; the cache loads int4"), std::string::npos) << Read("stderr");
  // Lossless loads pack the checkpoint's bf16 and would use none of the file's blocks.
  ASSERT_NE(Run(score + " --miss-precision lossless --quantized-experts " + q8), 0);
  EXPECT_NE(Read("stderr").find("applies to int8/int4 loads; cache.miss_precision is lossless"), std::string::npos)
      << Read("stderr");
  ASSERT_NE(Run(score + " --quantized-experts " + q8), 0);
  EXPECT_NE(Read("stderr").find("cache.miss_precision is native"), std::string::npos) << Read("stderr");
  ASSERT_NE(Run(score + " --miss-precision int8 --quantized-experts " + kModelDir + "/model.safetensors"), 0);
  EXPECT_NE(Read("stderr").find("not a quantized-experts file"), std::string::npos) << Read("stderr");
  // Also when the budget holds every expert (no low-precision copy is ever made).
  ASSERT_NE(Run("score --backend cpu --model " + kModelDir + " --ids-file " + (dir_ / "ids.json").string() +
                " --cache-device-budget '8 slots per layer' --miss-precision int4 --quantized-experts " + q8),
            0);
  EXPECT_NE(Read("stderr").find("holds int8 experts"), std::string::npos) << Read("stderr");
  // Too little calibration text for one sequence.
  ASSERT_NE(Run(quantize + " --seq-len 60000 --out " + q8), 0);
  EXPECT_NE(Read("stderr").find("fewer than one sequence"), std::string::npos) << Read("stderr");
  // Sequences longer than the model's positions.
  ASSERT_NE(Run(quantize + " --seq-len 1025 --out " + q8), 0);
  EXPECT_NE(Read("stderr").find("past the model's max_position_embeddings (1024)"), std::string::npos)
      << Read("stderr");
}

// `expertflow quantize --rank-layers`: a row per MoE layer, cheapest first, and a recommended
// selection whose summed KL is within --max-kl and which the next row would exceed; score takes it.
TEST_F(ExpertCacheCliTest, QuantizeRanksTheLayers) {
  {
    std::ofstream text(dir_ / "calib.py");
    for (int i = 0; i < 60; ++i)
      text << "def g" << i << "(items, k=" << i << "):\n    total = 0\n    for x in items:\n        total += x * k\n"
           << "    return total\n\n";
  }
  const std::string rank = "quantize --backend cpu --model " + kModelDir + " --calibration " +
                           (dir_ / "calib.py").string() +
                           " --seq-len 64 --hold-out-every 2 --rank-layers --max-kl 0.01";
  ASSERT_EQ(Run(rank), 0) << Read("stderr");
  // The rows were measured on held-out sequences, and say so.
  EXPECT_NE(Read("stdout").find("held-out tokens"), std::string::npos) << Read("stdout");
  std::istringstream out(Read("stdout"));
  std::string line, spec;
  std::vector<std::pair<int, double>> rows;
  while (std::getline(out, line)) {
    const std::string rec = "# recommended: --low-precision-layers ";
    if (line.rfind(rec, 0) == 0) spec = line.substr(rec.size(), line.find(' ', rec.size()) - rec.size());
    if (line.empty() || line[0] == '#' || line.rfind("moe_layer", 0) == 0) continue;
    std::istringstream row(line);
    int layer = -1;
    double kl = -1;
    row >> layer >> kl;
    rows.push_back({layer, kl});
  }
  ASSERT_EQ(rows.size(), 8u) << Read("stdout");
  double sum = 0;
  size_t within = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_GE(rows[i].second, 0.0);
    if (i > 0) {
      EXPECT_GE(rows[i].second, rows[i - 1].second) << "cheapest first";
    }
    if (sum + rows[i].second <= 0.01 && within == i) {
      sum += rows[i].second;
      ++within;
    }
  }
  ASSERT_GT(within, 0u) << Read("stdout");
  ASSERT_FALSE(spec.empty()) << Read("stdout");
  // The spec ("5-7", "1,3-7") names exactly the first `within` rows' layers.
  std::set<int> named, want;
  std::istringstream items(spec);
  for (std::string item; std::getline(items, item, ',');) {
    const size_t dash = item.find('-');
    const int lo = std::stoi(item.substr(0, dash)),
              hi = dash == std::string::npos ? lo : std::stoi(item.substr(dash + 1));
    for (int l = lo; l <= hi; ++l) named.insert(l);
  }
  for (size_t i = 0; i < within; ++i) want.insert(rows[i].first);
  EXPECT_EQ(named, want) << Read("stdout");
  ASSERT_EQ(Run("score --backend cpu --model " + kModelDir + " --ids-file " + (dir_ / "ids.json").string() +
                " --cache-device-budget '4 slots per layer' --miss-precision int8 --low-precision-layers " + spec),
            0)
      << Read("stderr");
  // Neither an output nor a ranking asked for.
  ASSERT_NE(Run("quantize --backend cpu --model " + kModelDir + " --calibration " + (dir_ / "calib.py").string()), 0);
  EXPECT_NE(Read("stderr").find("--rank-layers"), std::string::npos) << Read("stderr");
  // A limit that is not a number, and a hold-out that leaves nothing to calibrate on, are refused
  // before any work, naming the flag.
  ASSERT_NE(Run(rank + " --max-kl nan"), 0);
  EXPECT_NE(Read("stderr").find("--max-kl: not a finite number"), std::string::npos) << Read("stderr");
  ASSERT_NE(Run(rank + " --hold-out-every 1 --out " + (dir_ / "q.safetensors").string()), 0);
  EXPECT_NE(Read("stderr").find("--hold-out-every"), std::string::npos) << Read("stderr");
  EXPECT_FALSE(fs::exists(dir_ / "q.safetensors"));
}

TEST_F(ExpertCacheCliTest, MpirunRunsAPerRankCache) {
  ASSERT_EQ(std::system("command -v mpirun >/dev/null 2>&1"), 0)
      << "mpirun not found (scripts/install-deps.sh installs it)";
  const std::string mpirun =
      "env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_base_warn_component_unused=0 "
      "mpirun --oversubscribe --allow-run-as-root --bind-to none -np 2 ";
  const std::string base = "generate --backend cpu --model " + kModelDir + " -p 'def f(' -n 6 --show-ids";
  ASSERT_EQ(Run(base), 0) << Read("stderr");
  const std::string want = NewIds();
  // A bounded cache on each rank: the same tokens, and the budget is said to be per rank.
  ASSERT_EQ(Run(base + " --cache-device-budget '2 slots per layer'", mpirun), 0) << Read("stderr");
  EXPECT_EQ(NewIds(), want);
  EXPECT_NE(Read("stderr").find("on each of 2 ranks"), std::string::npos) << Read("stderr");
  // A per-rank budget below top-k names the rank and the key.
  ASSERT_NE(Run(base + " --cache-device-budget '1 slots per layer'", mpirun), 0);
  const std::string err = Read("stderr");
  EXPECT_NE(err.find("(cache.device_budget is per rank)"), std::string::npos) << err;
  EXPECT_NE(err.find("fewer than the model's top-k (2)"), std::string::npos) << err;
  ASSERT_EQ(Run(base + " --cache-device-budget '8 slots per layer'", mpirun), 0) << Read("stderr");
  EXPECT_EQ(NewIds(), want);
  EXPECT_NE(Read("stderr").find("expert cache off: the budget (8 slots per layer) holds every expert"),
            std::string::npos)
      << Read("stderr");
}

}  // namespace
}  // namespace ef::launch
