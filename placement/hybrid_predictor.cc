#include "placement/hybrid_predictor.h"

#include <algorithm>

#include "placement/trace_inputs.h"

namespace ef::placement {
namespace {

double RecallOfRow(const RoutingForecast& f, int t, int l, const int16_t* truth, int k) {
  std::vector<int> top = f.TopK(t, l, k);
  int hit = 0;
  for (int j = 0; j < k; ++j) hit += std::count(top.begin(), top.end(), truth[j]) > 0;
  return static_cast<double>(hit) / k;
}

}  // namespace

HybridPredictor::HybridPredictor(std::unique_ptr<PathPredictor> path, std::unique_ptr<AffinityPredictor> affinity,
                                 std::vector<float> weights)
    : path_(std::move(path)), affinity_(std::move(affinity)), weights_(std::move(weights)) {
  weights_.resize(path_->num_layers(), 0.5f);
  if (!weights_.empty()) weights_[0] = 1.f;
}

Status HybridPredictor::FitWeights(const RoutingTrace& val) {
  if (val.tokens.empty()) return Status::Ok();
  const int L = num_layers(), E = num_experts(), K = val.top_k();
  EF_RETURN_IF_ERROR(CheckTraceShape(val, L, E, path_->top_k()));
  TraceInputs in(val);
  for (int l = 1; l < L; ++l) {
    std::vector<ObservedRouting> obs(val.tokens.size());
    for (size_t t = 0; t < obs.size(); ++t) obs[t] = {l, val.tokens[t].experts, K, {}};
    EF_ASSIGN_OR_RETURN(RoutingForecast pf, path_->PredictGiven(in.inputs(), obs));
    EF_ASSIGN_OR_RETURN(RoutingForecast af, affinity_->PredictGiven(in.inputs(), obs));
    double best = -1;
    RoutingForecast mix(1, L, E);
    for (int step = 0; step <= 10; ++step) {
      const float w = static_cast<float>(step) / 10.f;
      double recall = 0;
      for (size_t t = 0; t < obs.size(); ++t) {
        const float* a = pf.row(static_cast<int>(t), l);
        const float* b = af.row(static_cast<int>(t), l);
        float* m = mix.row(0, l);
        for (int e = 0; e < E; ++e) m[e] = w * a[e] + (1.f - w) * b[e];
        recall += RecallOfRow(mix, 0, l, val.tokens[t].experts.data() + static_cast<size_t>(l) * K, K);
      }
      if (recall > best + 1e-9) {
        best = recall;
        weights_[l] = w;
      }
    }
  }
  return Status::Ok();
}

StatusOr<RoutingForecast> HybridPredictor::Predict(std::span<const PredictorInput> batch) const {
  return path_->Predict(batch);
}

StatusOr<RoutingForecast> HybridPredictor::PredictGiven(std::span<const PredictorInput> batch,
                                                        std::span<const ObservedRouting> observed) const {
  EF_ASSIGN_OR_RETURN(RoutingForecast pf, path_->PredictGiven(batch, observed));
  EF_ASSIGN_OR_RETURN(RoutingForecast af, affinity_->PredictGiven(batch, observed));
  for (size_t t = 0; t < batch.size(); ++t) {
    const int done = std::clamp(observed[t].num_layers_done, 0, num_layers());
    for (int l = 0; l < num_layers(); ++l) {
      float* p = pf.row(static_cast<int>(t), l);
      const float* a = af.row(static_cast<int>(t), l);
      // Observed layers: the truth. The first unobserved layer: the mix. Later layers: the
      // affinity chain is diffuse, so its weight decays with distance from the observation.
      if (l < done) {
        std::copy(a, a + num_experts(), p);
      } else if (done > 0) {
        const float w = l == done ? weights_[l] : std::max(weights_[l], 0.5f);
        for (int e = 0; e < num_experts(); ++e) p[e] = w * p[e] + (1.f - w) * a[e];
      }
    }
  }
  return pf;
}

void HybridPredictor::Observe(const PredictorInput& token, std::span<const int16_t> experts, int top_k) {
  affinity_->Observe(token, experts, top_k);
}

void HybridPredictor::ToFile(PredictorFile* file, const std::string& prefix) const {
  path_->ToFile(file, prefix + "path.");
  affinity_->ToFile(file, prefix + "affinity.");
  file->tensors[prefix + "weights"] = PredictorTensor::F32({num_layers()}, weights_);
}

StatusOr<std::unique_ptr<HybridPredictor>> HybridPredictor::FromFile(const PredictorFile& file,
                                                                     const std::string& prefix, int num_layers,
                                                                     int num_experts, int top_k,
                                                                     const std::string& path) {
  EF_ASSIGN_OR_RETURN(auto pp, PathPredictor::FromFile(file, prefix + "path.", num_layers, num_experts, top_k, path));
  EF_ASSIGN_OR_RETURN(auto ap,
                      AffinityPredictor::FromFile(file, prefix + "affinity.", num_layers, num_experts, top_k, path));
  EF_ASSIGN_OR_RETURN(const PredictorTensor* w, file.Tensor(prefix + "weights", "F32", {num_layers}, path));
  return std::make_unique<HybridPredictor>(std::move(pp), std::move(ap), w->f32);
}

}  // namespace ef::placement
