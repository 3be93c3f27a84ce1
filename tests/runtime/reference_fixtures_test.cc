// The CPU engine against Hugging Face transformers: logits, router top-k and greedy KV-cache
// decoding on the fixtures in tests/data (made by transformers, not by this project).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>

#include "runtime/engine/engine.h"
#include "runtime/engine/generator.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ef::runtime {
namespace {

using json = nlohmann::json;

json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  return json::parse(in);
}

class ReferenceTest : public ::testing::TestWithParam<std::string> {
 protected:
  std::string Dir() const { return std::string(EF_TEST_DATA) + "/" + GetParam(); }
  std::string RefPath() const {
    std::string fam = GetParam() == "mixtral_sharded" ? "mixtral" : GetParam();
    return std::string(EF_TEST_DATA) + "/" + fam + "/reference.json";
  }
  std::unique_ptr<Engine> MakeEngine() {
    EngineOptions o;
    o.backend = "cpu";
    auto e = Engine::Create(Dir(), o);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    return std::move(e).value();
  }
};

TEST_P(ReferenceTest, LogitsAndRouterTopKMatchTransformers) {
  json ref = ReadJson(RefPath());
  auto engine = MakeEngine();
  const ModelConfig& c = engine->config();
  std::vector<std::vector<int32_t>> router_topk(c.num_moe_layers());
  std::vector<int> rows_seen(c.num_moe_layers(), 0);
  engine->AddRoutingHook([&](LayerRouting& r) {
    for (int i = 0; i < r.num_tokens * r.top_k; ++i) router_topk[r.moe_layer.index].push_back(r.ids[i]);
    rows_seen[r.moe_layer.index] += r.num_tokens;
    return Status::Ok();
  });
  const auto ids = ref["input_ids"].get<std::vector<std::vector<int32_t>>>();
  // Both sequences in one batch: exercises batched attention over separate KV caches.
  std::vector<SeqChunk> batch;
  for (size_t b = 0; b < ids.size(); ++b) {
    ASSERT_TRUE(engine->AddSequence(static_cast<int64_t>(b)).ok());
    batch.push_back(SeqChunk{static_cast<int64_t>(b), ids[b], true});
  }
  ForwardResult res;
  Status st = engine->Forward(batch, &res);
  ASSERT_TRUE(st.ok()) << st.ToString();
  double max_diff = 0;
  for (size_t b = 0; b < ids.size(); ++b) {
    for (size_t t = 0; t < ids[b].size(); ++t) {
      const auto& want = ref["logits"][b][t];
      const float* got = res.logits.data() + (res.row_offset[b] + t) * c.vocab_size;
      ASSERT_EQ(want.size(), static_cast<size_t>(c.vocab_size));
      for (int v = 0; v < c.vocab_size; ++v)
        max_diff = std::max(max_diff, std::abs(double(got[v]) - want[v].get<double>()));
    }
  }
  EXPECT_LT(max_diff, 1e-4) << "max |logit - transformers| over all positions";
  RecordProperty("max_logit_diff", std::to_string(max_diff));
  std::printf("%s: max |logit - transformers| = %.3g\n", GetParam().c_str(), max_diff);
  if (ref.contains("router_topk_hf")) {
    // Families whose router logits transformers does not return: the expert ids its router chose,
    // compared as sets per token (the order within a token's top-k is not part of the contract).
    const auto& want = ref["router_topk_hf"];
    ASSERT_EQ(want.size(), static_cast<size_t>(c.num_moe_layers()));
    for (int l = 0; l < c.num_moe_layers(); ++l) {
      ASSERT_EQ(rows_seen[l], static_cast<int>(want[l].size()));
      for (size_t t = 0; t < want[l].size(); ++t) {
        std::vector<int32_t> w = want[l][t].get<std::vector<int32_t>>();
        std::vector<int32_t> got(router_topk[l].begin() + t * c.top_k, router_topk[l].begin() + (t + 1) * c.top_k);
        std::sort(w.begin(), w.end());
        std::sort(got.begin(), got.end());
        EXPECT_EQ(got, w) << "moe layer " << l << " token " << t;
      }
    }
    return;
  }
  // Router: transformers' router logits, top-k by value, must equal ours exactly.
  const auto& router_logits = ref["router_logits"];
  ASSERT_EQ(router_logits.size(), static_cast<size_t>(c.num_moe_layers()));
  for (int l = 0; l < c.num_moe_layers(); ++l) {
    const auto& layer = router_logits[l];
    ASSERT_EQ(rows_seen[l], static_cast<int>(layer.size()));
    for (size_t t = 0; t < layer.size(); ++t) {
      std::vector<float> row = layer[t].get<std::vector<float>>();
      std::vector<int32_t> order(row.size());
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return row[a] > row[b]; });
      for (int j = 0; j < c.top_k; ++j)
        EXPECT_EQ(router_topk[l][t * c.top_k + j], order[j]) << "moe layer " << l << " token " << t << " slot " << j;
    }
  }
}

TEST_P(ReferenceTest, GreedyKvCacheDecodeMatchesTransformers) {
  json ref = ReadJson(RefPath());
  auto engine = MakeEngine();
  const auto ids = ref["input_ids"].get<std::vector<std::vector<int32_t>>>();
  const auto want = ref["greedy_new_tokens"].get<std::vector<std::vector<int32_t>>>();
  std::vector<GenerateRequest> reqs;
  for (size_t b = 0; b < ids.size(); ++b) {
    GenerateRequest r;
    r.prompt = ids[b];
    r.max_new_tokens = static_cast<int>(want[b].size());
    r.ignore_eos = true;  // transformers generated a fixed number of tokens
    reqs.push_back(r);
  }
  auto out = Generate(*engine, reqs);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  for (size_t b = 0; b < ids.size(); ++b) EXPECT_EQ((*out)[b].tokens, want[b]) << "sequence " << b;
}

INSTANTIATE_TEST_SUITE_P(Families, ReferenceTest,
                         ::testing::Values("mixtral", "mixtral_sharded", "qwen2_moe", "qwen3_moe", "olmoe",
                                           "deepseek_v2", "deepseek_v3", "gpt_oss"));

TEST(ShardedCheckpoint, SameLogitsAsSingleFile) {
  EngineOptions o;
  o.backend = "cpu";
  auto a = Engine::Create(std::string(EF_TEST_DATA) + "/mixtral", o);
  auto b = Engine::Create(std::string(EF_TEST_DATA) + "/mixtral_sharded", o);
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<int32_t> ids = {5, 17, 99, 3, 250, 7};
  ForwardResult ra, rb;
  for (auto* e : {a->get(), b->get()}) ASSERT_TRUE(e->AddSequence(0).ok());
  SeqChunk chunk{0, ids, true};
  ASSERT_TRUE((*a)->Forward({&chunk, 1}, &ra).ok());
  ASSERT_TRUE((*b)->Forward({&chunk, 1}, &rb).ok());
  EXPECT_EQ(ra.logits, rb.logits);  // bitwise: same weights, same order of operations
}

TEST(TinyCodeMoe, GreedyContinuationMatchesTransformers) {
  const std::string dir = std::string(EF_MODELS_DIR) + "/tiny-code-moe";
  auto tok = Tokenizer::FromModelDir(dir);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EngineOptions o;
  o.backend = "cpu";
  auto engine = Engine::Create(dir, o);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  GenerateRequest r;
  r.prompt = tok->Encode("def main(");
  r.max_new_tokens = 24;
  auto out = Generate(**engine, {r});
  ASSERT_TRUE(out.ok());
  const std::string text = "def main(" + tok->Decode((*out)[0].tokens);
  // What transformers produced (models/README of the shared model).
  const std::string want =
      "def main(args):\n    \"\"\"Return a breakpoint object, in which steps up in a directory.\"\"\"";
  EXPECT_EQ(text.substr(0, want.size()), want) << text;
}

// Generate with penalties: the tokens a step-by-step reference picks from the raw logits after
// applying vLLM's penalties itself (greedy, so the draw is the arg max), and not the unpenalized
// tokens.
TEST(Generate, PenaltiesAreAppliedToEveryStep) {
  EngineOptions o;
  o.backend = "cpu";
  const std::string dir = std::string(EF_MODELS_DIR) + "/tiny-code-moe";
  auto engine = Engine::Create(dir, o);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  GenerateRequest r;
  r.prompt = {1, 822, 1667, 2989, 40};
  r.max_new_tokens = 24;
  r.ignore_eos = true;
  auto plain = Generate(**engine, {r});
  ASSERT_TRUE(plain.ok()) << plain.status().ToString();
  r.sampling.presence_penalty = 0.6f;
  r.sampling.frequency_penalty = 0.3f;
  r.sampling.repetition_penalty = 1.4f;
  auto got = Generate(**engine, {r});
  ASSERT_TRUE(got.ok()) << got.status().ToString();

  const int V = (*engine)->config().vocab_size;
  ASSERT_TRUE((*engine)->AddSequence(7).ok());
  std::vector<int32_t> feed = r.prompt, want;
  std::map<int32_t, int> counts;
  for (int step = 0; step < r.max_new_tokens; ++step) {
    ForwardResult fr;
    ASSERT_TRUE((*engine)->Forward(std::vector<SeqChunk>{{7, feed, false}}, &fr).ok());
    std::vector<float> row(fr.logits.begin(), fr.logits.begin() + V);
    std::set<int32_t> seen(r.prompt.begin(), r.prompt.end());
    for (int32_t t : want) seen.insert(t);
    for (int32_t t : seen) row[t] = row[t] > 0 ? row[t] / 1.4f : row[t] * 1.4f;
    for (const auto& [t, n] : counts) row[t] -= 0.3f * static_cast<float>(n) + 0.6f;
    const int32_t next = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
    want.push_back(next);
    ++counts[next];
    feed = {next};
  }
  (*engine)->RemoveSequence(7);
  EXPECT_EQ((*got)[0].tokens, want);
  EXPECT_NE((*got)[0].tokens, (*plain)[0].tokens) << "the penalties changed nothing: the test tests nothing";
}

TEST(Generate, BatchedEqualsOneAtATimeAndRaggedLengthsWork) {
  EngineOptions o;
  o.backend = "cpu";
  auto engine = Engine::Create(std::string(EF_MODELS_DIR) + "/tiny-code-moe", o);
  ASSERT_TRUE(engine.ok());
  std::vector<GenerateRequest> reqs(3);
  reqs[0].prompt = {483, 2753, 10};
  reqs[1].prompt = {1, 2753, 10, 55, 300, 301, 17};
  reqs[2].prompt = {42};
  for (auto& r : reqs) {
    r.max_new_tokens = 8;
    r.ignore_eos = true;
  }
  auto together = Generate(**engine, reqs);
  ASSERT_TRUE(together.ok());
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto alone = Generate(**engine, {reqs[i]});
    ASSERT_TRUE(alone.ok());
    EXPECT_EQ((*alone)[0].tokens, (*together)[i].tokens) << "request " << i;
  }
}

TEST(Generate, SamplingIsReproducibleWithASeedAndValidatesParams) {
  EngineOptions o;
  o.backend = "cpu";
  auto engine = Engine::Create(std::string(EF_MODELS_DIR) + "/tiny-code-moe", o);
  ASSERT_TRUE(engine.ok());
  GenerateRequest r;
  r.prompt = {483, 2753, 10};
  r.max_new_tokens = 16;
  r.ignore_eos = true;
  r.sampling = {0.9f, 40, 0.95f, 1234};
  auto a = Generate(**engine, {r});
  auto b = Generate(**engine, {r});
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)[0].tokens, (*b)[0].tokens);
  r.sampling.seed = 99;
  auto c = Generate(**engine, {r});
  ASSERT_TRUE(c.ok());
  EXPECT_NE((*a)[0].tokens, (*c)[0].tokens);
  r.sampling.top_p = 0.f;
  EXPECT_FALSE(Generate(**engine, {r}).ok());
}

}  // namespace
}  // namespace ef::runtime
