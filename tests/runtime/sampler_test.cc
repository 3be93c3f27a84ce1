// Sampler: greedy is the arg max (lowest index on ties); top-k 1 and a tiny top-p are greedy at any
// temperature; a seed reproduces its draws; sampled frequencies follow softmax(logits / T);
// top_k and top_p keep the sorted prefix their definition names; NaN logits are never drawn;
// invalid parameters are refused with the field named.
#include "runtime/engine/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace ef::runtime {
namespace {

TEST(SamplerTest, GreedyIsTheArgMaxWithTheLowestIndexOnTies) {
  const std::vector<float> logits = {0.5f, 2.f, -1.f, 2.f};
  EXPECT_EQ(ArgMax(logits), 1);
  Sampler s(SamplingParams{});
  for (int i = 0; i < 10; ++i) EXPECT_EQ(s.Sample(logits), 1);
}

TEST(SamplerTest, ArgMaxOfLongRowsIsTheFirstMaximum) {
  // Rows of vocabulary size (not a multiple of the vectorised lanes), the maximum anywhere, ties
  // and NaNs: the first index of the largest non-NaN value, as a plain scan finds it.
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-20.f, 20.f);
  for (int n : {1, 15, 16, 17, 1000, 32001, 151936}) {
    for (int trial = 0; trial < 4; ++trial) {
      std::vector<float> v(n);
      for (float& x : v) x = u(rng);
      if (trial == 1) v[n - 1] = 100.f;
      if (trial == 2 && n > 3) v[n / 2] = v[n / 3] = 100.f;
      if (trial == 3) v[0] = std::nanf("");
      int want = -1;
      for (int k = 0; k < n; ++k)
        if (!std::isnan(v[k]) && (want < 0 || v[k] > v[want])) want = k;
      if (want < 0) want = 0;
      EXPECT_EQ(ArgMax(v), want) << "n=" << n << " trial " << trial;
    }
  }
  EXPECT_EQ(ArgMax(std::vector<float>(7, std::nanf(""))), 0);
}

TEST(SamplerTest, TopKOneAndTinyTopPAreGreedy) {
  const std::vector<float> logits = {0.1f, 0.3f, 0.2f, 0.25f};
  SamplingParams k1;
  k1.temperature = 5.f;
  k1.top_k = 1;
  k1.seed = 3;
  SamplingParams p0;
  p0.temperature = 5.f;
  p0.top_p = 1e-4f;
  p0.seed = 3;
  Sampler a(k1), b(p0);
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(a.Sample(logits), 1);
    EXPECT_EQ(b.Sample(logits), 1);
  }
}

TEST(SamplerTest, TheSeedReproducesTheDraws) {
  const std::vector<float> logits = {0.f, 0.1f, 0.2f, 0.3f, 0.4f, 0.5f};
  SamplingParams p;
  p.temperature = 1.f;
  p.seed = 1234;
  Sampler a(p), b(p);
  std::vector<int32_t> da, db, dc;
  for (int i = 0; i < 200; ++i) da.push_back(a.Sample(logits)), db.push_back(b.Sample(logits));
  EXPECT_EQ(da, db);
  p.seed = 1235;
  Sampler c(p);
  for (int i = 0; i < 200; ++i) dc.push_back(c.Sample(logits));
  EXPECT_NE(da, dc);
}

TEST(SamplerTest, FrequenciesFollowTheTemperedSoftmax) {
  const std::vector<float> logits = {1.f, 2.f, 0.f};
  const float t = 0.7f;
  SamplingParams p;
  p.temperature = t;
  p.seed = 99;
  Sampler s(p);
  const int n = 40000;
  std::vector<int> count(3, 0);
  for (int i = 0; i < n; ++i) ++count[s.Sample(logits)];
  double z = 0;
  for (float l : logits) z += std::exp(l / t);
  for (int i = 0; i < 3; ++i) {
    const double want = std::exp(logits[i] / t) / z;
    // 5 standard deviations of a binomial frequency.
    EXPECT_NEAR(static_cast<double>(count[i]) / n, want, 5 * std::sqrt(want * (1 - want) / n)) << "token " << i;
  }
}

TEST(SamplerTest, TopPKeepsTheSmallestSetReachingIt) {
  // softmax at T = 1: ~0.665, 0.245, 0.090. top_p 0.8 keeps the first two only.
  const std::vector<float> logits = {2.f, 1.f, 0.f};
  SamplingParams p;
  p.temperature = 1.f;
  p.top_p = 0.8f;
  p.seed = 5;
  Sampler s(p);
  int seen[3] = {0, 0, 0};
  for (int i = 0; i < 3000; ++i) ++seen[s.Sample(logits)];
  EXPECT_GT(seen[0], 0);
  EXPECT_GT(seen[1], 0);
  EXPECT_EQ(seen[2], 0);
}

// The kept set is the sorted prefix that the definition names (sort by logit, ties to the lower id;
// top_k first, then the smallest prefix whose probability reaches top_p), with ties and a flat
// tail; drawn frequencies within the kept set follow the renormalised softmax.
TEST(SamplerTest, TopKAndTopPKeepTheSortedPrefix) {
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.f, 2.f);
  std::vector<float> logits(2000);
  for (float& x : logits) x = std::round(g(rng) * 4.f) / 4.f;  // many exact ties
  struct Case {
    float t, top_p;
    int top_k;
  };
  for (Case c : {Case{1.f, 0.9f, 0}, Case{0.7f, 0.5f, 0}, Case{1.3f, 1.f, 50}, Case{1.f, 0.6f, 300},
                 Case{2.f, 0.95f, 0}, Case{1.f, 0.97f, 1500}}) {
    // The definition, by sorting.
    std::vector<int> order(logits.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
    std::sort(order.begin(), order.end(),
              [&](int a, int b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; });
    size_t keep = c.top_k > 0 ? static_cast<size_t>(c.top_k) : order.size();
    std::vector<double> w(keep);
    double total = 0;
    for (size_t i = 0; i < keep; ++i) total += (w[i] = std::exp((logits[order[i]] - logits[order[0]]) / c.t));
    if (c.top_p < 1.f) {
      double cum = 0;
      for (size_t i = 0; i < keep; ++i)
        if ((cum += w[i]) >= c.top_p * total) {
          keep = i + 1;
          break;
        }
    }
    std::vector<double> want(logits.size(), 0.0);
    double kept = 0;
    for (size_t i = 0; i < keep; ++i) kept += w[i];
    for (size_t i = 0; i < keep; ++i) want[order[i]] = w[i] / kept;

    SamplingParams p;
    p.temperature = c.t;
    p.top_p = c.top_p;
    p.top_k = c.top_k;
    p.seed = 11;
    Sampler s(p);
    const int n = 40000;
    std::vector<int> count(logits.size(), 0);
    for (int i = 0; i < n; ++i) ++count[s.Sample(logits)];
    for (size_t i = 0; i < logits.size(); ++i) {
      if (want[i] == 0) {
        ASSERT_EQ(count[i], 0) << "token " << i << " is outside the kept set (T " << c.t << ", top_p " << c.top_p
                               << ", top_k " << c.top_k << ")";
      } else {
        EXPECT_NEAR(count[i] / double(n), want[i], 5 * std::sqrt(want[i] * (1 - want[i]) / n) + 1e-4)
            << "token " << i << " (T " << c.t << ", top_p " << c.top_p << ", top_k " << c.top_k << ")";
      }
    }
  }
}

// NaN logits are never drawn; a row without a finite logit, a +inf logit or a temperature whose
// inverse overflows is greedy (the arg max).
TEST(SamplerTest, NanLogitsAreNeverDrawnAndDegenerateRowsAreGreedy) {
  const float nan = std::nanf("");
  SamplingParams p;
  p.temperature = 1.f;
  p.seed = 2;
  Sampler s(p);
  const std::vector<float> some = {nan, 0.f, nan, 0.5f, nan};
  for (int i = 0; i < 500; ++i) {
    const int32_t t = s.Sample(some);
    EXPECT_TRUE(t == 1 || t == 3) << t;
  }
  EXPECT_EQ(s.Sample(std::vector<float>(4, nan)), 0);  // no number: the arg max's answer
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(s.Sample(std::vector<float>{-inf, -inf}), 0);
  EXPECT_EQ(s.Sample(std::vector<float>{1.f, inf, 2.f, inf}), 1);
  SamplingParams tiny = p;
  tiny.temperature = 1e-40f;  // 1 / T overflows a float
  Sampler t(tiny);
  const std::vector<float> row = {0.5f, 3.f, 2.9f, -1.f};
  for (int i = 0; i < 50; ++i) EXPECT_EQ(t.Sample(row), 1);
}

// The exp of the shared sampling rule is exp within 2e-7 relative, exactly 1 at 0 and 0 below -28.
TEST(SamplerTest, SampleExpIsExp) {
  double worst = 0;
  for (int i = 0; i <= 280000; ++i) {
    const float x = -28.f * static_cast<float>(i) / 280000.f;
    const double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(SampleExp(x) - want) / want);
  }
  EXPECT_LT(worst, 2e-7);
  EXPECT_EQ(SampleExp(0.f), 1.f);
  EXPECT_EQ(SampleExp(-28.5f), 0.f);
  EXPECT_EQ(SampleExp(-std::numeric_limits<float>::infinity()), 0.f);
  EXPECT_EQ(SampleMass(3.f, 3.f, 2.f), uint64_t{1} << kSampleMassBits);
}

// Next() and SampleRow are Sample: the serving loop draws a step's parameters first and samples the
// row wherever its logits are.
TEST(SamplerTest, NextThenSampleRowIsSample) {
  std::mt19937 rng(3);
  std::normal_distribution<float> d(0.f, 2.f);
  std::vector<float> row(5000);
  for (float& v : row) v = d(rng);
  SamplingParams p{.temperature = 0.8f, .top_k = 100, .top_p = 0.9f, .seed = 42};
  Sampler a(p), b(p);
  for (int i = 0; i < 200; ++i) {
    const RowSampling s = b.Next();
    EXPECT_EQ(a.Sample(row), SampleRow(row.data(), static_cast<int64_t>(row.size()), s)) << "draw " << i;
  }
  EXPECT_FALSE(a.greedy());
  EXPECT_TRUE(Sampler(SamplingParams{}).greedy());
  EXPECT_TRUE(Sampler(SamplingParams{.temperature = 1e-45f}).greedy());  // 1 / T overflows
}

// Penalties as vLLM applies them: the repetition penalty over prompt and generated tokens (a
// positive logit divided, a negative one multiplied), then the frequency (per occurrence) and
// presence (once) penalties over the generated tokens; other tokens untouched.
TEST(SamplerTest, PenaltiesAdjustTheTokensSeen) {
  SamplingParams p;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  p.repetition_penalty = 2.f;
  const std::vector<int32_t> prompt = {1, 3, 3};
  Penalties pen(p, prompt);
  ASSERT_TRUE(pen.active());
  for (int32_t t : {4, 5, 4, 99}) pen.Add(t);  // 99: outside the row, ignored
  EXPECT_EQ(pen.count(4), 2);
  EXPECT_EQ(pen.count(3), 0);
  std::vector<float> row = {1.f, 2.f, -1.f, -3.f, 4.f, 6.f, 7.f};
  pen.Apply(row.data(), static_cast<int64_t>(row.size()));
  EXPECT_EQ(row[0], 1.f);
  EXPECT_EQ(row[1], 1.f);  // prompt: 2 / 2
  EXPECT_EQ(row[2], -1.f);
  EXPECT_EQ(row[3], -6.f);                        // prompt: -3 x 2
  EXPECT_EQ(row[4], 4.f / 2 - 0.25f * 2 - 0.5f);  // generated twice
  EXPECT_EQ(row[5], 6.f / 2 - 0.25f - 0.5f);      // generated once
  EXPECT_EQ(row[6], 7.f);
  EXPECT_FALSE(Penalties(SamplingParams{}, prompt).active());
  SamplingParams bad;
  bad.repetition_penalty = 0.f;
  EXPECT_NE(bad.Validate().message().find("repetition_penalty"), std::string::npos);
  bad = SamplingParams{};
  bad.presence_penalty = 3.f;
  EXPECT_NE(bad.Validate().message().find("presence_penalty"), std::string::npos);
}

// logit_bias adds to its tokens; min_tokens bars the end tokens until that many are generated.
TEST(SamplerTest, LogitBiasAndMinTokens) {
  SamplingParams p;
  p.logit_bias = {{2, 10.f}, {5, -3.f}};
  p.min_tokens = 2;
  const std::vector<int32_t> prompt = {1}, end = {0, 4};
  Penalties pen(p, prompt, end);
  ASSERT_TRUE(pen.active());
  const std::vector<float> row0 = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
  for (int generated = 0; generated < 3; ++generated) {
    std::vector<float> row = row0;
    pen.Apply(row.data(), static_cast<int64_t>(row.size()));
    EXPECT_EQ(row[2], 11.f);
    EXPECT_EQ(row[5], -2.f);
    EXPECT_EQ(row[1], 1.f);
    const bool barred = generated < 2;
    EXPECT_EQ(std::isinf(row[0]) && row[0] < 0, barred) << generated;
    EXPECT_EQ(std::isinf(row[4]) && row[4] < 0, barred) << generated;
    pen.Add(3);
  }
  SamplingParams bad;
  bad.logit_bias = {{3, 101.f}};
  EXPECT_NE(bad.Validate().message().find("logit_bias"), std::string::npos);
}

TEST(SamplerTest, InvalidParametersNameTheField) {
  SamplingParams p;
  p.temperature = -1.f;
  Status s = p.Validate();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.ToString().find("temperature"), std::string::npos) << s.ToString();
  p = SamplingParams{};
  p.top_p = 0.f;
  s = p.Validate();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.ToString().find("top_p"), std::string::npos) << s.ToString();
  p = SamplingParams{};
  p.top_k = -2;
  s = p.Validate();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.ToString().find("top_k"), std::string::npos) << s.ToString();
}

}  // namespace
}  // namespace ef::runtime
