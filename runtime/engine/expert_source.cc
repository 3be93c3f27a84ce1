#include "runtime/engine/expert_source.h"

namespace ef::runtime {

StatusOr<std::unique_ptr<ResidentExpertSource>> ResidentExpertSource::Create(const ModelWeights& model,
                                                                             Backend* backend) {
  auto src = std::make_unique<ResidentExpertSource>();
  const ModelConfig& c = model.config();
  src->num_experts_ = c.num_experts;
  src->experts_.resize(static_cast<size_t>(c.num_layers) * c.num_experts);
  for (int l : c.MoeLayers()) {
    for (int e = 0; e < c.num_experts; ++e) {
      const ExpertWeights& h = model.host_expert(l, e);
      ExpertWeights& d = src->experts_[static_cast<size_t>(l) * c.num_experts + e];
      d = h;
      for (Weight* w : d.parts()) {
        EF_ASSIGN_OR_RETURN(*w, backend->UploadWeight(w->dtype, w->data, w->rows, w->cols));
      }
    }
  }
  return src;
}

StatusOr<ExpertWeights> ResidentExpertSource::Acquire(int layer, int expert) {
  return experts_[static_cast<size_t>(layer) * num_experts_ + expert];
}

}  // namespace ef::runtime
