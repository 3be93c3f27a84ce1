// A serving-like run through an engine's KV cache, for comparing KV layouts: sequences of
// different lengths prefilled in chunks (some of 16+ rows, so the CUDA backend's tensor-core
// prefill runs), decoded together in batches, one removed mid-run and a new one taking its
// place (a paged cache hands it the freed blocks). Returns every logit the engine produced.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "runtime/engine/engine.h"

namespace ef::runtime::testing {

inline std::vector<float> PagedKvWorkload(Engine& e) {
  const int V = e.config().vocab_size;
  auto tokens = [V](int seed, int n) {
    std::vector<int32_t> t(n);
    for (int i = 0; i < n; ++i) t[i] = (seed * 131 + i * 37 + 1) % V;
    return t;
  };
  std::vector<float> all;
  auto run = [&](std::vector<SeqChunk> chunks) {
    ForwardResult r;
    const Status s = e.Forward(chunks, &r);
    EXPECT_TRUE(s.ok()) << s.ToString();
    all.insert(all.end(), r.logits.begin(), r.logits.end());
  };
  const std::vector<int32_t> a = tokens(1, 37), b = tokens(2, 21), c = tokens(3, 18), d = tokens(4, 3);
  for (int64_t id : {1, 2, 3, 4}) EXPECT_TRUE(e.AddSequence(id).ok());
  // a: 20 rows then 17 (both past the tensor-core threshold), b: 5 + 16 in one batch with a's second.
  run({{1, std::span<const int32_t>(a).subspan(0, 20), true}});
  run({{1, std::span<const int32_t>(a).subspan(20), true}, {2, std::span<const int32_t>(b).subspan(0, 5), true}});
  run({{2, std::span<const int32_t>(b).subspan(5), true}, {4, d, true}});
  // Decode steps of three sequences together.
  for (int step = 0; step < 6; ++step) {
    const int32_t ta = (7 * step + 3) % V, tb = (11 * step + 5) % V, td = (13 * step + 2) % V;
    run({{1, {&ta, 1}, false}, {2, {&tb, 1}, false}, {4, {&td, 1}, false}});
  }
  // a leaves; c arrives and prefills beside a decode of b and d.
  e.RemoveSequence(1);
  const int32_t tb = 9 % V, td = 4 % V;
  run({{3, c, true}, {2, {&tb, 1}, false}, {4, {&td, 1}, false}});
  for (int step = 0; step < 4; ++step) {
    const int32_t tc = (5 * step + 1) % V, t2 = (3 * step + 8) % V;
    run({{2, {&t2, 1}, false}, {3, {&tc, 1}, false}});
  }
  for (int64_t id : {2, 3, 4}) e.RemoveSequence(id);
  return all;
}

// Greedy decode of num_seqs sequences (prompts of 5 to 27 tokens) stepping together; every fifth
// step the oldest leaves and a new one is prefilled alone, then joins: the batch size changes and
// contexts cross attention's split boundaries, as in serving. Returns every logit; with
// token_only, the chunks ask for the backend's token (SeqChunk::token_only) and the tokens it
// chose are returned instead (as floats). With `sampling`, tokens are drawn with it instead of
// the arg max (on the backend with token_only, else by runtime::SampleRow from the logits), the
// uniform a fixed function of the sequence and the step, and only the tokens are returned.
inline std::vector<float> DecodeWorkload(Engine& e, int num_seqs, int steps, bool token_only = false,
                                         const RowSampling* sampling = nullptr) {
  const int V = e.config().vocab_size;
  struct Live {
    int64_t id;
    int32_t next;
  };
  std::vector<Live> live;
  std::vector<float> all;
  int64_t next_id = 100;
  auto argmax = [V](const float* row) { return static_cast<int32_t>(std::max_element(row, row + V) - row); };
  auto draw = [&](int64_t id, int step) {
    RowSampling s = *sampling;
    s.uniform = std::fmod(static_cast<double>(id) * 0.6180339887498949 + (step + 2) * 0.3183098861837907, 1.0);
    return s;
  };
  // The token picked for row i of r (sequence id, step; -1 for a prefill).
  auto pick = [&](const ForwardResult& r, size_t i, int64_t id, int step) {
    int32_t t;
    if (token_only) {
      t = r.tokens.at(i);
    } else {
      const float* row = r.logits.data() + i * static_cast<size_t>(V);
      t = sampling ? SampleRow(row, V, draw(id, step)) : argmax(row);
      if (!sampling) all.insert(all.end(), row, row + V);
    }
    if (token_only || sampling) all.push_back(static_cast<float>(t));
    return t;
  };
  auto chunk_of = [&](int64_t id, std::span<const int32_t> tokens, int step) {
    SeqChunk c{id, tokens, false, token_only};
    if (token_only && sampling) c.sampling = draw(id, step);
    return c;
  };
  auto add = [&](int len) {
    const int64_t id = next_id++;
    EXPECT_TRUE(e.AddSequence(id).ok());
    std::vector<int32_t> prompt(len);
    for (int i = 0; i < len; ++i) prompt[i] = static_cast<int32_t>((id * 131 + i * 37 + 1) % V);
    ForwardResult r;
    const Status s = e.Forward(std::vector<SeqChunk>{chunk_of(id, prompt, -1)}, &r);
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (!s.ok()) return;
    live.push_back({id, pick(r, 0, id, -1)});
  };
  for (int i = 0; i < num_seqs; ++i) add(5 + (7 * i) % 23);
  for (int step = 0; step < steps; ++step) {
    if (step % 5 == 4 && !live.empty()) {
      e.RemoveSequence(live.front().id);
      live.erase(live.begin());
      add(3 + step % 11);
    }
    std::vector<SeqChunk> chunks;
    for (const Live& l : live) chunks.push_back(chunk_of(l.id, std::span<const int32_t>(&l.next, 1), step));
    ForwardResult r;
    const Status s = e.Forward(chunks, &r);
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (!s.ok()) break;
    for (size_t i = 0; i < live.size(); ++i) live[i].next = pick(r, i, live[i].id, step);
  }
  for (const Live& l : live) e.RemoveSequence(l.id);
  return all;
}

// Bitwise equality of two logit vectors (the first differing index on failure).
inline void ExpectBitwiseEqual(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t diffs = 0, first = got.size();
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i] && !(got[i] != got[i] && want[i] != want[i])) first = diffs++ ? first : i;
  EXPECT_EQ(diffs, 0u) << what << ": first difference at logit " << first << " (" << got[first] << " vs " << want[first]
                       << ")";
}

}  // namespace ef::runtime::testing
