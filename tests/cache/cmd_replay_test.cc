// Runs the real `expertflow replay` binary and checks its JSON and its errors.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace {

const std::string kMixtral = std::string(EF_TEST_DATA) + "/traces/mixtral8x7b_gsm8k_decode.jsonl";

// Runs cmd (stderr merged when merge_stderr), returns {exit code, output}.
std::pair<int, std::string> Shell(const std::string& cmd, bool merge_stderr) {
  std::string full = cmd + (merge_stderr ? " 2>&1" : " 2>/dev/null");
  FILE* f = popen(full.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  int rc = pclose(f);
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, out};
}

TEST(CmdReplay, JsonOutput) {
  ASSERT_TRUE(std::filesystem::exists(kMixtral)) << kMixtral << " is missing (tests/data/traces)";
  auto [rc, out] = Shell(
      std::string(EF_BINARY) + " replay --trace " + kMixtral + " --policy belady --slots-per-layer 4 --json", false);
  ASSERT_EQ(rc, 0) << out;
  auto j = nlohmann::json::parse(out);
  EXPECT_NEAR(j["hit_rate"].get<double>(), 0.733, 0.0005);
  EXPECT_EQ(j["policy"], "belady");
  EXPECT_EQ(j["slots_per_layer"], 4);
  EXPECT_EQ(j["per_layer"].size(), 32u);
  EXPECT_EQ(j["hits"].get<int64_t>() + j["misses"].get<int64_t>(), j["accesses"].get<int64_t>());
  EXPECT_EQ(j["accesses"], 244 * 32 * 2);
}

TEST(CmdReplay, Errors) {
  const std::string bin = EF_BINARY;
  auto [rc1, out1] = Shell(bin + " replay --trace /nonexistent.jsonl --policy lru --slots-per-layer 4", true);
  EXPECT_NE(rc1, 0);
  EXPECT_NE(out1.find("error:"), std::string::npos) << out1;
  ASSERT_TRUE(std::filesystem::exists(kMixtral)) << kMixtral << " is missing (tests/data/traces)";
  for (const std::string& args :
       {std::string("--policy lru --slots-per-layer 1"), std::string("--policy lru --slots-per-layer 9"),
        std::string("--policy fifo --slots-per-layer 4")}) {
    auto [rc, out] = Shell(bin + " replay --trace " + kMixtral + " " + args, true);
    EXPECT_NE(rc, 0) << args;
    EXPECT_EQ(out.rfind("error:", 0), 0u) << args << ": " << out;
  }
  auto [rc2, out2] = Shell(bin + " replay --trace " + kMixtral + " --policy fifo --slots-per-layer 4", true);
  EXPECT_NE(out2.find("lru"), std::string::npos) << out2;
  // A malformed trace line names the line.
  const std::string bad = ::testing::TempDir() + "/bad_trace.jsonl";
  FILE* f = fopen(bad.c_str(), "w");
  fputs("{\"format\":\"moe-routing-trace\",\"version\":1,\"num_layers\":1,\"num_experts\":4,\"top_k\":1}\n", f);
  fputs("{\"seq\":0,\"pos\":0,\"experts\":[[0]]}\n{\"seq\":0,\"pos\":1,\"experts\":[[7]]}\n", f);
  fclose(f);
  auto [rc3, out3] = Shell(bin + " replay --trace " + bad + " --slots-per-layer 2", true);
  EXPECT_NE(rc3, 0);
  EXPECT_NE(out3.find("line 3"), std::string::npos) << out3;
}

}  // namespace
