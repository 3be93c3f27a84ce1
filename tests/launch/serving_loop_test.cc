// ServingLoop admission regrouping: with a queue, the admitted batches activate fewer forecast
// experts than FIFO would, every request still completes with the text it gets under FIFO, and
// no request is overtaken by younger ones in more admission rounds than the starvation bound.
#include "launch/server/serving_loop.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"

namespace ef::launch {
namespace {

const std::string kModelDir = std::string(EF_MODELS_DIR) + "/tiny-code-moe";

// Takes a stream's updates until it is done (its text appended to *text, prompt logprobs to
// *prompt_logprobs when given); a stream not done within 60 s fails the test instead of hanging.
StreamUpdate Drain(RequestStream& stream, std::string* text, std::vector<TokenLogprob>* prompt_logprobs = nullptr,
                   StreamUpdate u = {}) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!u.done) {
    if (std::chrono::steady_clock::now() > deadline) {
      ADD_FAILURE() << "a request did not finish within 60 s";
      return u;
    }
    u = stream.Take(std::chrono::milliseconds(200));
    *text += u.text;
    if (prompt_logprobs)
      prompt_logprobs->insert(prompt_logprobs->end(), u.prompt_logprobs.begin(), u.prompt_logprobs.end());
  }
  return u;
}

// Forecast used by the tests: 4 "layers" x 8 "experts"; a prompt activates expert
// (first token + layer) % 8 at each layer, so prompts sharing a first token share all bits.
void FirstTokenForecast(const ServeRequest& r, uint64_t* row) {
  for (int l = 0; l < 4; ++l) {
    const int bit = l * 8 + (r.prompt[0] + l) % 8;
    row[bit / 64] |= uint64_t{1} << (bit % 64);
  }
}

struct Outcome {
  std::map<int, std::string> text;  // by request index
  AdmissionStats admission;
};

// Runs `prompts` through a loop of batch 2: the first two arrive together, generate 3 x `gen`
// tokens and fill the batch; once both run, all others arrive at once (so they queue behind them,
// the same queue every time), each generating `gen` greedy tokens.
Outcome Serve(const std::vector<std::vector<int32_t>>& prompts, int gen, int window, int max_wait) {
  auto engine = runtime::Engine::Create(kModelDir, runtime::EngineOptions{});
  EXPECT_TRUE(engine.ok()) << engine.status().ToString();
  auto tok = runtime::Tokenizer::FromModelDir(kModelDir);
  EXPECT_TRUE(tok.ok());
  ServerMetrics metrics((*engine)->config().num_layers, (*engine)->config().num_experts);
  ServingLoopOptions lo;
  lo.max_batch = 2;
  lo.regroup_window = window;
  lo.max_wait_steps = max_wait;
  lo.forecast = FirstTokenForecast;
  lo.forecast_layers = 4;
  lo.forecast_experts = 8;
  ServingLoop loop(engine->get(), std::move(tok).value(), &metrics, lo);
  const auto requests = [&](size_t begin, size_t end) {
    std::vector<ServeRequest> rs;
    for (size_t i = begin; i < end; ++i) {
      ServeRequest r;
      r.prompt = prompts[i];
      r.max_new_tokens = i < 2 ? 3 * gen : gen;
      r.ignore_eos = true;
      rs.push_back(std::move(r));
    }
    return rs;
  };
  // The two long requests arrive together, so they run in lockstep and free the batch together.
  auto first = loop.SubmitAll(requests(0, 2));
  EXPECT_TRUE(first.ok()) << first.status().ToString();
  std::vector<std::shared_ptr<RequestStream>> streams = *first;
  std::vector<std::string> texts(prompts.size());
  for (size_t j = 0; j < 2; ++j) {  // both hold the batch once they have their first token
    StreamUpdate u;
    do {
      u = streams[j]->Take(std::chrono::milliseconds(1000));
      texts[j] += u.text;
    } while (u.num_tokens < 1 && !u.done);
  }
  auto rest = loop.SubmitAll(requests(2, prompts.size()));
  EXPECT_TRUE(rest.ok()) << rest.status().ToString();
  streams.insert(streams.end(), rest->begin(), rest->end());
  Outcome out;
  for (size_t i = 0; i < streams.size(); ++i) {
    StreamUpdate u;
    std::string text = texts[i];
    do {
      u = streams[i]->Take(std::chrono::milliseconds(1000));
      text += u.text;
    } while (!u.done);
    EXPECT_TRUE(u.error.ok()) << u.error.ToString();
    EXPECT_EQ(u.num_tokens, i < 2 ? 3 * gen : gen) << "request " << i;
    out.text[static_cast<int>(i)] = text;
  }
  loop.Stop();
  out.admission = loop.admission_stats();
  return out;
}

// Prompts alternate between two first tokens, so FIFO pairs always mix them while regrouping can
// pair equal ones.
std::vector<std::vector<int32_t>> AlternatingPrompts(int n) {
  std::vector<std::vector<int32_t>> p;
  for (int i = 0; i < n; ++i) p.push_back({i % 2 == 0 ? 100 : 203, 17 + i, 40, 41});
  return p;
}

TEST(ServingLoopRegroupTest, FewerExpertsPerAdmittedBatchSameOutputs) {
  const auto prompts = AlternatingPrompts(13);
  const Outcome fifo = Serve(prompts, 4, /*window=*/0, 16);
  const Outcome regrouped = Serve(prompts, 4, /*window=*/4, 16);
  EXPECT_EQ(fifo.admission.rounds, 0);  // FIFO does not count rounds
  ASSERT_GT(regrouped.admission.rounds, 0) << "no queue formed";
  EXPECT_LT(regrouped.admission.regrouped_distinct, regrouped.admission.fcfs_distinct);
  for (const auto& [i, text] : fifo.text) {
    EXPECT_FALSE(text.empty()) << "request " << i;
    EXPECT_EQ(regrouped.text.at(i), text) << "request " << i << " changed with admission order";
  }
}

TEST(ServingLoopRegroupTest, StarvationBoundHolds) {
  // Queue: X0..X4, odd, Y0..Y4 where Xi and Yi share their forecast and the odd one shares
  // nothing. Each round admits the oldest Xi (FCFS seeding) with its twin Yi, younger than the odd
  // one, which is overtaken round after round unless the bound steps in.
  std::vector<std::vector<int32_t>> prompts = {{300, 1}, {301, 1}};
  for (int i = 0; i < 5; ++i) prompts.push_back({100 + i, 5, 6, 7});
  prompts.push_back({106, 5, 6, 7});
  for (int i = 0; i < 5; ++i) prompts.push_back({100 + i, 8, 9});
  // Without an effective bound the odd one is overtaken several times...
  const Outcome loose = Serve(prompts, 3, /*window=*/8, /*max_wait=*/1000);
  EXPECT_GT(loose.admission.max_overtaken, 2);
  // ...with one, never more than the bound.
  for (int bound : {1, 2}) {
    const Outcome o = Serve(prompts, 3, /*window=*/8, bound);
    ASSERT_GT(o.admission.rounds, 0);
    EXPECT_LE(o.admission.max_overtaken, bound) << "bound " << bound;
    EXPECT_GT(o.admission.forced, 0) << "bound " << bound;
    EXPECT_EQ(o.text.size(), prompts.size());
  }
}

TEST(ServingLoopTest, SubmitAllQueuesAllOrNone) {
  auto engine = runtime::Engine::Create(kModelDir, runtime::EngineOptions{});
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  auto tok = runtime::Tokenizer::FromModelDir(kModelDir);
  ASSERT_TRUE(tok.ok());
  ServerMetrics metrics((*engine)->config().num_layers, (*engine)->config().num_experts);
  ServingLoop loop(engine->get(), std::move(tok).value(), &metrics, ServingLoopOptions{});
  std::vector<ServeRequest> rs(3);
  for (auto& r : rs) {
    r.prompt = {100, 17};
    r.max_new_tokens = 2;
  }
  rs[2].prompt.clear();
  auto bad = loop.SubmitAll(rs);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("request 2: the prompt is empty"), std::string::npos)
      << bad.status().ToString();
  rs[2].prompt = {203, 18};
  auto good = loop.SubmitAll(rs);
  ASSERT_TRUE(good.ok()) << good.status().ToString();
  ASSERT_EQ(good->size(), 3u);
  for (auto& s : *good) {
    StreamUpdate u;
    do u = s->Take(std::chrono::milliseconds(1000));
    while (!u.done);
    EXPECT_TRUE(u.error.ok()) << u.error.ToString();
    EXPECT_EQ(u.num_tokens, 2);
  }
  loop.Stop();
  // Only the three accepted requests ran: the refused batch queued nothing.
  EXPECT_NE(metrics.Render().find("expertflow_request_latency_seconds_count 3\n"), std::string::npos)
      << metrics.Render();
}

// Submits `rs` at once and appends each one's text to *texts; every one must finish with
// `num_tokens` tokens and no error.
void SubmitAndDrain(ServingLoop& loop, const std::vector<ServeRequest>& rs, int num_tokens,
                    std::vector<std::string>* texts) {
  auto streams = loop.SubmitAll(rs);
  ASSERT_TRUE(streams.ok()) << streams.status().ToString();
  for (auto& st : *streams) {
    std::string text;
    const StreamUpdate u = Drain(*st, &text);
    EXPECT_TRUE(u.error.ok()) << u.error.ToString();
    EXPECT_EQ(u.num_tokens, num_tokens);
    texts->push_back(text);
  }
}

// A paged KV cache of fixed size (4 blocks of 16 tokens): five requests of 6 + 20 tokens are
// admitted while their prompts fit, run out of blocks as they grow, preempt the youngest (which
// is prefilled again with what it generated and goes on), and every one finishes with exactly
// the text an unbounded cache gives it; a request that could never fit is refused at Submit
// with the key to change.
TEST(ServingLoopTest, FixedKvCachePreemptsAndFinishesEverything) {
  auto run = [](int64_t kv_tokens, std::vector<std::string>* texts, bool sampled) {
    runtime::EngineOptions eo;
    eo.kv_block_size = 16;
    eo.kv_cache_tokens = kv_tokens;
    auto engine = runtime::Engine::Create(kModelDir, eo);
    ASSERT_TRUE(engine.ok()) << engine.status().ToString();
    auto tok = runtime::Tokenizer::FromModelDir(kModelDir);
    ASSERT_TRUE(tok.ok());
    ServerMetrics metrics((*engine)->config().num_layers, (*engine)->config().num_experts);
    ServingLoopOptions lo;
    lo.max_batch = 8;
    // Sampled, prompts are prefilled in chunks of 4: a request can be preempted in the step of its
    // last chunk, before its first token (its draw is then the old sampler's: not used again).
    if (sampled) lo.max_prefill_tokens = 4;
    ServingLoop loop(engine->get(), std::move(tok).value(), &metrics, lo);
    std::vector<ServeRequest> rs(5);
    for (size_t i = 0; i < rs.size(); ++i) {
      rs[i].prompt = {100, static_cast<int32_t>(17 + i), 40, 41, 42, 43};
      rs[i].max_new_tokens = 20;  // 26 tokens: 2 blocks of 16
      rs[i].ignore_eos = true;
      // Sampled: a failed step keeps each request's draw, so the tokens are the seed's.
      if (sampled) rs[i].sampling = {.temperature = 0.9f, .top_k = 0, .top_p = 0.95f, .seed = 100 + i};
    }
    SubmitAndDrain(loop, rs, 20, texts);
    if (kv_tokens > 0) {
      EXPECT_GT(metrics.preemptions(), 0) << "the cache never ran out: the test tests nothing";
    }
    if (kv_tokens > 0 && !sampled) {
      EXPECT_NE(metrics.Render().find("expertflow_preemptions_total"), std::string::npos);
      EXPECT_NE(metrics.Render().find("expertflow_cuda_graph_replays_total 0"), std::string::npos)
          << "the cpu backend records no graphs";
      EXPECT_NE(metrics.Render().find("expertflow_kv_cache_allocated_tokens 64\n"), std::string::npos)
          << metrics.Render();
      ServeRequest big;
      big.prompt = {100, 17, 40};
      big.max_new_tokens = 70;  // 73 tokens: 5 blocks, the cache holds 4
      auto refused = loop.Submit(big);
      ASSERT_FALSE(refused.ok());
      EXPECT_NE(refused.status().message().find("runtime.kv_cache_tokens"), std::string::npos)
          << refused.status().ToString();
      // A prompt as long as the cache, scored only: its prefill needs a row more than the cache.
      ServeRequest whole_cache;
      whole_cache.prompt.assign(64, 40);
      whole_cache.max_new_tokens = 0;
      whole_cache.prompt_logprobs = true;
      EXPECT_FALSE(loop.Submit(whole_cache).ok());
      // One that fits alone still runs after all that.
      ServeRequest last;
      last.prompt = {100, 17, 40};
      last.max_new_tokens = 40;
      last.ignore_eos = true;
      auto ok = loop.Submit(last);
      ASSERT_TRUE(ok.ok()) << ok.status().ToString();
      std::string text;
      EXPECT_EQ(Drain(**ok, &text).num_tokens, 40);
    }
    loop.Stop();
  };
  for (bool sampled : {false, true}) {
    std::vector<std::string> bounded, unbounded;
    run(64, &bounded, sampled);  // 4 blocks
    run(0, &unbounded, sampled);
    EXPECT_EQ(bounded, unbounded) << (sampled ? "sampled" : "greedy");
  }
}

// Activation buffers that do not fit (a CPU backend whose memory budget holds one 40-token
// prefill's buffers): the step is retried with its prompts prefilled in smaller pieces instead of
// failing the loop, and every request gets the text an unlimited backend gives it. Two arrivals:
// four 40-token prompts at once, and a 150-token prompt arriving while a request decodes (which
// must not be preempted for it).
TEST(ServingLoopTest, ActivationBuffersThatDoNotFitArePrefilledInPieces) {
  auto run = [](bool limited, bool late_long_prompt, std::vector<std::string>* texts) {
    runtime::EngineOptions eo;
    eo.kv_block_size = 16;
    eo.kv_cache_tokens = 1024;  // allocated now: the budget below leaves it alone
    auto engine = runtime::Engine::Create(kModelDir, eo);
    ASSERT_TRUE(engine.ok()) << engine.status().ToString();
    std::vector<int32_t> prompt(40);
    for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>(100 + 7 * i);
    if (limited) {
      // What one 40-token prefill's buffers take, plus a little.
      runtime::Engine& e = **engine;
      ASSERT_TRUE(e.AddSequence(99).ok());
      runtime::ForwardResult r;
      ASSERT_TRUE(e.Forward(std::vector<runtime::SeqChunk>{{99, prompt, false}}, &r).ok());
      e.RemoveSequence(99);
      auto& cpu = dynamic_cast<runtime::CpuBackend&>(e.backend());
      cpu.set_memory_budget(cpu.bytes_in_use() + 4096);
    }
    auto tok = runtime::Tokenizer::FromModelDir(kModelDir);
    ASSERT_TRUE(tok.ok());
    ServerMetrics metrics((*engine)->config().num_layers, (*engine)->config().num_experts);
    ServingLoopOptions lo;
    lo.max_batch = 8;
    ServingLoop loop(engine->get(), std::move(tok).value(), &metrics, lo);
    if (!late_long_prompt) {
      std::vector<ServeRequest> rs(4);
      for (size_t i = 0; i < rs.size(); ++i) {
        rs[i].prompt = prompt;
        rs[i].prompt[1] = static_cast<int32_t>(17 + i);
        rs[i].max_new_tokens = 12;
        rs[i].ignore_eos = true;
      }
      SubmitAndDrain(loop, rs, 12, texts);
    } else {
      ServeRequest a;
      a.prompt.assign(prompt.begin(), prompt.begin() + 30);
      a.max_new_tokens = 24;
      a.ignore_eos = true;
      auto sa = loop.Submit(a);
      ASSERT_TRUE(sa.ok()) << sa.status().ToString();
      std::string text_a;
      StreamUpdate u;
      while (u.num_tokens < 4 && !u.done) {  // A is decoding
        u = (*sa)->Take(std::chrono::milliseconds(200));
        text_a += u.text;
      }
      ServeRequest b;
      for (int i = 0; i < 150; ++i) b.prompt.push_back(static_cast<int32_t>(200 + (13 * i) % 3000));
      b.max_new_tokens = 8;
      b.ignore_eos = true;
      auto sb = loop.Submit(b);
      ASSERT_TRUE(sb.ok()) << sb.status().ToString();
      u = Drain(**sa, &text_a, nullptr, u);
      EXPECT_TRUE(u.error.ok()) << u.error.ToString();
      EXPECT_EQ(u.num_tokens, 24);
      std::string text_b;
      const StreamUpdate ub = Drain(**sb, &text_b);
      EXPECT_TRUE(ub.error.ok()) << ub.error.ToString();
      EXPECT_EQ(ub.num_tokens, 8);
      texts->push_back(text_a);
      texts->push_back(text_b);
      if (limited) {
        EXPECT_EQ(metrics.preemptions(), 0) << "the decoding request was preempted for the prompt";
      }
    }
    EXPECT_TRUE(loop.fatal_error().ok()) << loop.fatal_error().ToString();
    if (limited) {
      EXPECT_GT(loop.prefill_token_cap(), 0) << "the buffers always fit: the test tests nothing";
    }
    loop.Stop();
  };
  for (bool late : {false, true}) {
    std::vector<std::string> limited, unlimited;
    run(true, late, &limited);
    run(false, late, &unlimited);
    EXPECT_EQ(limited, unlimited) << (late ? "a long prompt while decoding" : "four prompts at once");
  }
}

// Chunked prefill: with at most 16 (or 7) prompt tokens prefilled per step, a 40-token prompt
// takes several steps while a running request keeps decoding; every request gets the text and the
// prompt logprobs it gets with whole prefills.
TEST(ServingLoopTest, ChunkedPrefillGivesTheSameTextAndPromptLogprobs) {
  struct Got {
    std::vector<std::string> text;
    std::vector<TokenLogprob> prompt_logprobs;
    int max_rows = 0;  // the largest forward pass, in token rows
  };
  auto run = [](int max_prefill_tokens, Got* got) {
    auto engine = runtime::Engine::Create(kModelDir, runtime::EngineOptions{});
    ASSERT_TRUE(engine.ok()) << engine.status().ToString();
    auto tok = runtime::Tokenizer::FromModelDir(kModelDir);
    ASSERT_TRUE(tok.ok());
    ServerMetrics metrics((*engine)->config().num_layers, (*engine)->config().num_experts);
    (*engine)->AddRoutingObserver([got](runtime::LayerRouting& r) {
      got->max_rows = std::max(got->max_rows, r.num_tokens);
      return Status::Ok();
    });
    ServingLoopOptions lo;
    lo.max_prefill_tokens = max_prefill_tokens;
    ServingLoop loop(engine->get(), std::move(tok).value(), &metrics, lo);
    std::vector<ServeRequest> rs(3);
    rs[0].prompt = {100, 17, 40};
    rs[0].max_new_tokens = 24;
    for (int i = 0; i < 40; ++i) rs[1].prompt.push_back((i * 37 + 11) % 500 + 1);
    rs[1].max_new_tokens = 8;
    rs[1].prompt_logprobs = true;
    rs[1].logprobs = 2;
    rs[2].prompt = std::vector<int32_t>(rs[1].prompt.begin(), rs[1].prompt.begin() + 23);
    rs[2].max_new_tokens = 8;
    for (auto& r : rs) r.ignore_eos = true;
    auto first = loop.Submit(rs[0]);  // decoding while the long prompts are chunked
    ASSERT_TRUE(first.ok());
    StreamUpdate u0 = (*first)->Take(std::chrono::milliseconds(2000));
    std::vector<std::shared_ptr<RequestStream>> streams = {*first};
    std::string text0 = u0.text;
    auto rest = loop.SubmitAll({rs[1], rs[2]});
    ASSERT_TRUE(rest.ok()) << rest.status().ToString();
    streams.insert(streams.end(), rest->begin(), rest->end());
    for (size_t i = 0; i < streams.size(); ++i) {
      std::string text = i == 0 ? text0 : "";
      const StreamUpdate u =
          Drain(*streams[i], &text, i == 1 ? &got->prompt_logprobs : nullptr, i == 0 ? u0 : StreamUpdate{});
      EXPECT_TRUE(u.error.ok()) << u.error.ToString();
      EXPECT_EQ(u.num_tokens, rs[i].max_new_tokens) << "request " << i;
      got->text.push_back(text);
    }
    loop.Stop();
  };
  Got whole, chunked16, chunked7;
  run(0, &whole);
  run(16, &chunked16);
  run(7, &chunked7);
  EXPECT_GE(whole.max_rows, 40);
  EXPECT_LE(chunked16.max_rows, 16 + 3);  // the prefill budget + a decode row per running request
  EXPECT_LE(chunked7.max_rows, 7 + 3);
  for (const Got* g : {&chunked16, &chunked7}) {
    EXPECT_EQ(g->text, whole.text);
    ASSERT_EQ(g->prompt_logprobs.size(), 40u);
    ASSERT_EQ(whole.prompt_logprobs.size(), 40u);
    EXPECT_FALSE(g->prompt_logprobs[0].logprob.has_value());
    for (size_t i = 1; i < 40; ++i) {
      ASSERT_TRUE(g->prompt_logprobs[i].logprob.has_value()) << i;
      EXPECT_EQ(g->prompt_logprobs[i].token, whole.prompt_logprobs[i].token);
      EXPECT_NEAR(*g->prompt_logprobs[i].logprob, *whole.prompt_logprobs[i].logprob, 1e-3) << "prompt token " << i;
    }
  }
}

}  // namespace
}  // namespace ef::launch
