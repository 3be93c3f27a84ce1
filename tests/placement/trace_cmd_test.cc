// End to end: `expertflow trace` records tiny-code-moe's routing; the trace reads back and agrees
// with what `expertflow score` reports for the same token ids.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "placement/routing_trace.h"
#include "tests/placement/predictor_test_util.h"

namespace ef::placement {
namespace {

struct CliRun {
  int code = -1;
  std::string out;
};

// Runs the binary; `out` gets stdout and stderr.
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

const std::string kModel = std::string(EF_MODELS_DIR) + "/tiny-code-moe";
const char* kPrompts =
    "def fibonacci(n):\n"
    "import os\n"
    "class Stack:\n"
    "    for i in range(len(items)):\n"
    "\n"  // skipped
    "# parse the command line arguments and return a namespace\n";

// Token lines grouped by sequence, in position order.
std::map<int64_t, std::vector<const TraceToken*>> BySeq(const RoutingTrace& tr) {
  std::map<int64_t, std::vector<const TraceToken*>> m;
  for (const auto& t : tr.tokens) m[t.seq].push_back(&t);
  return m;
}

TEST(TraceCmdTest, RecordsPrefillAndDecodeThatScoreReproduces) {
  auto dir = testing::TempDir("trace_cmd");
  const std::string prompts = (dir / "prompts.txt").string(), out = (dir / "t.jsonl").string();
  testing::WriteText(prompts, kPrompts);
  CliRun run = Exec("trace --model " + kModel + " --backend cpu --prompts " + prompts + " --out " + out +
                    " --max-new-tokens 6 --batch 2");
  ASSERT_EQ(run.code, 0) << run.out;
  EXPECT_NE(run.out.find("5/5 prompts"), std::string::npos) << run.out;

  auto tr = ReadRoutingTrace(out);
  ASSERT_TRUE(tr.ok()) << tr.status().ToString();
  const TraceHeader& h = tr->header;
  EXPECT_EQ(h.num_layers, 8);
  EXPECT_EQ(h.num_experts, 8);
  EXPECT_EQ(h.top_k, 2);
  EXPECT_EQ(h.phase, "mixed");
  EXPECT_EQ(h.dataset, "prompts.txt");
  EXPECT_EQ(h.source, "expertflow trace");
  EXPECT_EQ(h.model, "tiny-code-moe");

  // Every sequence: positions 0..n-1, token ids, weights in the router's order (descending).
  auto seqs = BySeq(*tr);
  ASSERT_EQ(seqs.size(), 5u);
  nlohmann::json ids = {{"input_ids", nlohmann::json::array()}};
  size_t decode_tokens = 0;
  for (const auto& [s, toks] : seqs) {
    nlohmann::json row = nlohmann::json::array();
    for (size_t p = 0; p < toks.size(); ++p) {
      ASSERT_EQ(toks[p]->pos, static_cast<int64_t>(p)) << "seq " << s;
      ASSERT_GE(toks[p]->token, 0);
      ASSERT_EQ(toks[p]->weights.size(), toks[p]->experts.size());
      for (int l = 0; l < h.num_layers; ++l) EXPECT_GE(toks[p]->weights[l * 2], toks[p]->weights[l * 2 + 1]);
      row.push_back(toks[p]->token);
    }
    ids["input_ids"].push_back(row);
    decode_tokens += std::min<size_t>(toks.size(), 6);  // at most 6 decode steps per prompt
  }
  EXPECT_GT(tr->tokens.size(), decode_tokens);

  // score over the same token ids (prefill and the fed-back decode tokens, one forward each).
  const std::string ids_file = (dir / "ids.json").string(), score_out = (dir / "score.json").string();
  testing::WriteText(ids_file, ids.dump());
  CliRun sc = Exec("score --model " + kModel + " --backend cpu --ids-file " + ids_file + " --out " + score_out);
  ASSERT_EQ(sc.code, 0) << sc.out;
  std::ifstream in(score_out);
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json score = nlohmann::json::parse(ss.str(), nullptr, false);
  ASSERT_FALSE(score.is_discarded());
  const auto& router = score["router_topk"];
  ASSERT_EQ(router.size(), 8u);
  size_t row = 0, same = 0, total = 0;
  for (const auto& [s, toks] : seqs) {
    for (const TraceToken* t : toks) {
      for (int l = 0; l < 8; ++l) {
        std::vector<int> want = router[l][row].get<std::vector<int>>();
        std::vector<int> got = {t->experts[l * 2], t->experts[l * 2 + 1]};
        same += want == got;
        ++total;
      }
      ++row;
    }
  }
  ASSERT_EQ(row, router[0].size());
  // Same backend, same tokens: the routing (ids and their order) is identical.
  EXPECT_EQ(same, total) << same << " of " << total << " (token, layer) routings agree";
}

TEST(TraceCmdTest, PhaseFilterAndJsonlPrompts) {
  auto dir = testing::TempDir("trace_cmd_jsonl");
  const std::string prompts = (dir / "p.jsonl").string(), pre = (dir / "pre.jsonl").string(),
                    dec = (dir / "dec.jsonl").string();
  testing::WriteText(prompts,
                     "{\"prompt\": \"def add(a, b):\\n    return a + b\\n\"}\n\n{\"prompt\": \"while True:\\n\"}\n");
  CliRun a =
      Exec("trace -m " + kModel + " --backend cpu --prompts " + prompts + " --out " + pre + " -n 3 --phase prefill");
  ASSERT_EQ(a.code, 0) << a.out;
  CliRun b =
      Exec("trace -m " + kModel + " --backend cpu --prompts " + prompts + " --out " + dec + " -n 3 --phase decode");
  ASSERT_EQ(b.code, 0) << b.out;
  auto tp = ReadRoutingTrace(pre);
  auto td = ReadRoutingTrace(dec);
  ASSERT_TRUE(tp.ok() && td.ok());
  EXPECT_EQ(tp->header.phase, "prefill");
  EXPECT_EQ(td->header.phase, "decode");
  EXPECT_EQ(tp->SequenceIds(), (std::vector<int64_t>{0, 1}));
  auto pseq = BySeq(*tp);
  for (const auto& t : td->tokens) {
    EXPECT_GE(t.pos, static_cast<int64_t>(pseq[t.seq].size()));  // decode positions follow the prompt
    EXPECT_LT(t.pos, static_cast<int64_t>(pseq[t.seq].size()) + 3);
  }
  EXPECT_LE(td->tokens.size(), 6u);
}

TEST(TraceCmdTest, BadInputFailsClearly) {
  auto dir = testing::TempDir("trace_cmd_bad");
  const std::string empty = (dir / "empty.txt").string(), bad = (dir / "bad.jsonl").string(),
                    ok = (dir / "ok.txt").string(), out = (dir / "t.jsonl").string();
  testing::WriteText(empty, "\n\n");
  testing::WriteText(bad, "{\"text\": \"x\"}\n");
  testing::WriteText(ok, "x = 1\n");
  CliRun r = Exec("trace -m " + kModel + " --backend cpu --prompts " + empty + " --out " + out);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("holds no prompt"), std::string::npos) << r.out;
  r = Exec("trace -m " + kModel + " --backend cpu --prompts " + bad + " --out " + out);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("line 1"), std::string::npos) << r.out;
  r = Exec("trace -m " + kModel + " --backend cpu --prompts " + ok + " --out " + out + " --phase decode");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("--max-new-tokens"), std::string::npos) << r.out;
  r = Exec("trace -m " + kModel + " --backend cpu --prompts " + (dir / "missing.txt").string() + " --out " + out);
  EXPECT_EQ(r.code, 1) << r.out;
}

}  // namespace
}  // namespace ef::placement
