// End to end: the real binary trains a predictor, evaluates it with --json, and rejects bad
// input with a non-zero exit and a clear message.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "tests/placement/predictor_test_util.h"

namespace ef::placement {
namespace {

struct CliRun {
  int code = -1;
  std::string out;
};

CliRun Exec(const std::string& args) {
  CliRun r;
  std::string cmd = std::string(EF_BINARY) + " " + args + " 2>&1";
  FILE* f = popen(cmd.c_str(), "r");
  if (!f) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), f)) > 0) r.out.append(buf.data(), n);
  int status = pclose(f);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

TEST(EvalPredictorCliTest, TrainThenEvalJson) {
  auto dir = testing::TempDir("cli");
  std::string trace = (dir / "planted.jsonl").string(), pred = (dir / "p.safetensors").string();
  ASSERT_TRUE(WriteRoutingTrace(testing::PlantedTrace(24, 24, 4, 8, 40, 11), trace).ok());
  CliRun train = Exec("train-predictor --trace " + trace + " --kind path --out " + pred +
                      " --train-seqs 0-17 --epochs 20 --hidden 64 --embed-dim 16 --seed 3");
  ASSERT_EQ(train.code, 0) << train.out;
  EXPECT_NE(train.out.find("val_recall"), std::string::npos) << train.out;
  CliRun eval = Exec("eval-predictor --predictor " + pred + " --trace " + trace + " --json");
  ASSERT_EQ(eval.code, 0) << eval.out;
  nlohmann::json j = nlohmann::json::parse(eval.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << eval.out;
  EXPECT_EQ(j["predictor"], "path");
  EXPECT_EQ(j["tokens"], 6 * 24);  // sequences 18-23 by default
  EXPECT_EQ(j["per_layer_recall"].size(), 4u);
  EXPECT_GT(j["recall"].get<double>(), 0.95);
  EXPECT_LT(j["baseline_frequency"]["recall"].get<double>(), j["recall"].get<double>());
  EXPECT_TRUE(j["baseline_affinity"].contains("per_layer_recall"));
  EXPECT_TRUE(j.contains("path_recall") && j.contains("precision") && j.contains("per_layer_precision"));
}

TEST(EvalPredictorCliTest, BadInputFailsClearly) {
  auto dir = testing::TempDir("cli_bad");
  std::string trace = (dir / "t.jsonl").string(), other = (dir / "other.jsonl").string(),
              pred = (dir / "f.safetensors").string(), empty = (dir / "empty.jsonl").string(),
              junk = (dir / "junk.safetensors").string();
  ASSERT_TRUE(WriteRoutingTrace(testing::PlantedTrace(8, 8, 4, 8, 10, 12), trace).ok());
  ASSERT_TRUE(WriteRoutingTrace(testing::PlantedTrace(8, 8, 6, 8, 10, 13), other).ok());
  testing::WriteText(empty, "");
  testing::WriteText(junk, "\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}");
  ASSERT_EQ(Exec("train-predictor --trace " + trace + " --kind frequency --out " + pred).code, 0);

  CliRun shape = Exec("eval-predictor --predictor " + pred + " --trace " + other);
  EXPECT_EQ(shape.code, 1);
  EXPECT_NE(shape.out.find("does not fit trace"), std::string::npos) << shape.out;
  CliRun e = Exec("eval-predictor --predictor " + pred + " --trace " + empty);
  EXPECT_EQ(e.code, 1);
  EXPECT_NE(e.out.find("empty"), std::string::npos) << e.out;
  CliRun j = Exec("eval-predictor --predictor " + junk + " --trace " + trace);
  EXPECT_EQ(j.code, 1);
  EXPECT_NE(j.out.find("error:"), std::string::npos) << j.out;
  CliRun t = Exec("train-predictor --trace " + empty + " --kind path --out " + pred);
  EXPECT_EQ(t.code, 1);
  CliRun k = Exec("train-predictor --trace " + trace + " --kind nonsense --out " + pred);
  EXPECT_NE(k.code, 0);
}

}  // namespace
}  // namespace ef::placement
