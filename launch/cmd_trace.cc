// `expertflow trace`: runs a model on prompts and records its real routing as a routing trace
// (moe-routing-trace v1, the format of the shared traces' README).
//
//   expertflow trace --model DIR --prompts FILE --out T.jsonl [--max-new-tokens N]
//       [--phase prefill|decode|both] [--batch B]
//
// Prompts: a file ending in .jsonl holds one JSON object per line with a "prompt" string (for
// prompts that span lines, e.g. code); any other file holds one prompt per line (empty lines
// skipped). Prompt i (0-based, in file order, skipped lines not counted) is trace sequence i.
//
// Each prompt is prefilled (positions 0..P-1); with N > 0 it then decodes greedily: every
// generated token is fed back once, so up to N decode steps are traced (positions P..P+N-1), fewer
// when the model emits end-of-sequence (not fed back) or the KV capacity is reached. --phase picks
// which tokens are written; the header's phase is "prefill", "decode" or "mixed". Each token line
// holds the input token id at that position and, per MoE layer, the experts and gate weights in
// the router's order. Prompts run B at a time; a progress line goes to stderr.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "launch/cli_checks.h"
#include "launch/command.h"
#include "launch/engine_options.h"
#include "placement/routing_trace.h"
#include "runtime/engine/engine.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ef::launch {
namespace {

struct TraceOptions {
  ModelFlags model;
  std::string prompts, out, phase = "both";
  int max_new_tokens = 0;
  int batch = 8;
};

StatusOr<std::vector<std::string>> ReadPrompts(const std::string& path) {
  std::ifstream in(path);
  if (!in) return NotFound("cannot open prompts file " + path);
  const bool jsonl = path.size() >= 6 && path.compare(path.size() - 6, 6, ".jsonl") == 0;
  std::vector<std::string> prompts;
  std::string line;
  size_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    if (!jsonl) {
      prompts.push_back(line);
      continue;
    }
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || !j.contains("prompt") || !j["prompt"].is_string())
      return InvalidArgument("prompts file " + path + " line " + std::to_string(line_no) +
                             ": expected a JSON object with a \"prompt\" string");
    prompts.push_back(j["prompt"].get<std::string>());
  }
  if (prompts.empty()) return InvalidArgument("prompts file " + path + " holds no prompt");
  return prompts;
}

int32_t Greedy(const float* logits, int vocab) {
  return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
}

Status RunTrace(const TraceOptions& o) {
  if (o.phase == "decode" && o.max_new_tokens == 0)
    return InvalidArgument("--phase decode records decode steps only; give --max-new-tokens N > 0");
  EF_ASSIGN_OR_RETURN(std::vector<std::string> prompts, ReadPrompts(o.prompts));
  EF_ASSIGN_OR_RETURN(auto tok, runtime::Tokenizer::FromModelDir(o.model.dir));
  EF_ASSIGN_OR_RETURN(auto engine, runtime::Engine::Create(o.model.dir, o.model.ToEngineOptions()));
  const runtime::ModelConfig& c = engine->config();
  const int L = c.num_moe_layers(), K = c.top_k;
  std::vector<std::vector<int32_t>> ids(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    ids[i] = tok.Encode(prompts[i]);
    if (ids[i].empty()) return InvalidArgument("prompt " + std::to_string(i) + " encodes to no tokens");
    if (static_cast<int>(ids[i].size()) > engine->max_seq_len())
      return OutOfRange("prompt " + std::to_string(i) + " has " + std::to_string(ids[i].size()) +
                        " tokens, past the context limit of " + std::to_string(engine->max_seq_len()));
  }

  placement::RoutingTrace trace;
  auto& h = trace.header;
  h.model = std::filesystem::path(o.model.dir).filename().string();
  if (h.model.empty()) h.model = std::filesystem::path(o.model.dir).parent_path().filename().string();
  h.num_layers = L;
  h.num_experts = c.num_experts;
  h.top_k = K;
  h.phase = o.max_new_tokens == 0 || o.phase == "prefill" ? "prefill" : o.phase == "decode" ? "decode" : "mixed";
  h.dataset = std::filesystem::path(o.prompts).filename().string();
  h.source = "expertflow trace";

  // Tokens of the running group by (seq, pos); a token is complete once every MoE layer saw it.
  std::map<std::pair<int64_t, int64_t>, placement::TraceToken> pending;
  engine->AddRoutingObserver([&](runtime::LayerRouting& r) {
    for (int t = 0; t < r.num_tokens; ++t) {
      placement::TraceToken& tt = pending[{r.seq[t], r.pos[t]}];
      if (tt.experts.empty()) {
        tt.seq = r.seq[t];
        tt.pos = r.pos[t];
        tt.token = r.token_ids[t];
        tt.experts.assign(static_cast<size_t>(L) * K, 0);
        tt.weights.assign(static_cast<size_t>(L) * K, 0.f);
      }
      for (int j = 0; j < K; ++j) {
        tt.experts[static_cast<size_t>(r.moe_layer.index) * K + j] = static_cast<int16_t>(r.ids[t * r.top_k + j]);
        tt.weights[static_cast<size_t>(r.moe_layer.index) * K + j] = r.weights[t * r.top_k + j];
      }
    }
    return Status::Ok();
  });

  const bool keep_prefill = o.phase != "decode", keep_decode = o.phase != "prefill";
  const auto start = std::chrono::steady_clock::now();
  size_t traced = 0;
  for (size_t first = 0; first < ids.size(); first += static_cast<size_t>(o.batch)) {
    const size_t last = std::min(ids.size(), first + static_cast<size_t>(o.batch));
    std::vector<runtime::SeqChunk> chunks;
    for (size_t i = first; i < last; ++i) {
      EF_RETURN_IF_ERROR(engine->AddSequence(static_cast<int64_t>(i)));
      chunks.push_back({static_cast<int64_t>(i), ids[i], /*all_logits=*/false});
    }
    runtime::ForwardResult res;
    Status s = engine->Forward(chunks, &res);
    // Greedy decode: each step feeds back the previous step's token, batched over live prompts.
    std::vector<int32_t> next(last - first);
    std::vector<int> steps(last - first, 0);
    while (s.ok()) {
      std::vector<runtime::SeqChunk> step;
      std::vector<size_t> who;
      for (size_t b = 0; b < chunks.size(); ++b) {
        const int64_t seq = chunks[b].seq;
        const size_t i = static_cast<size_t>(seq) - first;
        if (steps[i] >= o.max_new_tokens) continue;
        next[i] = Greedy(res.logits.data() + static_cast<size_t>(res.row_offset[b]) * c.vocab_size, c.vocab_size);
        const bool eos = std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), next[i]) != c.eos_token_ids.end() ||
                         next[i] == c.eos_token_id;
        if (eos || engine->SequenceLength(seq) >= engine->max_seq_len()) {
          steps[i] = o.max_new_tokens;
          continue;
        }
        ++steps[i];
        step.push_back({seq, {&next[i], 1}, false});
      }
      if (step.empty()) break;
      chunks = std::move(step);
      s = engine->Forward(chunks, &res);
    }
    for (size_t i = first; i < last; ++i) engine->RemoveSequence(static_cast<int64_t>(i));
    EF_RETURN_IF_ERROR(s);
    for (auto& [key, t] : pending) {
      const bool prefill = t.pos < static_cast<int64_t>(ids[static_cast<size_t>(t.seq)].size());
      if (prefill ? keep_prefill : keep_decode) trace.tokens.push_back(std::move(t));
    }
    traced += pending.size();
    pending.clear();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr, "\rtrace: %zu/%zu prompts, %zu tokens, %.1f tokens/s", last, ids.size(), traced,
                 secs > 0 ? traced / secs : 0.0);
    std::fflush(stderr);
  }
  std::fprintf(stderr, "\n");
  if (trace.tokens.empty()) return InvalidArgument("no token to write for --phase " + o.phase);
  EF_RETURN_IF_ERROR(placement::WriteRoutingTrace(trace, o.out));
  std::fprintf(stderr, "trace: wrote %zu tokens (%s) of %zu prompts to %s\n", trace.tokens.size(), h.phase.c_str(),
               ids.size(), o.out.c_str());
  return Status::Ok();
}

}  // namespace

Command AddTraceCommand(CLI::App& root) {
  auto o = std::make_shared<TraceOptions>();
  Command c;
  c.app = root.add_subcommand("trace", "Record real routing of a model on prompts as a routing trace (JSONL)");
  o->model.Register(c.app);
  c.app->add_option("--prompts", o->prompts, "prompts: one per line, or JSONL {\"prompt\": ...} when named *.jsonl")
      ->required();
  c.app->add_option("--out,-o", o->out, "output routing trace (moe-routing-trace v1 JSONL)")
      ->required()
      ->check(kOutputFile);
  c.app->add_option("-n,--max-new-tokens", o->max_new_tokens, "greedy decode steps traced after each prompt")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app->add_option("--phase", o->phase, "tokens written: prefill, decode or both")
      ->check(CLI::IsMember({"prefill", "decode", "both"}))
      ->capture_default_str();
  c.app->add_option("--batch", o->batch, "prompts run together")->check(kPositive)->capture_default_str();
  c.run = [o] {
    Status s = RunTrace(*o);
    return s.ok() ? 0 : ReportError(s);
  };
  return c;
}

}  // namespace ef::launch
