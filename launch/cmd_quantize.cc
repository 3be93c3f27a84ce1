// `expertflow quantize`: quantizes a model's routed experts with GPTQ over calibration text, into a
// file the expert cache loads instead of rounding to nearest (cache.quantized_experts,
// --quantized-experts; format in cache/quantized_experts.h).
//
//   expertflow quantize --model DIR --calibration FILE... --precision int8 --out EXPERTS.safetensors
//
// Each calibration file is read whole and tokenized; its tokens are cut into sequences of
// --seq-len and run through the model (prefill, --max-tokens in all), while every MoE layer's
// routing and router inputs gather each expert's input statistics (cache/expert_calibration.h).
// Then each expert's matrices are quantized to minimise the error of their outputs on those inputs.
// Calibrate on text like what the model will serve, and not on text it will be evaluated on.
#include <cstdio>
#include <fstream>
#include <sstream>

#include "cache/expert_calibration.h"
#include "launch/command.h"
#include "launch/engine_options.h"
#include "runtime/core/progress.h"
#include "runtime/engine/engine.h"
#include "runtime/tokenizer/tokenizer.h"

namespace ef::launch {
namespace {

struct QuantizeOptions {
  ModelFlags model;
  std::vector<std::string> calibration;
  std::string precision = "int8";
  std::string out;
  int seq_len = 256;
  int64_t max_tokens = 65536;
  int64_t min_tokens = 0;
  int hold_out_every = 8;
  double damp = 0.01;
  double max_hessian_gib = 16;
};

constexpr double kGiB = 1024.0 * 1024 * 1024;

Status RunQuantize(const QuantizeOptions& o) {
  const DType dtype = o.precision == "int4" ? DType::kQ4 : DType::kQ8;
  EF_ASSIGN_OR_RETURN(auto tok, runtime::Tokenizer::FromModelDir(o.model.dir));
  std::vector<int32_t> ids;
  for (const std::string& path : o.calibration) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return NotFound("cannot open calibration file " + path);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::vector<int32_t> t = tok.Encode(ss.str());
    ids.insert(ids.end(), t.begin(), t.end());
    if (static_cast<int64_t>(ids.size()) >= o.max_tokens) break;
  }
  if (static_cast<int64_t>(ids.size()) > o.max_tokens) ids.resize(static_cast<size_t>(o.max_tokens));
  if (ids.size() < static_cast<size_t>(o.seq_len))
    return InvalidArgument("the calibration files hold " + std::to_string(ids.size()) +
                           " tokens, fewer than one sequence of --seq-len " + std::to_string(o.seq_len));
  runtime::EngineOptions eo = o.model.ToEngineOptions();
  if (eo.max_seq_len == 0 || eo.max_seq_len < o.seq_len) eo.max_seq_len = o.seq_len;
  EF_ASSIGN_OR_RETURN(auto engine, runtime::Engine::Create(o.model.dir, eo));
  const runtime::ModelConfig& c = engine->config();
  if (c.max_position_embeddings > 0 && o.seq_len > c.max_position_embeddings)
    return InvalidArgument("--seq-len " + std::to_string(o.seq_len) + " is past the model's max_position_embeddings (" +
                           std::to_string(c.max_position_embeddings) +
                           "): calibration inputs must be positions the model was made for");
  const int64_t seqs = static_cast<int64_t>(ids.size()) / o.seq_len;
  // Every Nth sequence is held out (when there are N or more): the output error on inputs GPTQ did
  // not see is the number that says what it buys.
  const int every = o.hold_out_every;
  const bool hold_out = every > 0 && seqs >= every;
  const size_t hessian_bytes = cache::ExpertCalibration::HessianBytes(c) * (hold_out ? 2 : 1);
  if (static_cast<double>(hessian_bytes) > o.max_hessian_gib * kGiB)
    return InvalidArgument("calibrating this model's " + std::to_string(c.MoeLayers().size() * c.num_experts) +
                           " experts holds " + std::to_string(hessian_bytes / kGiB) +
                           " GiB of input statistics, more than --max-hessian-gib " +
                           std::to_string(o.max_hessian_gib));
  const auto activation = runtime::ExpertActivationParams::ForModel(c);
  cache::ExpertCalibration calib(&engine->weights(), activation), held_out(&engine->weights(), activation);
  cache::ExpertCalibration* into = &calib;
  engine->set_expose_router_inputs(true);
  engine->AddRoutingObserver([&into](runtime::LayerRouting& r) { return into->Add(r); });

  std::fprintf(stderr, "calibration: %lld sequences of %d tokens from %zu file(s)%s\n", static_cast<long long>(seqs),
               o.seq_len, o.calibration.size(),
               hold_out ? (", every " + std::to_string(every) + "th held out to measure the error").c_str() : "");
  {
    Progress bar("calibration forward", seqs * o.seq_len, 2.0, "tokens");
    for (int64_t s = 0; s < seqs; ++s) {
      into = hold_out && s % every == every - 1 ? &held_out : &calib;
      EF_RETURN_IF_ERROR(engine->AddSequence(s));
      runtime::SeqChunk chunk{
          s, std::span<const int32_t>(ids).subspan(static_cast<size_t>(s * o.seq_len), static_cast<size_t>(o.seq_len)),
          /*all_logits=*/false};
      runtime::ForwardResult res;
      Status st = engine->Forward({&chunk, 1}, &res);
      engine->RemoveSequence(s);
      EF_RETURN_IF_ERROR(st);
      bar.Advance(o.seq_len);
    }
  }
  cache::ExpertCalibration::Options qo;
  qo.dtype = dtype;
  qo.gptq.damp = o.damp;
  qo.min_tokens = o.min_tokens;
  cache::ExpertCalibration::Result r;
  {
    Progress bar(std::string("GPTQ to ") + o.precision, static_cast<int64_t>(c.MoeLayers().size()) * c.num_experts, 2.0,
                 "experts");
    EF_ASSIGN_OR_RETURN(r, calib.Quantize(qo, &bar, hold_out ? &held_out : nullptr));
  }
  std::fprintf(stderr, "output error vs rounding to nearest: %.3fx on the calibration inputs", r.error_ratio);
  if (hold_out) std::fprintf(stderr, ", %.3fx on the held-out ones", r.held_out_error_ratio);
  std::fprintf(stderr, "\n");
  const std::map<std::string, std::string> meta = {
      {"calibration_tokens", std::to_string(seqs * o.seq_len)},
      {"damp", std::to_string(o.damp)},
      {"error_ratio", std::to_string(r.error_ratio)},
      {"held_out_error_ratio", hold_out ? std::to_string(r.held_out_error_ratio) : "none"},
  };
  EF_RETURN_IF_ERROR(cache::QuantizedExperts::Write(o.out, engine->weights(), dtype, "gptq", r.blocks, meta));
  std::fprintf(stderr, "wrote %s: %d of %lld experts in %s with GPTQ (fewest calibration tokens %lld)", o.out.c_str(),
               r.experts, static_cast<long long>(c.MoeLayers().size() * c.num_experts), o.precision.c_str(),
               static_cast<long long>(r.fewest_tokens));
  if (r.too_few_tokens + r.singular > 0)
    std::fprintf(stderr, "; %d left to round to nearest at load (%d with too few tokens, %d singular)",
                 r.too_few_tokens + r.singular, r.too_few_tokens, r.singular);
  if (r.not_quantized > 0) std::fprintf(stderr, "; %d the cache keeps in the checkpoint's precision", r.not_quantized);
  std::fprintf(stderr, "\n");
  return Status::Ok();
}

}  // namespace

Command AddQuantizeCommand(CLI::App& root) {
  auto o = std::make_shared<QuantizeOptions>();
  Command c;
  c.app = root.add_subcommand(
      "quantize",
      "Quantize the routed experts with GPTQ over calibration text, for the expert cache's low-precision copies "
      "(cache.quantized_experts)");
  o->model.Register(c.app);
  c.app->add_option("--calibration", o->calibration, "text files to calibrate on (read whole, tokenized)")
      ->required()
      ->check(CLI::ExistingFile);
  c.app->add_option("--precision", o->precision, "int8 or int4 (the cache's cache.miss_precision)")
      ->check(CLI::IsMember({"int8", "int4"}))
      ->capture_default_str();
  c.app->add_option("--out,-o", o->out, "output file (safetensors)")->required();
  c.app->add_option("--seq-len", o->seq_len, "tokens per calibration sequence")
      ->check(CLI::Range(2, 1 << 16))
      ->capture_default_str();
  c.app->add_option("--max-tokens", o->max_tokens, "calibration tokens at most")
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 30))
      ->capture_default_str();
  c.app
      ->add_option("--min-tokens", o->min_tokens,
                   "an expert reached by fewer calibration tokens is left to round to nearest at load")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  c.app
      ->add_option("--hold-out-every", o->hold_out_every,
                   "every Nth calibration sequence is kept out of the statistics and measures the output error on "
                   "unseen inputs (0: every sequence calibrates)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  c.app->add_option("--damp", o->damp, "added to the Hessian's diagonal, times its mean")
      ->check(CLI::Range(0.0, 10.0))
      ->capture_default_str();
  c.app
      ->add_option("--max-hessian-gib", o->max_hessian_gib,
                   "refuse a model whose per-expert input statistics exceed this much memory")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c.run = [o] {
    Status s = RunQuantize(*o);
    return s.ok() ? 0 : ReportError(s);
  };
  return c;
}

}  // namespace ef::launch
