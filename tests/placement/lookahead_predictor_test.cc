// LookaheadPredictor: the arithmetic on synthetic routers, the engine's exposed router inputs on
// tiny-code-moe (a router on its own input reproduces the model's routing), and
// `eval-predictor --predictor lookahead` end to end, with its bad-input errors.
#include "placement/lookahead_predictor.h"

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "runtime/engine/engine.h"
#include "tests/placement/predictor_test_util.h"

namespace ef::placement {
namespace {

const std::string kModel = std::string(EF_MODELS_DIR) + "/tiny-code-moe";

struct CliRun {
  int code = -1;
  std::string out;
};

// Runs the binary; `out` gets stdout, and stderr too when `with_stderr`.
CliRun Exec(const std::string& args, bool with_stderr = true) {
  CliRun r;
  std::string cmd = std::string(EF_BINARY) + " " + args + (with_stderr ? " 2>&1" : " 2>/dev/null");
  FILE* f = popen(cmd.c_str(), "r");
  if (!f) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), f)) > 0) r.out.append(buf.data(), n);
  int status = pclose(f);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::vector<float> SoftmaxOf(std::vector<float> x) {
  float mx = *std::max_element(x.begin(), x.end()), sum = 0;
  for (float& v : x) sum += v = std::exp(v - mx);
  for (float& v : x) v /= sum;
  return x;
}

// 3 layers, 4 experts, hidden 2: router m, expert e has row (e - m, 1) scaled by m + 1.
std::unique_ptr<LookaheadPredictor> Synthetic(LookaheadOptions o, bool with_norms = true) {
  std::vector<std::vector<float>> routers, norms;
  for (int m = 0; m < 3; ++m) {
    std::vector<float> w;
    for (int e = 0; e < 4; ++e) w.insert(w.end(), {float(e - m) * (m + 1), float(m + 1)});
    routers.push_back(w);
    norms.push_back({1.f + m, 0.5f});
  }
  auto p =
      LookaheadPredictor::Create(2, 4, 2, routers, with_norms ? norms : std::vector<std::vector<float>>{}, 1e-6f, o);
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return std::move(p).value();
}

TEST(LookaheadPredictorTest, RescaledRouterMath) {
  auto p = Synthetic({});
  EXPECT_EQ(p->num_layers(), 3);
  EXPECT_EQ(p->name(), "lookahead");
  const std::vector<float> h = {0.3f, -0.8f};  // seen by router 0 (norm g0 = (1, 0.5))
  std::array<float, 4> got;
  // Same layer: (W0 * g0) (h / g0) = W0 h, the model's own router.
  ASSERT_TRUE(p->LayerProbs(h, 0, 0, got.data()).ok());
  std::vector<float> want = SoftmaxOf({-0.8f * 1 + 0 * 0.3f, 0.3f - 0.8f, 0.6f - 0.8f, 0.9f - 0.8f});
  for (int e = 0; e < 4; ++e) EXPECT_NEAR(got[e], want[e], 1e-6);
  // Layer 2 from layer 0: u = h / g0 = (0.3, -1.6); router 2 folded with g2 = (3, 0.5).
  ASSERT_TRUE(p->LayerProbs(h, 0, 2, got.data()).ok());
  std::vector<float> logits(4);
  for (int e = 0; e < 4; ++e) logits[e] = (e - 2) * 3.f * 3.f * 0.3f + 3.f * 0.5f * -1.6f;
  want = SoftmaxOf(logits);
  for (int e = 0; e < 4; ++e) EXPECT_NEAR(got[e], want[e], 1e-6);
  // Without rescaling: W2 h.
  auto raw = Synthetic({.max_lookahead = 0, .rescale_norm = false});
  ASSERT_TRUE(raw->LayerProbs(h, 0, 2, got.data()).ok());
  for (int e = 0; e < 4; ++e) logits[e] = (e - 2) * 3.f * 0.3f + 3.f * -0.8f;
  want = SoftmaxOf(logits);
  for (int e = 0; e < 4; ++e) EXPECT_NEAR(got[e], want[e], 1e-6);
  // Errors name what is wrong.
  EXPECT_FALSE(p->LayerProbs({h.data(), 1}, 0, 1, got.data()).ok());
  EXPECT_FALSE(p->LayerProbs(h, 0, 3, got.data()).ok());
}

TEST(LookaheadPredictorTest, PredictGivenKeepsObservedRowsAndHorizon) {
  auto p = Synthetic({.max_lookahead = 1});
  const std::vector<float> h = {0.3f, -0.8f}, emb = {2.f, 1.f};
  const std::vector<int16_t> experts = {3, 1, 0, 2, 1, 2};
  std::vector<PredictorInput> in(2);
  in[0].embedding = emb;
  in[1].embedding = emb;
  std::vector<ObservedRouting> obs = {{0, experts, 2, {}}, {1, experts, 2, h}};
  auto f = p->PredictGiven(in, obs);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  // Token 0: layer 0 from the embedding, layers 1-2 past the horizon (uniform).
  EXPECT_NEAR(f->row(0, 1)[0], 0.25f, 1e-6);
  float sum = 0;
  for (int e = 0; e < 4; ++e) sum += f->row(0, 0)[e];
  EXPECT_NEAR(sum, 1.f, 1e-5);
  // Token 1: layer 0 observed {3, 1}; layer 1 from h (seen at layer 0); layer 2 uniform.
  EXPECT_EQ(f->TopK(1, 0, 2), (std::vector<int>{1, 3}));
  std::array<float, 4> want;
  ASSERT_TRUE(p->LayerProbs(h, 0, 1, want.data()).ok());
  for (int e = 0; e < 4; ++e) EXPECT_FLOAT_EQ(f->row(1, 1)[e], want[e]);
  EXPECT_NEAR(f->row(1, 2)[3], 0.25f, 1e-6);
  // A priori from the embedding; without one, a clear error.
  EXPECT_TRUE(p->Predict(in).ok());
  in[1].embedding = {};
  auto bad = p->Predict(in);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("embedding"), std::string::npos);
  obs[1].hidden = {};
  auto bad2 = p->PredictGiven(in, obs);
  ASSERT_FALSE(bad2.ok());
  EXPECT_NE(bad2.status().message().find("hidden"), std::string::npos);
}

TEST(LookaheadPredictorTest, CreateRejectsBadShapes) {
  EXPECT_FALSE(LookaheadPredictor::Create(2, 4, 2, {{1, 2, 3}}, {}, 1e-6f).ok());
  EXPECT_FALSE(LookaheadPredictor::Create(2, 4, 5, {std::vector<float>(8)}, {}, 1e-6f).ok());
  EXPECT_FALSE(LookaheadPredictor::Create(2, 4, 2, {}, {}, 1e-6f).ok());
  EXPECT_FALSE(LookaheadPredictor::Create(2, 4, 2, {std::vector<float>(8)}, {{1.f}}, 1e-6f).ok());
}

// On the real model, each router applied to the hidden state the engine exposes for it picks the
// engine's own experts; the hidden state is absent unless asked for.
TEST(LookaheadPredictorTest, EngineRouterInputsReproduceRouting) {
  runtime::EngineOptions eo;
  eo.backend = "cpu";
  auto engine = runtime::Engine::Create(kModel, eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  runtime::Engine& e = **engine;
  auto look = LookaheadPredictor::FromModel(e.weights());
  ASSERT_TRUE(look.ok()) << look.status().ToString();
  ASSERT_EQ((*look)->num_layers(), e.config().num_moe_layers());
  const int H = e.config().hidden_size, E = e.config().num_experts;
  int rows = 0, same = 0, empty_hidden = 0;
  e.AddRoutingHook([&](runtime::LayerRouting& r) -> Status {
    if (r.hidden.empty()) {
      ++empty_hidden;
      return Status::Ok();
    }
    EXPECT_EQ(r.hidden.size(), static_cast<size_t>(r.num_tokens) * H);
    std::vector<float> p(E);
    for (int t = 0; t < r.num_tokens; ++t) {
      EF_RETURN_IF_ERROR(
          (*look)->LayerProbs(r.hidden.subspan(t * H, H), r.moe_layer.index, r.moe_layer.index, p.data()));
      RoutingForecast f(1, 1, E);
      std::copy(p.begin(), p.end(), f.row(0, 0));
      std::vector<int> top = f.TopK(0, 0, r.top_k);
      same += top == std::vector<int>(r.ids.begin() + t * r.top_k, r.ids.begin() + (t + 1) * r.top_k);
      ++rows;
    }
    return Status::Ok();
  });
  std::vector<int32_t> ids = {5, 336, 50, 38, 12, 7, 1000, 42, 99, 3};
  ASSERT_TRUE(e.AddSequence(0).ok());
  runtime::SeqChunk chunk{0, ids, false};
  runtime::ForwardResult res;
  ASSERT_TRUE(e.Forward({&chunk, 1}, &res).ok());
  EXPECT_EQ(empty_hidden, e.config().num_moe_layers());
  EXPECT_EQ(rows, 0);
  e.set_expose_router_inputs(true);
  ASSERT_TRUE(e.Forward({&chunk, 1}, &res).ok());
  EXPECT_EQ(rows, static_cast<int>(ids.size()) * e.config().num_moe_layers());
  EXPECT_EQ(same, rows);
}

nlohmann::json EvalJson(const std::string& trace, int d, const std::string& extra) {
  CliRun r = Exec("eval-predictor --predictor lookahead --lookahead-layers " + std::to_string(d) + " --model " +
                      kModel + " --backend cpu --trace " + trace + " --json " + extra,
                  /*with_stderr=*/false);
  EXPECT_EQ(r.code, 0) << r.out;
  nlohmann::json j = nlohmann::json::parse(r.out, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << r.out;
  return j;
}

// Held-out prompts of the shared trace (recorded with transformers), default split (test
// sequences 22-29, baselines fitted on 0-21). Measured: lookahead-1 mean recall@2 0.823, frequency
// 0.595; per layer lookahead wins everywhere but layer 1 (0.517 vs 0.719: layer 0's experts move
// the residual away from what router 1 reads); model/trace agreement 0.993.
TEST(LookaheadPredictorTest, BeatsFrequencyOnSharedTrace) {
  const std::string trace = std::string(EF_TEST_DATA) + "/traces/tiny_code_moe_prefill.jsonl";
  ASSERT_TRUE(std::filesystem::exists(trace)) << trace << " is missing (tests/data/traces)";
  nlohmann::json j = EvalJson(trace, 1, "");
  ASSERT_TRUE(j.contains("recall")) << j.dump();
  EXPECT_EQ(j["predictor"], "lookahead");
  EXPECT_EQ(j["test_seqs"], "22-29");
  EXPECT_EQ(j["per_layer_recall"].size(), 8u);
  const double look = j["recall"], freq = j["baseline_frequency"]["recall"];
  EXPECT_GT(look, 0.78);
  EXPECT_GT(look, freq + 0.15);
  for (int l = 0; l < 8; ++l) {
    if (l == 1) continue;
    EXPECT_GT(j["per_layer_recall"][l].get<double>(),
              j["baseline_frequency"]["per_layer_recall"][l].get<double>() + 0.1)
        << "layer " << l;
  }
  EXPECT_GT(j["trace_agreement"]["mean"].get<double>(), 0.98);
  EXPECT_TRUE(j["baseline_affinity"].contains("per_layer_recall"));
}

// A trace recorded by `trace` from the same engine: the model reproduces it exactly, and lookahead
// still beats frequency on held-out prompts.
TEST(LookaheadPredictorTest, EvalOnRecordedTrace) {
  auto dir = testing::TempDir("lookahead_rec");
  const std::string prompts = (dir / "p.txt").string(), trace = (dir / "t.jsonl").string();
  testing::WriteText(prompts,
                     "def read_config(path):\n"
                     "import sys\nimport json\n"
                     "class Node:\n    def __init__(self, value):\n"
                     "    return sorted(items, key=lambda x: x[1])\n"
                     "for line in open(filename):\n"
                     "if __name__ == '__main__':\n    main()\n"
                     "    except ValueError as e:\n"
                     "        self.children.append(child)\n");
  CliRun rec = Exec("trace -m " + kModel + " --backend cpu --prompts " + prompts + " --out " + trace + " -n 16");
  ASSERT_EQ(rec.code, 0) << rec.out;
  nlohmann::json j1 = EvalJson(trace, 1, "");
  nlohmann::json j2 = EvalJson(trace, 2, "");
  ASSERT_TRUE(j1.contains("trace_agreement") && j2.contains("recall"));
  EXPECT_EQ(j1["trace_agreement"]["mean"].get<double>(), 1.0);
  EXPECT_EQ(j1["trace_agreement"]["ordered"].get<double>(), 1.0);
  EXPECT_GT(j1["recall"].get<double>(), j1["baseline_frequency"]["recall"].get<double>());
  EXPECT_GE(j1["recall"].get<double>(), j2["recall"].get<double>() - 0.02);  // nearer is not worse
}

TEST(LookaheadPredictorTest, EvalBadInputFailsClearly) {
  auto dir = testing::TempDir("lookahead_bad");
  const std::string shape = (dir / "shape.jsonl").string(), gap = (dir / "gap.jsonl").string();
  ASSERT_TRUE(WriteRoutingTrace(testing::PlantedTrace(4, 8, 4, 16, 100, 5), shape).ok());
  CliRun r = Exec("eval-predictor --predictor lookahead --model " + kModel + " --backend cpu --trace " + shape);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("4 layers x 16 experts"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("8 layers x 8 experts"), std::string::npos) << r.out;

  // The right shape, but a test sequence with a hole: the model cannot be re-run on it.
  RoutingTrace t = testing::PlantedTrace(4, 8, 8, 8, 100, 6);
  t.tokens.erase(t.tokens.begin() + 8 * 3 + 2);
  ASSERT_TRUE(WriteRoutingTrace(t, gap).ok());
  r = Exec("eval-predictor --predictor lookahead --model " + kModel + " --backend cpu --trace " + gap);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("sequence 3 has position 3 where 2 was expected"), std::string::npos) << r.out;
  r = Exec("eval-predictor --predictor lookahead --lookahead-layers 0 --model " + kModel + " --backend cpu --trace " +
           gap);
  EXPECT_EQ(r.code, 1) << r.out;
}

}  // namespace
}  // namespace ef::placement
