// ExpertCalibration: what GPTQ needs to quantize a model's routed experts, gathered from a forward
// pass over calibration text, and the quantization itself (`expertflow quantize`).
//
// For each (layer, expert) it sums, over the calibration tokens the router sends there, the second
// moments of the expert's two inputs:
//   H_in  = sum_t x_t x_t^T   x: the layer's normalised hidden state (gate and up read it);
//   H_mid = sum_t a_t a_t^T   a = act(gate x + b, up x + b): what down reads, recomputed here in
//                             fp32 from the checkpoint's weights (the activation of the model).
// Quantize() then runs QuantizeGptq (runtime/core/gptq.h) on gate and up with H_in and on down with
// H_mid. An expert that saw fewer than min_tokens tokens is left out (the cache quantizes it to
// nearest at load): its Hessian would describe too few inputs to trust.
//
// Memory: (hidden^2 + inter^2) doubles per expert, every routed expert at once (Mixtral-8x7B:
// 1.8 GB an expert, far too much; HessianBytes says before anything starts). Not thread-safe:
// Add() from the engine's routing observer, one forward at a time.
#pragma once

#include <cstdint>
#include <vector>

#include "cache/quantized_experts.h"
#include "runtime/core/gptq.h"
#include "runtime/core/progress.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/moe_executor.h"

namespace ef::cache {

class ExpertCalibration {
 public:
  // The bytes of Hessians a calibration of `model` holds.
  static size_t HessianBytes(const runtime::ModelConfig& c);

  ExpertCalibration(const runtime::ModelWeights* model, runtime::ExpertActivationParams activation);

  // The tokens of one MoE layer's routing (an Engine routing observer's argument, with
  // Engine::set_expose_router_inputs(true): r.hidden holds the router's inputs).
  Status Add(const runtime::LayerRouting& r);

  int64_t tokens(int layer, int expert) const { return tokens_[Index(layer, expert)]; }

  struct Options {
    DType dtype = DType::kQ8;  // kQ8 or kQ4
    GptqOptions gptq;
    // An expert needs this many calibration tokens; 0: as many as its widest input (the down
    // projection's), below which its Hessian is singular but for the damping.
    int64_t min_tokens = 0;
  };
  struct Result {
    std::vector<QuantizedExperts::Block> blocks;
    int experts = 0;            // quantized with GPTQ (3 blocks each)
    int too_few_tokens = 0;     // left out: fewer than min_tokens
    int singular = 0;           // left out: a Hessian not positive definite after damping
    int not_quantized = 0;      // left out: the cache keeps them in the checkpoint's precision
    int64_t fewest_tokens = 0;  // of the experts quantized
    // sum_t |(W - Q) x_t|^2 over every quantized matrix, GPTQ's over rounding to nearest's: over
    // this calibration's inputs, and over `held_out`'s (1 when none was given or it saw nothing).
    double error_ratio = 1, held_out_error_ratio = 1;
  };
  // GPTQ blocks of every expert the cache quantizes to o.dtype that saw enough tokens. progress
  // (may be null) advances by one per expert. held_out (may be null): a calibration of the same
  // model on other text, whose inputs measure the error the blocks make on text they did not see.
  StatusOr<Result> Quantize(const Options& o, Progress* progress, const ExpertCalibration* held_out = nullptr) const;

 private:
  size_t Index(int layer, int expert) const { return static_cast<size_t>(layer) * num_experts_ + expert; }

  const runtime::ModelWeights* model_;
  runtime::ExpertActivationParams activation_;
  int num_experts_;
  std::vector<uint8_t> eligible_;  // [layer * E + expert]: CacheQuantizes in int8 or int4
  std::vector<int64_t> tokens_;
  // Lower triangles accumulated, [layer * E + expert] -> [n, n] row-major (empty until used).
  std::vector<std::vector<double>> h_in_, h_mid_;
};

}  // namespace ef::cache
