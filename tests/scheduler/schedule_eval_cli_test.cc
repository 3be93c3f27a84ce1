// Runs the real `expertflow schedule-eval` binary and checks its JSON and its errors.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace {

struct ExecResult {
  int rc = 0;
  std::string out;
};

ExecResult Exec(const std::string& args) {
  ExecResult r;
  const std::string cmd = std::string(EF_BINARY) + " " + args + " 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return {-1, ""};
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string Trace(const char* name) { return std::string(EF_TEST_DATA) + "/traces/" + name; }

TEST(ScheduleEvalCliTest, JsonOnFlame) {
  const std::string trace = Trace("flame_moe_290m_prefill.jsonl");
  ASSERT_TRUE(std::filesystem::exists(trace)) << trace << " is missing (tests/data/traces)";
  ExecResult r = Exec("schedule-eval --trace " + trace + " --batch-size 16 --window 4 --ranks 4 --oracle --json");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);  // exactly one object: parse fails on trailing text
  EXPECT_EQ(j["forecast"], "oracle");
  EXPECT_EQ(j["batch_size"], 16);
  EXPECT_EQ(j["window"], 4);
  EXPECT_EQ(j["ranks"], 4);
  for (const char* side : {"fcfs", "regrouped"}) {
    ASSERT_TRUE(j.contains(side));
    EXPECT_GT(j[side]["distinct_experts_per_batch_layer"].get<double>(), 0);
    EXPECT_GE(j[side]["a2a_bytes_per_token"].get<double>(), 0);
    EXPECT_GE(j[side]["load_imbalance"].get<double>(), 1.0);
  }
  EXPECT_LE(j["regrouped"]["distinct_experts_per_batch_layer"].get<double>(),
            j["fcfs"]["distinct_experts_per_batch_layer"].get<double>());
  EXPECT_GE(j["reduction"].get<double>(), 0.25);
  EXPECT_GT(j["scheduler_us_per_batch"].get<double>(), 0);
  EXPECT_LE(j["regrouped"]["max_delay_batches"].get<int>(), 3);
}

TEST(ScheduleEvalCliTest, OneRankSendsNothing) {
  const std::string trace = Trace("mixtral8x7b_gsm8k_decode.jsonl");
  ASSERT_TRUE(std::filesystem::exists(trace)) << trace << " is missing (tests/data/traces)";
  ExecResult r = Exec("schedule-eval --trace " + trace + " --batch-size 16 --window 2 --json");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["fcfs"]["a2a_bytes_per_token"].get<double>(), 0);
  EXPECT_EQ(j["regrouped"]["a2a_bytes_per_token"].get<double>(), 0);
  EXPECT_EQ(j["ranks"], 1);
}

TEST(ScheduleEvalCliTest, SchedulesTheChosenSequences) {
  const std::string trace = Trace("flame_moe_290m_prefill.jsonl");
  ASSERT_TRUE(std::filesystem::exists(trace)) << trace << " is missing (tests/data/traces)";
  ExecResult r = Exec("schedule-eval --trace " + trace + " --seqs 24-31 --oracle --json");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["seqs"], "24-31");
  EXPECT_EQ(j["num_tokens"], 8 * 64);
  // A predictor is scored on the sequences it did not train on.
  const std::string pred = testing::TempDir() + "/freq_0_23.safetensors";
  ASSERT_EQ(Exec("train-predictor --trace " + trace + " --kind frequency --train-seqs 0-23 --out " + pred).rc, 0);
  r = Exec("schedule-eval --trace " + trace + " --predictor " + pred + " --json");
  ASSERT_EQ(r.rc, 0) << r.out;
  j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["seqs"], "24-31");
  EXPECT_EQ(j["forecast"], "frequency");
  // Sequences the trace does not have select nothing: an error.
  r = Exec("schedule-eval --trace " + trace + " --seqs 99 --json");
  EXPECT_NE(r.rc, 0);
  EXPECT_TRUE(r.out.empty()) << r.out;
}

TEST(ScheduleEvalCliTest, BadInputIsAnError) {
  const std::string trace = Trace("mixtral8x7b_gsm8k_decode.jsonl");
  EXPECT_NE(Exec("schedule-eval --trace /nonexistent/trace.jsonl --json").rc, 0);
  const std::string bad = testing::TempDir() + "/bad_trace.jsonl";
  FILE* f = fopen(bad.c_str(), "w");
  ASSERT_NE(f, nullptr);
  fputs("{\"format\":\"moe-routing-trace\",\"version\":1}\n{not json\n", f);
  fclose(f);
  EXPECT_NE(Exec("schedule-eval --trace " + bad).rc, 0);
  if (!std::filesystem::exists(trace)) return;
  for (const char* args : {"--batch-size 0", "--window 0", "--ranks 0"}) {
    ExecResult r = Exec("schedule-eval --trace " + trace + " " + args + " --json");
    EXPECT_NE(r.rc, 0) << args;
    EXPECT_TRUE(r.out.empty()) << args << ": " << r.out;
  }
}

}  // namespace
