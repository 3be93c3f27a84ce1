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
//
// --rank-layers measures, on the held-out sequences, what low precision costs in each MoE layer
// alone (the KL of the next-token distribution from the checkpoint's experts, and top-1 agreement),
// and recommends the cache.low_precision_layers whose summed KL stays within --max-kl: noise in an
// early layer reaches every later router, so the layers differ by far more than their weights do
// (docs/results/quant, "Which layers"). With --out the ranking loads the GPTQ experts just written.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <new>
#include <numeric>
#include <sstream>

#include "cache/expert_cache.h"
#include "cache/expert_calibration.h"
#include "cache/low_precision_layers.h"
#include "launch/cli_checks.h"
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
  bool rank_layers = false;
  int64_t rank_tokens = 4096;
  double max_kl = 0.005;
};

// Sequence s of `ids` (tokens [s * seq_len, (s + 1) * seq_len)) through `engine` as one prefill,
// with the logits of every token or none.
StatusOr<runtime::ForwardResult> ForwardSequence(runtime::Engine& engine, const std::vector<int32_t>& ids, int64_t s,
                                                 int seq_len, bool all_logits) {
  EF_RETURN_IF_ERROR(engine.AddSequence(s));
  runtime::SeqChunk chunk{
      s, std::span<const int32_t>(ids).subspan(static_cast<size_t>(s * seq_len), static_cast<size_t>(seq_len)),
      all_logits};
  runtime::ForwardResult res;
  Status st = engine.Forward({&chunk, 1}, &res);
  engine.RemoveSequence(s);
  EF_RETURN_IF_ERROR(st);
  return res;
}

// --rank-layers: each MoE layer alone in `precision` against the checkpoint's experts, over the
// sequences `eval` of `ids`, through an expert cache (LRU over top-k slots: every use of the layer
// loads through the cache, so every one is in that precision). Prints the table and the
// recommendation on stdout.
Status RankLayers(const QuantizeOptions& o, const std::vector<int32_t>& ids, const std::vector<int64_t>& eval,
                  bool held_out, const std::string& quantized_experts) {
  runtime::EngineOptions eo = o.model.ToEngineOptions();
  eo.upload_experts = false;  // each pass's experts come through its expert cache
  if (eo.max_seq_len == 0 || eo.max_seq_len < o.seq_len) eo.max_seq_len = o.seq_len;
  EF_ASSIGN_OR_RETURN(auto engine, runtime::Engine::Create(o.model.dir, eo));
  const runtime::ModelConfig& c = engine->config();
  const std::vector<int> moe = c.MoeLayers();
  if (moe.empty()) return InvalidArgument("--rank-layers: the model has no MoE layer");
  const size_t V = static_cast<size_t>(c.vocab_size);
  // One pass over `eval`; per_token(token index, log-softmax of its logits).
  std::vector<float> row(V);
  auto pass = [&](const std::string& precision, const std::string& layers, Progress& bar,
                  const std::function<void(size_t, const std::vector<float>&)>& per_token) -> Status {
    cache::ExpertCacheOptions co;
    co.slots_per_layer = c.top_k;
    co.policy = "lru";
    co.predictor = "none";
    co.prefetch_layers = 0;
    co.cpu_compute = "off";
    co.miss_precision = precision;
    co.low_precision_layers = layers;
    if (precision != "native") co.quantized_experts = quantized_experts;
    EF_ASSIGN_OR_RETURN(auto cache, cache::ExpertCache::Create(engine.get(), co));
    size_t token = 0;
    for (int64_t s : eval) {
      EF_ASSIGN_OR_RETURN(const runtime::ForwardResult res, ForwardSequence(*engine, ids, s, o.seq_len, true));
      for (int t = 0; t < o.seq_len; ++t, ++token) {
        const float* p = res.logits.data() + static_cast<size_t>(t) * V;
        const float m = *std::max_element(p, p + V);
        double z = 0;
        for (size_t v = 0; v < V; ++v) z += std::exp(static_cast<double>(p[v] - m));
        const double lz = m + std::log(z);
        for (size_t v = 0; v < V; ++v) row[v] = static_cast<float>(p[v] - lz);
        per_token(token, row);
      }
      bar.Advance(o.seq_len);
    }
    return Status::Ok();
  };
  const size_t tokens = eval.size() * static_cast<size_t>(o.seq_len);
  std::vector<float> ref;  // the checkpoint's log-probabilities
  try {
    ref.resize(tokens * V);
  } catch (const std::bad_alloc&) {
    return ResourceExhausted("--rank-layers: " + std::to_string(tokens) + " tokens' log-probabilities over " +
                             std::to_string(V) + " tokens of vocabulary do not fit in memory; lower --rank-tokens");
  }
  std::vector<int32_t> ref_top(tokens);
  std::vector<double> kl(moe.size(), 0), agree(moe.size(), 0);
  {
    Progress bar("ranking layers (" + std::to_string(moe.size() + 1) + " passes)",
                 static_cast<int64_t>(tokens * (moe.size() + 1)), 2.0, "tokens");
    EF_RETURN_IF_ERROR(pass("native", "all", bar, [&](size_t t, const std::vector<float>& lp) {
      std::copy(lp.begin(), lp.end(), ref.begin() + static_cast<std::ptrdiff_t>(t * V));
      ref_top[t] = static_cast<int32_t>(std::max_element(lp.begin(), lp.end()) - lp.begin());
    }));
    for (size_t i = 0; i < moe.size(); ++i)
      EF_RETURN_IF_ERROR(pass(o.precision, std::to_string(moe[i]), bar, [&](size_t t, const std::vector<float>& lp) {
        const float* r = ref.data() + t * V;
        double k = 0;
        for (size_t v = 0; v < V; ++v) k += std::exp(static_cast<double>(r[v])) * (r[v] - lp[v]);
        kl[i] += k;
        agree[i] += std::max_element(lp.begin(), lp.end()) - lp.begin() == ref_top[t];
      }));
  }
  // Greedy: the cheapest layers first while their summed KL stays within --max-kl (single-layer
  // costs add up to about the combined one: 0.0020 against 0.0017 for tiny-code-moe's last half).
  std::vector<size_t> order(moe.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return kl[a] < kl[b]; });
  std::vector<uint8_t> pick(static_cast<size_t>(c.num_layers), 0);
  double sum = 0;
  int picked = 0;
  for (size_t i : order) {
    const double k = kl[i] / static_cast<double>(tokens);
    if (sum + k > o.max_kl) break;
    sum += k;
    pick[static_cast<size_t>(moe[i])] = 1;
    ++picked;
  }
  // Without a hold-out, GPTQ experts are measured on the text they were fitted to (which flatters
  // them); rounding to nearest fits nothing, so any text is unseen to it.
  const char* which = held_out                    ? "held-out "
                      : quantized_experts.empty() ? "calibration "
                                                  : "calibration (also the GPTQ experts' fitting text) ";
  std::printf("# %s in one MoE layer at a time against the checkpoint's experts, %zu %stokens%s\n", o.precision.c_str(),
              tokens, which, quantized_experts.empty() ? "" : " (GPTQ experts)");
  std::printf("%-10s %12s %10s\n", "moe_layer", "mean_kl", "top1");
  for (size_t i : order)
    std::printf("%-10d %12.6f %9.2f%%\n", moe[i], kl[i] / static_cast<double>(tokens),
                100.0 * agree[i] / static_cast<double>(tokens));
  if (picked == 0) {
    std::printf("# no MoE layer alone stays within --max-kl %g: keep miss_precision native\n", o.max_kl);
    return Status::Ok();
  }
  std::string spec = cache::DescribeLayers(pick);
  spec = spec.substr(spec.find(' ') + 1);  // "layers 4-7" -> "4-7"
  std::printf("# recommended: --low-precision-layers %s (%d of %zu MoE layers, summed KL %.6f within --max-kl %g)\n",
              spec.c_str(), picked, moe.size(), sum, o.max_kl);
  return Status::Ok();
}

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
  if (ids.size() < static_cast<size_t>(o.seq_len)) {
    if (static_cast<int64_t>(ids.size()) == o.max_tokens)
      return InvalidArgument("--max-tokens " + std::to_string(o.max_tokens) +
                             " is fewer than one sequence of --seq-len " + std::to_string(o.seq_len));
    return InvalidArgument("the calibration files hold " + std::to_string(ids.size()) +
                           " tokens, fewer than one sequence of --seq-len " + std::to_string(o.seq_len));
  }
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
  // The sequences --rank-layers measures on: the held-out ones (all, without a hold-out), up to
  // --rank-tokens.
  std::vector<int64_t> eval;
  for (int64_t s = 0; s < seqs && static_cast<int64_t>(eval.size()) * o.seq_len < o.rank_tokens; ++s)
    if (!hold_out || s % every == every - 1) eval.push_back(s);
  if (o.out.empty()) {
    engine.reset();
    std::fprintf(stderr, "ranking: %zu sequences of %d tokens%s\n", eval.size(), o.seq_len,
                 hold_out ? (" (every " + std::to_string(every) + "th)").c_str() : "");
    return RankLayers(o, ids, eval, hold_out, "");
  }
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
      EF_RETURN_IF_ERROR(ForwardSequence(*engine, ids, s, o.seq_len, false).status());
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
  if (!o.rank_layers) return Status::Ok();
  engine.reset();
  std::fprintf(stderr, "ranking: %zu %ssequences of %d tokens\n", eval.size(), hold_out ? "held-out " : "", o.seq_len);
  return RankLayers(o, ids, eval, hold_out, o.out);
}

}  // namespace

// CLI::Range lets NaN through (every comparison with it is false).
const CLI::Validator kFinite(
    [](std::string& v) -> std::string {
      double d = 0;
      return CLI::detail::lexical_cast(v, d) && std::isfinite(d) ? std::string() : "not a finite number: " + v;
    },
    "FINITE");

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
  c.app->add_option("--out,-o", o->out, "output file (safetensors); without it, --rank-layers alone runs")
      ->check(kOutputFile);
  c.app->add_flag("--rank-layers", o->rank_layers,
                  "measure what --precision costs in each MoE layer alone (KL and top-1 against the checkpoint's "
                  "experts, on the held-out sequences) and recommend --low-precision-layers");
  c.app
      ->add_option("--rank-tokens", o->rank_tokens,
                   "tokens --rank-layers measures on, rounded up to whole --seq-len sequences (their reference "
                   "log-probabilities stay in memory: tokens x vocabulary x 4 bytes)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24))
      ->capture_default_str();
  c.app->add_option("--max-kl", o->max_kl, "--rank-layers recommends layers whose summed KL stays within this")
      ->check(kFinite & CLI::Range(0.0, 100.0))
      ->capture_default_str();
  c.app->add_option("--seq-len", o->seq_len, "tokens per calibration sequence")
      ->check(CLI::Range(2, 1 << 16))
      ->capture_default_str();
  c.app->add_option("--max-tokens", o->max_tokens, "calibration tokens at most")
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 30))
      ->capture_default_str();
  c.app
      ->add_option("--min-tokens", o->min_tokens,
                   "an expert reached by fewer calibration tokens is left to round to nearest at load (0: as many "
                   "as its widest input, the intermediate size)")
      ->check(kNonNegative)
      ->capture_default_str();
  c.app
      ->add_option("--hold-out-every", o->hold_out_every,
                   "every Nth calibration sequence is kept out of the statistics and measures the output error on "
                   "unseen inputs (0: every sequence calibrates; 1 would leave none to calibrate on)")
      ->check(kNonNegative)
      ->check(CLI::Validator(
          [](std::string& v) -> std::string {
            return v == "1" ? "1 would hold every sequence out and calibrate on none: 0, or 2 and up" : "";
          },
          "0 OR >= 2"))
      ->capture_default_str();
  c.app->add_option("--damp", o->damp, "added to the Hessian's diagonal, times its mean")
      ->check(kFinite & CLI::Range(0.0, 10.0))
      ->capture_default_str();
  c.app
      ->add_option("--max-hessian-gib", o->max_hessian_gib,
                   "refuse a model whose per-expert input statistics exceed this much memory")
      ->check(kFinite & kPositive)
      ->capture_default_str();
  c.run = [o] {
    // Where the file goes is checked when the flags are read (kOutputFile), before the calibration.
    if (o->out.empty() && !o->rank_layers) return ReportError(InvalidArgument("give --out, --rank-layers or both"));
    Status s = RunQuantize(*o);
    return s.ok() ? 0 : ReportError(s);
  };
  return c;
}

}  // namespace ef::launch
