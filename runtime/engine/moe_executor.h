// MoeExecutor: computes a MoE layer's routed experts for a batch once the router has decided.
//
// The engine runs attention, the router and the routing hooks, then hands the executor the
// normalised hidden states and the routing; the executor adds sum_j w_j * expert_j(h) of every
// token into `out`. LocalMoeExecutor computes every expert on this process's backend; the
// expert-parallel executor (comm/) sends rows to the ranks that compute their experts and uses
// LocalMoeExecutor::ComputeRows on what it receives.
#pragma once

#include <span>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/engine/expert_source.h"

namespace ef::runtime {

class MoeExecutor {
 public:
  virtual ~MoeExecutor() = default;
  // h, out: backend memory [T, hidden]; ids, weights: host [T * top_k]. out is accumulated into.
  virtual Status Run(int layer, int64_t T, int top_k, const float* h, std::span<const int32_t> ids,
                     std::span<const float> weights, float* out) = 0;
};

// The expert MLP's activation: silu(gate) * up, or GPT-OSS's clamped SwiGLU.
struct ExpertActivationParams {
  ExpertActivation kind = ExpertActivation::kSiluMul;
  float alpha = 1.702f;
  float limit = 7.f;
  static ExpertActivationParams ForModel(const ModelConfig& c) {
    return {c.expert_activation, c.swiglu_alpha, c.swiglu_limit};
  }
};

class LocalMoeExecutor final : public MoeExecutor {
 public:
  LocalMoeExecutor(Backend* backend, int hidden_size, int num_experts, ExpertActivationParams activation = {})
      : backend_(backend), hidden_(hidden_size), num_experts_(num_experts), activation_(activation) {}

  void set_expert_source(ExpertSource* source) { source_ = source; }
  ExpertSource* expert_source() const { return source_; }

  Status Run(int layer, int64_t T, int top_k, const float* h, std::span<const int32_t> ids,
             std::span<const float> weights, float* out) override;

  // Row-wise: y[i] = scale[i] * expert[i](x[i]) for n rows (x, y backend memory; expert and
  // scale host). Rows are grouped by expert internally; each expert is acquired once.
  Status ComputeRows(int layer, int64_t n, const float* x, std::span<const int32_t> expert,
                     std::span<const float> scale, float* y);

 private:
  // The experts of `active` (rows [offset[e], offset[e+1]) of the permuted batch): tells the
  // source the routing, gathers src's rows by perm_dev into the expert-major layout and computes
  // every expert's rows, on the backend or (those the source takes) on the host. Returns ye
  // (backend memory, n rows, unscaled expert outputs in permuted order).
  StatusOr<float*> ComputeActive(int layer, std::vector<int32_t>& active, const std::vector<int32_t>& offset,
                                 const float* src, const int32_t* perm_dev, int64_t n);
  // Runs each expert of `order` on its rows [offset[e], offset[e+1]) of xe into ye, as many at a
  // time as the source lets the executor hold.
  Status ComputeExperts(int layer, std::span<const int32_t> order, const std::vector<int32_t>& offset, const float* xe,
                        const uint16_t* xe16, float* ye);
  // The routing of one call on the backend: perm (row -> token, expert-major), scale (per row) and
  // pos (each token's k rows, ascending: its experts by increasing id, the order
  // Backend::CombineRows adds them in), uploaded in one copy. Internal unless every token has
  // exactly k rows.
  struct DeviceRouting {
    int32_t* perm;
    float* scale;
    int32_t* pos;
  };
  StatusOr<DeviceRouting> Upload(const std::vector<int32_t>& perm, const std::vector<float>& scale, int64_t tokens,
                                 int k);
  // A reusable activation buffer; ResourceExhausted (naming the size) when the backend is full.
  StatusOr<float*> Scratch(int slot, size_t floats);
  Status Mlp(const ExpertWeights& w, int64_t rows, const float* x, float* out);
  // The acquired experts `experts` (w[i] for experts[i]) on their rows: one Backend::ExpertMlps
  // call where the backend has it (xe16: xe's bf16 twin or null), else Mlp each.
  Status MlpGroup(std::span<const int32_t> experts, std::span<const ExpertWeights> w,
                  const std::vector<int32_t>& offset, const float* xe, const uint16_t* xe16, float* ye);

  Backend* backend_;
  int hidden_;
  int num_experts_;
  ExpertActivationParams activation_;
  ExpertSource* source_ = nullptr;
  std::vector<Buffer> scratch_ = std::vector<Buffer>(7);
  // The experts' weight type on the backend, as last acquired: whether the gathered rows get a
  // bf16 twin (Backend::Bf16Twins) from the next call on.
  DType expert_dtype_ = DType::kF32;
  std::vector<uint32_t> upload_;        // Upload's host staging
  std::vector<float> host_x_, host_y_;  // rows of host-computed experts
};

}  // namespace ef::runtime
