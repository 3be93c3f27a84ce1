// Saving and loading any predictor kind as one safetensors file (placement/predictor_io.h).
//
// Every file's "__metadata__" holds: format = "expertflow-predictor", format_version = "1",
// kind (frequency | affinity | path | hybrid), num_layers, num_experts, top_k, model (the
// trace header's model), trace (the training trace's path) and train_seqs (the sequences it
// was fitted on, e.g. "0-23"), plus the kind's own hyper-parameters. LoadPredictor validates
// the metadata and every tensor's dtype and shape against it; a malformed file or one whose
// tensors do not fit its declared shape is a clear error.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "placement/predictor.h"
#include "placement/predictor_io.h"
#include "runtime/core/status.h"

namespace ef::placement {

struct PredictorInfo {
  std::string kind;
  int num_layers = 0;
  int num_experts = 0;
  int top_k = 0;
  std::string model;
  std::string trace;
  std::vector<int64_t> train_seqs;
};

struct LoadedPredictor {
  PredictorInfo info;
  std::unique_ptr<Predictor> predictor;
};

// `predictor` must be one of FrequencyPredictor, AffinityPredictor, PathPredictor, HybridPredictor.
Status SavePredictor(const Predictor& predictor, const PredictorInfo& info, const std::string& path);
StatusOr<LoadedPredictor> LoadPredictor(const std::string& path);
// The predictor in an already-read file; `origin` names it in errors.
StatusOr<LoadedPredictor> PredictorFromFile(const PredictorFile& file, const std::string& origin);

}  // namespace ef::placement
