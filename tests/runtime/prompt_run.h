// Shared by the expert-cache tests: what a model gives for one prompt on one engine, so runs with
// different budgets, policies or backends can be compared value for value.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "runtime/engine/engine.h"
#include "runtime/engine/generator.h"

namespace ef::testing {

struct PromptRun {
  std::vector<float> logits;    // score: every position of the prompt (sequence 1)
  std::vector<int32_t> tokens;  // generate: greedy continuation, EOS ignored
};

inline PromptRun RunPrompt(runtime::Engine& engine, const std::vector<int32_t>& prompt, int max_new_tokens) {
  PromptRun out;
  EXPECT_TRUE(engine.AddSequence(1).ok());
  runtime::SeqChunk chunk{1, prompt, /*all_logits=*/true};
  runtime::ForwardResult r;
  Status st = engine.Forward({&chunk, 1}, &r);
  EXPECT_TRUE(st.ok()) << st.ToString();
  engine.RemoveSequence(1);
  out.logits = r.logits;
  runtime::GenerateRequest g;
  g.prompt = prompt;
  g.max_new_tokens = max_new_tokens;
  g.ignore_eos = true;
  auto res = runtime::Generate(engine, {g});
  EXPECT_TRUE(res.ok()) << res.status().ToString();
  if (res.ok()) out.tokens = (*res)[0].tokens;
  return out;
}

}  // namespace ef::testing
