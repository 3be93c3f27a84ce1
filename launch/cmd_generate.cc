// `expertflow generate`: tokenizes a prompt, generates, streams the text as it comes.
#include <cstdio>

#include "launch/command.h"
#include "launch/engine_options.h"
#include "runtime/engine/generator.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ef::launch {
namespace {

struct GenerateOptions {
  ModelFlags model;
  std::string prompt = "def main(";
  int max_new_tokens = 64;
  runtime::SamplingParams sampling;
  bool ignore_eos = false;
  bool show_ids = false;
};

Status RunGenerate(const GenerateOptions& o) {
  EF_ASSIGN_OR_RETURN(auto tok, runtime::Tokenizer::FromModelDir(o.model.dir));
  EF_ASSIGN_OR_RETURN(auto engine, runtime::Engine::Create(o.model.dir, o.model.ToEngineOptions()));
  runtime::GenerateRequest req;
  req.prompt = tok.Encode(o.prompt);
  if (req.prompt.empty()) return InvalidArgument("the prompt encodes to no tokens");
  req.max_new_tokens = o.max_new_tokens;
  req.sampling = o.sampling;
  req.ignore_eos = o.ignore_eos;
  std::fputs(o.prompt.c_str(), stdout);
  std::fflush(stdout);
  runtime::StreamDecoder dec(tok, /*skip_special=*/true);
  EF_ASSIGN_OR_RETURN(auto results, runtime::Generate(*engine, {req}, [&](size_t, int32_t t) {
                        std::fputs(dec.Push(t).c_str(), stdout);
                        std::fflush(stdout);
                        return true;
                      }));
  std::fputs(dec.Flush().c_str(), stdout);
  std::fputs("\n", stdout);
  if (o.show_ids) {
    std::fprintf(stderr, "prompt ids:");
    for (int32_t t : req.prompt) std::fprintf(stderr, " %d", t);
    std::fprintf(stderr, "\nnew ids:");
    for (int32_t t : results[0].tokens) std::fprintf(stderr, " %d", t);
    std::fprintf(stderr, "\nfinish: %s\n", runtime::FinishReasonName(results[0].finish));
  }
  return Status::Ok();
}

}  // namespace

Command AddGenerateCommand(CLI::App& root) {
  auto o = std::make_shared<GenerateOptions>();
  Command c;
  c.app = root.add_subcommand("generate", "Generate text from a prompt, streaming tokens as they come");
  o->model.Register(c.app);
  c.app->add_option("--prompt,-p", o->prompt, "prompt text")->capture_default_str();
  c.app->add_option("-n,--max-new-tokens", o->max_new_tokens, "tokens to generate")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  c.app->add_option("--temperature,-t", o->sampling.temperature, "sampling temperature (0: greedy)")
      ->capture_default_str();
  c.app->add_option("--top-k", o->sampling.top_k, "sample among the k most likely tokens (0: all)");
  c.app->add_option("--top-p", o->sampling.top_p, "nucleus sampling threshold in (0, 1]");
  c.app->add_option("--seed", o->sampling.seed, "random seed for sampling")->capture_default_str();
  c.app->add_flag("--ignore-eos", o->ignore_eos, "keep generating past end-of-sequence tokens");
  c.app->add_flag("--show-ids", o->show_ids, "print prompt and generated token ids to stderr");
  c.run = [o] {
    Status s = RunGenerate(*o);
    return s.ok() ? 0 : ReportError(s);
  };
  return c;
}

}  // namespace ef::launch
