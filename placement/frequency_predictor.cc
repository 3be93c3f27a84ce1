#include "placement/frequency_predictor.h"

namespace ef::placement {

FrequencyPredictor::FrequencyPredictor(int num_layers, int num_experts, int top_k, double decay)
    : num_layers_(num_layers),
      num_experts_(num_experts),
      top_k_(top_k),
      decay_(decay),
      counts_(static_cast<size_t>(num_layers) * num_experts, 0.0),
      tokens_(num_layers, 0.0) {}

StatusOr<std::unique_ptr<FrequencyPredictor>> FrequencyPredictor::Fit(const RoutingTrace& trace, double decay) {
  if (trace.tokens.empty()) return InvalidArgument("cannot fit a frequency predictor on an empty trace");
  auto p = std::make_unique<FrequencyPredictor>(trace.num_layers(), trace.num_experts(), trace.top_k(), decay);
  PredictorInput none;
  for (const auto& t : trace.tokens) p->Observe(none, t.experts, trace.top_k());
  return p;
}

void FrequencyPredictor::Observe(const PredictorInput&, std::span<const int16_t> experts, int top_k) {
  for (int l = 0; l < num_layers_; ++l) {
    double* c = counts_.data() + static_cast<size_t>(l) * num_experts_;
    if (decay_ > 0.0 && decay_ < 1.0) {
      for (int e = 0; e < num_experts_; ++e) c[e] *= decay_;
      tokens_[l] *= decay_;
    }
    tokens_[l] += 1.0;
    for (int j = 0; j < top_k; ++j) {
      size_t i = static_cast<size_t>(l) * top_k + j;
      if (i < experts.size() && experts[i] >= 0 && experts[i] < num_experts_) c[experts[i]] += 1.0;
    }
  }
}

std::vector<float> FrequencyPredictor::LayerProbs(int layer) const {
  std::vector<float> p(num_experts_);
  const double* c = counts_.data() + static_cast<size_t>(layer) * num_experts_;
  const double prior = static_cast<double>(top_k_) / num_experts_;
  for (int e = 0; e < num_experts_; ++e) p[e] = static_cast<float>((c[e] + prior) / (tokens_[layer] + 1.0));
  return p;
}

StatusOr<RoutingForecast> FrequencyPredictor::Predict(std::span<const PredictorInput> batch) const {
  RoutingForecast f(static_cast<int>(batch.size()), num_layers_, num_experts_);
  for (int l = 0; l < num_layers_; ++l) {
    std::vector<float> p = LayerProbs(l);
    for (size_t t = 0; t < batch.size(); ++t) std::copy(p.begin(), p.end(), f.row(static_cast<int>(t), l));
  }
  return f;
}

void FrequencyPredictor::ToFile(PredictorFile* file, const std::string& prefix) const {
  std::vector<float> counts(counts_.begin(), counts_.end()), tokens(tokens_.begin(), tokens_.end());
  file->tensors[prefix + "counts"] = PredictorTensor::F32({num_layers_, num_experts_}, std::move(counts));
  file->tensors[prefix + "tokens"] = PredictorTensor::F32({num_layers_}, std::move(tokens));
  file->metadata[prefix + "decay"] = std::to_string(decay_);
}

StatusOr<std::unique_ptr<FrequencyPredictor>> FrequencyPredictor::FromFile(const PredictorFile& file,
                                                                           const std::string& prefix, int num_layers,
                                                                           int num_experts, int top_k,
                                                                           const std::string& path) {
  EF_ASSIGN_OR_RETURN(double decay, file.MetaDouble(prefix + "decay", path));
  EF_ASSIGN_OR_RETURN(const PredictorTensor* counts,
                      file.Tensor(prefix + "counts", "F32", {num_layers, num_experts}, path));
  EF_ASSIGN_OR_RETURN(const PredictorTensor* tokens, file.Tensor(prefix + "tokens", "F32", {num_layers}, path));
  auto p = std::make_unique<FrequencyPredictor>(num_layers, num_experts, top_k, decay);
  p->counts_.assign(counts->f32.begin(), counts->f32.end());
  p->tokens_.assign(tokens->f32.begin(), tokens->f32.end());
  for (double v : p->counts_)
    if (!(v >= 0.0)) return InvalidArgument("predictor file " + path + ": negative or NaN expert count");
  return p;
}

}  // namespace ef::placement
