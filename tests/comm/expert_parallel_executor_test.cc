// ExpertParallelExecutor in one process (a world of one rank, no launcher): the dispatch, the
// per-expert compute on received rows and the combine give bitwise the logits of the local MoE
// executor on every MoE layer, and the per-layer byte counters stay zero (nothing leaves the rank).
// The multi-rank paths run under mpirun in tests/comm/*.sh.
#include "comm/expert_parallel_executor.h"

#include <gtest/gtest.h>

#include "comm/expert_placement.h"
#include "comm/mpi_context.h"
#include "comm/mpi_exchange.h"
#include "runtime/engine/engine.h"
#include "tests/runtime/prompt_run.h"

namespace ef::comm {
namespace {

std::unique_ptr<runtime::Engine> Engine(const std::string& dir) {
  runtime::EngineOptions o;
  o.backend = "cpu";
  auto e = runtime::Engine::Create(dir, o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return std::move(e).value();
}

class ExpertParallelExecutorTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ExpertParallelExecutorTest, OneRankEqualsTheLocalExecutorBitwise) {
  const std::string dir = GetParam() == "tiny-code-moe" ? std::string(EF_MODELS_DIR) + "/tiny-code-moe"
                                                        : std::string(EF_TEST_DATA) + "/" + GetParam();
  auto engine = Engine(dir);
  const std::vector<int32_t> prompt = {1, 17, 42, 7, 99, 3, 150, 2};
  const auto want = ef::testing::RunPrompt(*engine, prompt, 5);

  auto ctx = MpiContext::Init();
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  ASSERT_EQ((*ctx)->size(), 1);
  const auto& c = engine->config();
  PlacementOptions po;
  auto placement = ExpertPlacement::Create(po, 1, c.num_layers, c.num_experts);
  ASSERT_TRUE(placement.ok()) << placement.status().ToString();
  MpiExchange exchange(*ctx);
  ExpertParallelExecutor executor(*ctx, &exchange, &*placement, engine.get());
  engine->SetMoeExecutor(&executor);
  const auto got = ef::testing::RunPrompt(*engine, prompt, 5);
  engine->SetMoeExecutor(nullptr);

  EXPECT_EQ(got.tokens, want.tokens);
  ASSERT_EQ(got.logits.size(), want.logits.size());
  for (size_t i = 0; i < want.logits.size(); ++i) ASSERT_EQ(got.logits[i], want.logits[i]) << "logit " << i;
  EXPECT_GT(executor.steps(), 0);
  EXPECT_GT(executor.rows_computed(), 0);
  EXPECT_EQ(executor.rows_dispatched(), 0);  // every row stays on the only rank
  for (int l = 0; l < executor.num_layers(); ++l) EXPECT_EQ(executor.layer_bytes_sent(l), 0) << "layer " << l;
}

INSTANTIATE_TEST_SUITE_P(Families, ExpertParallelExecutorTest,
                         ::testing::Values("mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss", "tiny-code-moe"));

}  // namespace
}  // namespace ef::comm
