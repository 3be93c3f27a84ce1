#include "placement/predictor_file.h"

#include "placement/affinity_predictor.h"
#include "placement/frequency_predictor.h"
#include "placement/hybrid_predictor.h"
#include "placement/path_predictor.h"
#include "placement/predictor_io.h"
#include "runtime/core/limits.h"

namespace ef::placement {

Status SavePredictor(const Predictor& predictor, const PredictorInfo& info, const std::string& path) {
  PredictorFile file;
  if (auto* p = dynamic_cast<const FrequencyPredictor*>(&predictor)) {
    p->ToFile(&file, "");
  } else if (auto* p = dynamic_cast<const AffinityPredictor*>(&predictor)) {
    p->ToFile(&file, "");
  } else if (auto* p = dynamic_cast<const PathPredictor*>(&predictor)) {
    p->ToFile(&file, "");
  } else if (auto* p = dynamic_cast<const HybridPredictor*>(&predictor)) {
    p->ToFile(&file, "");
  } else {
    return Unimplemented("predictor \"" + predictor.name() + "\" cannot be saved");
  }
  auto& m = file.metadata;
  m["format"] = std::string("expertflow-predictor");
  m["format_version"] = std::string("1");
  m["kind"] = predictor.name();
  m["num_layers"] = std::to_string(info.num_layers);
  m["num_experts"] = std::to_string(info.num_experts);
  m["top_k"] = std::to_string(info.top_k);
  m["model"] = info.model;
  m["trace"] = info.trace;
  m["train_seqs"] = FormatSeqList(info.train_seqs);
  return WritePredictorFile(file, path);
}

StatusOr<LoadedPredictor> LoadPredictor(const std::string& path) {
  EF_ASSIGN_OR_RETURN(PredictorFile file, ReadPredictorFile(path));
  return PredictorFromFile(file, path);
}

StatusOr<LoadedPredictor> PredictorFromFile(const PredictorFile& file, const std::string& path) {
  auto format = file.metadata.find("format");
  if (format == file.metadata.end() || format->second != "expertflow-predictor")
    return InvalidArgument("predictor file " + path + " is a safetensors file but not an expertflow predictor " +
                           "(metadata \"format\" is not \"expertflow-predictor\")");
  EF_ASSIGN_OR_RETURN(int64_t version, file.MetaInt("format_version", path));
  if (version != 1)
    return InvalidArgument("predictor file " + path + ": format_version " + std::to_string(version) +
                           " is not supported (this build reads 1)");
  LoadedPredictor out;
  PredictorInfo& info = out.info;
  EF_ASSIGN_OR_RETURN(info.kind, file.Meta("kind", path));
  EF_ASSIGN_OR_RETURN(int64_t L, file.MetaInt("num_layers", path));
  EF_ASSIGN_OR_RETURN(int64_t E, file.MetaInt("num_experts", path));
  EF_ASSIGN_OR_RETURN(int64_t K, file.MetaInt("top_k", path));
  if (L < 1 || L > limits::kMaxLayers || E < 1 || E > limits::kMaxExperts || K < 1 || K > limits::kMaxTopK || K > E)
    return InvalidArgument("predictor file " + path + ": shape (" + std::to_string(L) + " layers x " +
                           std::to_string(E) + " experts, top-" + std::to_string(K) + ") out of range");
  info.num_layers = static_cast<int>(L);
  info.num_experts = static_cast<int>(E);
  info.top_k = static_cast<int>(K);
  if (auto it = file.metadata.find("model"); it != file.metadata.end()) info.model = it->second;
  if (auto it = file.metadata.find("trace"); it != file.metadata.end()) info.trace = it->second;
  if (auto it = file.metadata.find("train_seqs"); it != file.metadata.end() && !it->second.empty()) {
    auto seqs = ParseSeqList(it->second);
    if (!seqs.ok()) return InvalidArgument("predictor file " + path + ": " + seqs.status().message());
    info.train_seqs = *seqs;
  }
  const int l = info.num_layers, e = info.num_experts, k = info.top_k;
  if (info.kind == "frequency") {
    EF_ASSIGN_OR_RETURN(out.predictor, FrequencyPredictor::FromFile(file, "", l, e, k, path));
  } else if (info.kind == "affinity") {
    EF_ASSIGN_OR_RETURN(out.predictor, AffinityPredictor::FromFile(file, "", l, e, k, path));
  } else if (info.kind == "path") {
    EF_ASSIGN_OR_RETURN(out.predictor, PathPredictor::FromFile(file, "", l, e, k, path));
  } else if (info.kind == "hybrid") {
    EF_ASSIGN_OR_RETURN(out.predictor, HybridPredictor::FromFile(file, "", l, e, k, path));
  } else {
    return InvalidArgument("predictor file " + path + ": unknown kind \"" + info.kind +
                           "\" (expected frequency, affinity, path or hybrid)");
  }
  return out;
}

}  // namespace ef::placement
