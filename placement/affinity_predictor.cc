#include "placement/affinity_predictor.h"

#include <algorithm>

namespace ef::placement {

AffinityPredictor::AffinityPredictor(int num_layers, int num_experts, int top_k, double beta)
    : num_layers_(num_layers),
      num_experts_(num_experts),
      top_k_(top_k),
      beta_(beta),
      freq_(num_layers, num_experts, top_k),
      trans_(static_cast<size_t>(std::max(num_layers - 1, 0)) * num_experts * num_experts, 0.0),
      from_(static_cast<size_t>(std::max(num_layers - 1, 0)) * num_experts, 0.0) {}

StatusOr<std::unique_ptr<AffinityPredictor>> AffinityPredictor::Fit(const RoutingTrace& trace, double beta) {
  if (trace.tokens.empty()) return InvalidArgument("cannot fit an affinity predictor on an empty trace");
  auto p = std::make_unique<AffinityPredictor>(trace.num_layers(), trace.num_experts(), trace.top_k(), beta);
  PredictorInput none;
  for (const auto& t : trace.tokens) p->Observe(none, t.experts, trace.top_k());
  return p;
}

void AffinityPredictor::Observe(const PredictorInput& token, std::span<const int16_t> experts, int top_k) {
  freq_.Observe(token, experts, top_k);
  const size_t E = num_experts_;
  for (int l = 1; l < num_layers_; ++l) {
    for (int i = 0; i < top_k; ++i) {
      size_t ia = static_cast<size_t>(l - 1) * top_k + i;
      if (ia >= experts.size()) return;
      int a = experts[ia];
      if (a < 0 || a >= num_experts_) continue;
      from_[(l - 1) * E + a] += 1.0;
      for (int j = 0; j < top_k; ++j) {
        size_t ib = static_cast<size_t>(l) * top_k + j;
        if (ib >= experts.size()) continue;
        int b = experts[ib];
        if (b >= 0 && b < num_experts_) trans_[((l - 1) * E + a) * E + b] += 1.0;
      }
    }
  }
}

void AffinityPredictor::Transition(int layer, int a, float* out) const {
  const size_t E = num_experts_;
  std::vector<float> prior = freq_.LayerProbs(layer);
  const double* row = trans_.data() + ((layer - 1) * E + a) * E;
  const double n = from_[(layer - 1) * E + a];
  for (size_t b = 0; b < E; ++b) out[b] = static_cast<float>((row[b] + beta_ * prior[b]) / (n + beta_));
}

void AffinityPredictor::Chain(RoutingForecast* f, int t, int from_layer) const {
  std::vector<float> tr(num_experts_);
  for (int l = std::max(from_layer, 1); l < num_layers_; ++l) {
    const float* prev = f->row(t, l - 1);
    float* cur = f->row(t, l);
    std::fill(cur, cur + num_experts_, 0.f);
    for (int a = 0; a < num_experts_; ++a) {
      if (prev[a] <= 0.f) continue;
      Transition(l, a, tr.data());
      const float w = prev[a] / static_cast<float>(top_k_);
      for (int b = 0; b < num_experts_; ++b) cur[b] += w * tr[b];
    }
  }
}

StatusOr<RoutingForecast> AffinityPredictor::Predict(std::span<const PredictorInput> batch) const {
  std::vector<ObservedRouting> none(batch.size());
  return PredictGiven(batch, none);
}

StatusOr<RoutingForecast> AffinityPredictor::PredictGiven(std::span<const PredictorInput> batch,
                                                          std::span<const ObservedRouting> observed) const {
  if (observed.size() != batch.size())
    return InvalidArgument("PredictGiven: " + std::to_string(observed.size()) + " observations for " +
                           std::to_string(batch.size()) + " tokens");
  RoutingForecast f(static_cast<int>(batch.size()), num_layers_, num_experts_);
  std::vector<float> layer0 = freq_.LayerProbs(0);
  for (size_t t = 0; t < batch.size(); ++t) {
    const ObservedRouting& o = observed[t];
    const int done = std::clamp(o.num_layers_done, 0, num_layers_);
    if (done > 0 && (o.top_k <= 0 || o.experts.size() < static_cast<size_t>(done) * o.top_k))
      return InvalidArgument("PredictGiven: observed routing of token " + std::to_string(t) + " lists fewer than " +
                             std::to_string(done) + " layers");
    for (int l = 0; l < done; ++l) {
      float* r = f.row(static_cast<int>(t), l);
      for (int j = 0; j < o.top_k; ++j) {
        int e = o.experts[static_cast<size_t>(l) * o.top_k + j];
        if (e < 0 || e >= num_experts_) return InvalidArgument("PredictGiven: observed expert id out of range");
        r[e] = 1.f;
      }
    }
    if (done == 0) std::copy(layer0.begin(), layer0.end(), f.row(static_cast<int>(t), 0));
    if (done < num_layers_) Chain(&f, static_cast<int>(t), std::max(done, 1));
  }
  return f;
}

void AffinityPredictor::ToFile(PredictorFile* file, const std::string& prefix) const {
  freq_.ToFile(file, prefix + "freq.");
  const int64_t L1 = std::max(num_layers_ - 1, 0);
  file->tensors[prefix + "transitions"] =
      PredictorTensor::F32({L1, num_experts_, num_experts_}, std::vector<float>(trans_.begin(), trans_.end()));
  file->tensors[prefix + "from"] =
      PredictorTensor::F32({L1, num_experts_}, std::vector<float>(from_.begin(), from_.end()));
  file->metadata[prefix + "beta"] = std::to_string(beta_);
}

StatusOr<std::unique_ptr<AffinityPredictor>> AffinityPredictor::FromFile(const PredictorFile& file,
                                                                         const std::string& prefix, int num_layers,
                                                                         int num_experts, int top_k,
                                                                         const std::string& path) {
  EF_ASSIGN_OR_RETURN(double beta, file.MetaDouble(prefix + "beta", path));
  if (!(beta > 0.0)) return InvalidArgument("predictor file " + path + ": affinity beta must be positive");
  const int64_t L1 = std::max(num_layers - 1, 0);
  EF_ASSIGN_OR_RETURN(const PredictorTensor* tr,
                      file.Tensor(prefix + "transitions", "F32", {L1, num_experts, num_experts}, path));
  EF_ASSIGN_OR_RETURN(const PredictorTensor* from, file.Tensor(prefix + "from", "F32", {L1, num_experts}, path));
  EF_ASSIGN_OR_RETURN(auto freq,
                      FrequencyPredictor::FromFile(file, prefix + "freq.", num_layers, num_experts, top_k, path));
  auto p = std::make_unique<AffinityPredictor>(num_layers, num_experts, top_k, beta);
  p->freq_ = *freq;
  p->trans_.assign(tr->f32.begin(), tr->f32.end());
  p->from_.assign(from->f32.begin(), from->f32.end());
  return p;
}

}  // namespace ef::placement
