// HostRouter: a MoE layer's expert choices and weights from its router logits, computed on the
// host, for the routers Backend::RouterTopK (softmax, plain top-k) cannot express:
//  - deepseek_v2: softmax scores, greedy or group-limited top-k (a group scores its best expert),
//    times routed_scaling_factor;
//  - deepseek_v3: sigmoid scores; selection on score + e_score_correction_bias within the
//    topk_group best groups (a group scores the sum of its two best), weights the uncorrected
//    scores, renormalised when norm_topk_prob, times routed_scaling_factor;
//  - gpt_oss: top-k of the logits, softmax over the k selected.
// Ties go to the lower expert (group) id. Stateless after construction; thread-compatible.
#pragma once

#include <cstdint>
#include <span>

#include "runtime/model/model_config.h"

namespace ef::runtime {

class HostRouter {
 public:
  explicit HostRouter(const ModelConfig& c);

  // logits: [rows, num_experts]; correction_bias: [num_experts] or empty. Writes ids and
  // weights [rows * top_k], highest selection score first.
  void Route(const float* logits, int64_t rows, std::span<const float> correction_bias, int32_t* ids,
             float* weights) const;

 private:
  RouterScoring scoring_;
  TopkMethod method_;
  int num_experts_, top_k_, n_group_, topk_group_;
  bool norm_topk_prob_;
  float routed_scaling_factor_;
};

}  // namespace ef::runtime
