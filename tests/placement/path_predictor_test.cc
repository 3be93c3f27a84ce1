// Predictors: planted rules are learned (from the token, and from the observed path), files
// round-trip exactly, bad files are rejected, and on the shared traces the path predictor beats
// both baselines (tiny-code-moe a priori, FLAME-MoE one layer ahead).
#include "placement/path_predictor.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <set>

#include "placement/affinity_predictor.h"
#include "placement/conditional_predictor.h"
#include "placement/frequency_predictor.h"
#include "placement/hybrid_predictor.h"
#include "placement/predictor_eval.h"
#include "placement/predictor_file.h"
#include "placement/predictor_io.h"
#include "placement/trace_inputs.h"
#include "tests/placement/predictor_test_util.h"

namespace ef::placement {
namespace {

RoutingTrace Seqs(const RoutingTrace& t, int64_t lo, int64_t hi) {
  return t.Filter([&](int64_t s) { return s >= lo && s <= hi; });
}

PathPredictorOptions SmallOptions() {
  PathPredictorOptions o;
  o.embed_dim = 16;
  o.hidden = 64;
  o.epochs = 25;
  o.seed = 7;
  return o;
}

TEST(PathPredictorTest, LearnsAPlantedRule) {
  RoutingTrace all = testing::PlantedTrace(40, 32, 4, 8, 60, 1);
  auto p = PathPredictor::Train(Seqs(all, 0, 27), Seqs(all, 28, 31), SmallOptions(), nullptr);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  auto m = EvaluatePredictor(**p, Seqs(all, 32, 39), EvalMode::kAPriori);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_GT(m->recall, 0.95);
  for (double r : m->per_layer_recall) EXPECT_GT(r, 0.95);
  // The frequency baseline cannot know the rule.
  auto f = FrequencyPredictor::Fit(Seqs(all, 0, 31));
  ASSERT_TRUE(f.ok());
  auto fm = EvaluatePredictor(**f, Seqs(all, 32, 39), EvalMode::kAPriori);
  ASSERT_TRUE(fm.ok());
  EXPECT_LT(fm->recall, 0.6);
}

TEST(PathPredictorTest, CorrectsItsForecastFromTheObservedPath) {
  // Token ids are noise; each later layer follows from layer 0's experts.
  RoutingTrace all = testing::PathRuleTrace(40, 32, 4, 16, 11);
  PathPredictorOptions o = SmallOptions();
  o.epochs = 15;
  auto p = PathPredictor::Train(Seqs(all, 0, 27), Seqs(all, 28, 31), o, nullptr);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  const RoutingTrace test = Seqs(all, 32, 39);
  auto corrected = EvaluatePredictor(**p, test, EvalMode::kOneLayerAhead);
  auto prior = EvaluatePredictor(**p, test, EvalMode::kAPriori);
  ASSERT_TRUE(corrected.ok() && prior.ok());
  for (int l = 1; l < 4; ++l) {
    EXPECT_GT(corrected->per_layer_recall[l], 0.95) << "layer " << l;
    EXPECT_LT(prior->per_layer_recall[l], 0.4) << "layer " << l << ": nothing a priori predicts it";
  }
  // Observed rows are the truth; a forecast given all layers is the path itself.
  TraceInputs in(test);
  std::vector<ObservedRouting> obs(test.tokens.size());
  for (size_t t = 0; t < obs.size(); ++t) obs[t] = {2, test.tokens[t].experts, 2, {}};
  auto f = (*p)->PredictGiven(in.inputs(), obs);
  ASSERT_TRUE(f.ok());
  for (size_t t = 0; t < obs.size(); ++t)
    for (int l = 0; l < 2; ++l)
      for (int j = 0; j < 2; ++j) EXPECT_EQ(f->row(static_cast<int>(t), l)[test.tokens[t].experts[l * 2 + j]], 1.f);
  // With a horizon, only the layers asked for are forecast, as without one.
  std::vector<ObservedRouting> near = obs;
  for (auto& o : near) o.horizon = 1;
  auto h = (*p)->PredictGiven(in.inputs(), near);
  ASSERT_TRUE(h.ok());
  for (size_t t = 0; t < obs.size(); ++t) {
    const int ti = static_cast<int>(t);
    for (int e = 0; e < 16; ++e) {
      EXPECT_EQ(h->row(ti, 2)[e], f->row(ti, 2)[e]);
      EXPECT_EQ(h->row(ti, 3)[e], 0.f) << "beyond the horizon";
    }
  }
  // Observed routing of another top-k is refused.
  std::vector<ObservedRouting> other = obs;
  other[0].top_k = 1;
  auto k1 = (*p)->PredictGiven(in.inputs(), other);
  ASSERT_FALSE(k1.ok());
  EXPECT_NE(k1.status().message().find("trained on top-2"), std::string::npos) << k1.status().message();
  // A routing that claims more layers than it holds is refused.
  obs[0] = {3, std::span<const int16_t>(test.tokens[0].experts).first(4), 2, {}};
  auto bad = (*p)->PredictGiven(in.inputs(), obs);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("claims 3 observed layers"), std::string::npos) << bad.status().message();
}

TEST(PathPredictorTest, ReadsOnlyTheLastPathWindowLayers) {
  RoutingTrace all = testing::PathRuleTrace(8, 16, 4, 16, 12);
  PathPredictorOptions o = SmallOptions();
  o.epochs = 2;
  o.path_window = 1;
  auto p = PathPredictor::Train(Seqs(all, 0, 5), Seqs(all, 6, 7), o, nullptr);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  TraceInputs in(all);
  // Two observed paths that differ only in layer 0: at depth 2 the window (layer 1) is the same.
  std::vector<int16_t> a = {0, 1, 2, 3}, b = {4, 5, 2, 3};
  std::vector<ObservedRouting> oa(1, ObservedRouting{2, a, 2, {}}), ob(1, ObservedRouting{2, b, 2, {}});
  auto fa = (*p)->PredictGiven(in.inputs().first(1), oa);
  auto fb = (*p)->PredictGiven(in.inputs().first(1), ob);
  ASSERT_TRUE(fa.ok() && fb.ok());
  for (int l = 2; l < 4; ++l)
    for (int e = 0; e < 16; ++e) EXPECT_EQ(fa->row(0, l)[e], fb->row(0, l)[e]) << "layer " << l << " expert " << e;
  // ...and at depth 1 they differ.
  oa[0].num_layers_done = ob[0].num_layers_done = 1;
  EXPECT_NE((*p)->PredictGiven(in.inputs().first(1), oa)->prob, (*p)->PredictGiven(in.inputs().first(1), ob)->prob);
}

TEST(PathPredictorTest, TrainingIsDeterministic) {
  RoutingTrace all = testing::PlantedTrace(12, 16, 3, 8, 30, 2);
  PathPredictorOptions o = SmallOptions();
  o.epochs = 3;
  auto a = PathPredictor::Train(Seqs(all, 0, 9), Seqs(all, 10, 11), o, nullptr);
  auto b = PathPredictor::Train(Seqs(all, 0, 9), Seqs(all, 10, 11), o, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  TraceInputs in(all);
  EXPECT_EQ((*a)->Predict(in.inputs())->prob, (*b)->Predict(in.inputs())->prob);
}

// An option out of range is refused naming its train-predictor flag and value.
TEST(PathPredictorTest, OptionOutOfRangeNamesItsFlag) {
  RoutingTrace all = testing::PlantedTrace(4, 16, 3, 8, 10, 2);
  const std::pair<std::function<void(PathPredictorOptions&)>, std::string> cases[] = {
      {[](PathPredictorOptions& o) { o.epochs = 0; }, "--epochs must be >= 1, got 0"},
      {[](PathPredictorOptions& o) { o.num_threads = 100000; }, "--threads must be in 1..64, got 100000"},
      {[](PathPredictorOptions& o) { o.hidden = 0; }, "--hidden must be >= 1, got 0"},
      {[](PathPredictorOptions& o) { o.token_dropout = 1; }, "--token-dropout must be in [0, 1)"},
  };
  for (const auto& [set, want] : cases) {
    PathPredictorOptions o = SmallOptions();
    set(o);
    auto p = PathPredictor::Train(Seqs(all, 0, 2), Seqs(all, 3, 3), o, nullptr);
    ASSERT_FALSE(p.ok()) << want;
    EXPECT_NE(p.status().message().find(want), std::string::npos) << p.status().message();
  }
}

TEST(PredictorFileTest, RoundTripGivesIdenticalForecasts) {
  RoutingTrace all = testing::PlantedTrace(12, 16, 3, 8, 30, 3);
  PathPredictorOptions o = SmallOptions();
  o.epochs = 3;
  auto path = PathPredictor::Train(Seqs(all, 0, 9), Seqs(all, 10, 11), o, nullptr);
  ASSERT_TRUE(path.ok());
  auto aff = AffinityPredictor::Fit(Seqs(all, 0, 9));
  auto freq = FrequencyPredictor::Fit(Seqs(all, 0, 9));
  ASSERT_TRUE(aff.ok() && freq.ok());
  PredictorInfo info{"", 3, 8, 2, "synthetic", "t.jsonl", {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}};
  TraceInputs in(all);
  auto dir = testing::TempDir("roundtrip");
  std::vector<const Predictor*> ps = {path->get(), aff->get(), freq->get()};
  for (const Predictor* p : ps) {
    std::string file = (dir / (p->name() + ".safetensors")).string();
    ASSERT_TRUE(SavePredictor(*p, info, file).ok());
    auto loaded = LoadPredictor(file);
    ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
    EXPECT_EQ(loaded->info.kind, p->name());
    EXPECT_EQ(loaded->info.train_seqs, info.train_seqs);
    EXPECT_EQ(p->Predict(in.inputs())->prob, loaded->predictor->Predict(in.inputs())->prob) << p->name();
    if (auto* c = dynamic_cast<const ConditionalPredictor*>(p)) {
      std::vector<ObservedRouting> obs(all.tokens.size());
      for (size_t t = 0; t < obs.size(); ++t) obs[t] = {1, all.tokens[t].experts, 2, {}};
      auto* lc = dynamic_cast<const ConditionalPredictor*>(loaded->predictor.get());
      ASSERT_NE(lc, nullptr) << p->name();
      EXPECT_EQ(c->PredictGiven(in.inputs(), obs)->prob, lc->PredictGiven(in.inputs(), obs)->prob) << p->name();
    }
  }
}

TEST(PredictorFileTest, APrioriPathModelCorrectsOnlyTheObservedRows) {
  // A model without path inputs (as files written before them): PredictGiven keeps its a-priori
  // forecast for the layers not observed.
  RoutingTrace all = testing::PlantedTrace(12, 16, 3, 8, 30, 9);
  PathPredictorOptions o = SmallOptions();
  o.epochs = 3;
  o.observe_path = false;
  auto path = PathPredictor::Train(Seqs(all, 0, 9), Seqs(all, 10, 11), o, nullptr);
  ASSERT_TRUE(path.ok());
  PredictorInfo info{"", 3, 8, 2, "synthetic", "t.jsonl", {0}};
  auto file = (testing::TempDir("apriori") / "path.safetensors").string();
  ASSERT_TRUE(SavePredictor(**path, info, file).ok());
  auto loaded = LoadPredictor(file);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  auto* p = dynamic_cast<const PathPredictor*>(loaded->predictor.get());
  ASSERT_NE(p, nullptr);
  EXPECT_FALSE(p->options().observe_path);
  TraceInputs in(all);
  std::vector<ObservedRouting> obs(all.tokens.size());
  for (size_t t = 0; t < obs.size(); ++t) obs[t] = {1, all.tokens[t].experts, 2, {}};
  auto prior = p->Predict(in.inputs());
  auto given = p->PredictGiven(in.inputs(), obs);
  ASSERT_TRUE(prior.ok() && given.ok());
  EXPECT_EQ(prior->prob, (*path)->Predict(in.inputs())->prob) << "the file changed the forecast";
  for (int t = 0; t < prior->num_tokens; ++t) {
    EXPECT_EQ(given->row(t, 0)[all.tokens[t].experts[0]], 1.f);
    for (int l = 1; l < 3; ++l)
      for (int e = 0; e < 8; ++e) EXPECT_EQ(given->row(t, l)[e], prior->row(t, l)[e]) << t << " " << l << " " << e;
  }
}

TEST(PredictorFileTest, RejectsMalformedAndMismatchedFiles) {
  auto dir = testing::TempDir("badfiles");
  testing::WriteText(dir / "garbage.safetensors", "this is not a safetensors file at all");
  auto g = LoadPredictor((dir / "garbage.safetensors").string());
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.status().message().find("not a valid safetensors"), std::string::npos) << g.status().message();
  EXPECT_FALSE(LoadPredictor((dir / "missing.safetensors").string()).ok());

  // A valid file with a tensor that contradicts the declared shape.
  RoutingTrace all = testing::PlantedTrace(4, 8, 3, 8, 10, 4);
  auto freq = FrequencyPredictor::Fit(all);
  ASSERT_TRUE(freq.ok());
  PredictorFile file;
  (*freq)->ToFile(&file, "");
  file.metadata = {{"format", "expertflow-predictor"},
                   {"format_version", "1"},
                   {"kind", "frequency"},
                   {"num_layers", "4"},
                   {"num_experts", "8"},
                   {"top_k", "2"},
                   {"decay", "1"}};
  ASSERT_TRUE(WritePredictorFile(file, (dir / "shape.safetensors").string()).ok());
  auto s = LoadPredictor((dir / "shape.safetensors").string());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("shape"), std::string::npos) << s.status().message();

  // Truncated file.
  PredictorInfo info{"", 3, 8, 2, "synthetic", "", {0}};
  std::string good = (dir / "good.safetensors").string();
  ASSERT_TRUE(SavePredictor(**freq, info, good).ok());
  auto size = std::filesystem::file_size(good);
  std::filesystem::resize_file(good, size - 5);
  EXPECT_FALSE(LoadPredictor(good).ok());

  // A trace of another shape cannot be evaluated.
  RoutingTrace other = testing::PlantedTrace(2, 8, 5, 8, 10, 5);
  auto m = EvaluatePredictor(**freq, other, EvalMode::kAPriori);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("layers"), std::string::npos);
}

TEST(AffinityPredictorTest, OneLayerAheadUsesTheObservedLayer) {
  // Layer l+1's experts are a function of layer l's: affinity one layer ahead is exact.
  RoutingTrace all = testing::PlantedTrace(10, 16, 3, 8, 2, 6);  // 2 tokens: no shared experts
  auto aff = AffinityPredictor::Fit(Seqs(all, 0, 7));
  ASSERT_TRUE(aff.ok());
  auto m = EvaluatePredictor(**aff, Seqs(all, 8, 9), EvalMode::kOneLayerAhead);
  ASSERT_TRUE(m.ok());
  EXPECT_GT(m->per_layer_recall[1], 0.99);
  EXPECT_GT(m->per_layer_recall[2], 0.99);
}

// The shared tiny-code-moe prefill trace: the path predictor, forecasting all layers from the
// token and its context alone, beats frequency on every layer and one-layer-ahead affinity on
// every layer after the first.
TEST(SharedTraceTest, PathBeatsBaselinesOnTinyCodeMoe) {
  const std::string path = std::string(EF_TEST_DATA) + "/traces/tiny_code_moe_prefill.jsonl";
  ASSERT_TRUE(std::filesystem::exists(path)) << path << " is missing (tests/data/traces)";
  auto trace = ReadRoutingTrace(path);
  ASSERT_TRUE(trace.ok()) << trace.status().ToString();
  trace->SortBySeqPos();
  RoutingTrace train = Seqs(*trace, 0, 21), fit = Seqs(*trace, 0, 19), val = Seqs(*trace, 20, 21),
               test = Seqs(*trace, 22, 1 << 30);
  PathPredictorOptions o;
  o.epochs = 12;
  auto p = PathPredictor::Train(fit, val, o, nullptr);
  ASSERT_TRUE(p.ok());
  auto freq = FrequencyPredictor::Fit(train);
  auto aff = AffinityPredictor::Fit(train);
  auto pm = EvaluatePredictor(**p, test, EvalMode::kAPriori);
  auto fm = EvaluatePredictor(**freq, test, EvalMode::kAPriori);
  auto am = EvaluatePredictor(**aff, test, EvalMode::kOneLayerAhead);
  ASSERT_TRUE(pm.ok() && fm.ok() && am.ok());
  for (int l = 0; l < trace->num_layers(); ++l) {
    EXPECT_GT(pm->per_layer_recall[l], fm->per_layer_recall[l]) << "layer " << l;
    if (l > 0) {
      EXPECT_GT(pm->per_layer_recall[l], am->per_layer_recall[l]) << "layer " << l;
    }
  }
  EXPECT_GT(pm->recall, 0.75);
}

// The shared FLAME-MoE trace, split as the issue fixes it (sequences 0-23 train, 24-31 test):
// token ids say nothing about its routing, so the path predictor must read the observed path;
// one layer ahead it beats one-layer-ahead affinity on every layer after the first.
TEST(SharedTraceTest, CorrectedPathBeatsAffinityOnFlame) {
  const std::string path = std::string(EF_TEST_DATA) + "/traces/flame_moe_290m_prefill.jsonl";
  ASSERT_TRUE(std::filesystem::exists(path)) << path << " is missing (tests/data/traces)";
  auto trace = ReadRoutingTrace(path);
  ASSERT_TRUE(trace.ok()) << trace.status().ToString();
  trace->SortBySeqPos();
  // As train-predictor splits --train-seqs 0-23: the last eighth validates.
  RoutingTrace train = Seqs(*trace, 0, 23), fit = Seqs(*trace, 0, 20), val = Seqs(*trace, 21, 23),
               test = Seqs(*trace, 24, 31);
  auto p = PathPredictor::Train(fit, val, PathPredictorOptions{}, nullptr);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  auto freq = FrequencyPredictor::Fit(train);
  auto aff = AffinityPredictor::Fit(train);
  ASSERT_TRUE(freq.ok() && aff.ok());
  auto pm = EvaluatePredictor(**p, test, EvalMode::kOneLayerAhead);
  auto fm = EvaluatePredictor(**freq, test, EvalMode::kAPriori);
  auto am = EvaluatePredictor(**aff, test, EvalMode::kOneLayerAhead);
  ASSERT_TRUE(pm.ok() && fm.ok() && am.ok());
  // Layer 0 is forecast before anything is observed, from token ids that carry no signal here:
  // popularity is the best it can do.
  EXPECT_GT(pm->per_layer_recall[0], fm->per_layer_recall[0] - 0.02);
  for (int l = 1; l < trace->num_layers(); ++l) {
    EXPECT_GT(pm->per_layer_recall[l], am->per_layer_recall[l]) << "layer " << l;
    EXPECT_GT(pm->per_layer_recall[l], fm->per_layer_recall[l]) << "layer " << l;
  }
  EXPECT_GT(pm->recall, am->recall + 0.02);
}

}  // namespace
}  // namespace ef::placement
