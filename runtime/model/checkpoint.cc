#include "runtime/model/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "runtime/core/logging.h"
#include "runtime/model/model_config.h"

namespace ef::runtime {

namespace fs = std::filesystem;
using json = nlohmann::json;

StatusOr<std::map<std::string, std::string>> ParseCheckpointIndex(const std::string& text, const std::string& origin) {
  json index = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    return InvalidArgument(origin + " is not a valid index (needs an object \"weight_map\")");
  std::map<std::string, std::string> weight_map;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    if (!it.value().is_string()) return InvalidArgument(origin + ": weight_map value is not a string");
    std::string shard = it.value().get<std::string>();
    if (shard.empty() || shard == "." || shard.find('/') != std::string::npos || shard.find("..") != std::string::npos)
      return InvalidArgument(origin + ": shard name \"" + shard + "\" is not a plain file name");
    weight_map[it.key()] = std::move(shard);
  }
  return weight_map;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& [name, view] : index_) out.push_back(name);
  return out;
}

StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  EF_RETURN_IF_ERROR(ModelConfig::CheckModelDir(dir));
  auto ckpt = std::make_unique<Checkpoint>();
  ckpt->dir_ = dir;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  std::map<std::string, std::string> expected;  // tensor -> shard file named by the index
  std::vector<std::string> shard_names;
  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    std::stringstream ss;
    ss << in.rdbuf();
    EF_ASSIGN_OR_RETURN(expected, ParseCheckpointIndex(ss.str(), index_path.string()));
    std::set<std::string> shards;
    for (const auto& [tensor, shard] : expected) shards.insert(shard);
    shard_names.assign(shards.begin(), shards.end());
  } else if (fs::exists(single_path)) {
    shard_names.push_back("model.safetensors");
  } else {
    return NotFound("no model.safetensors or model.safetensors.index.json in " + dir);
  }
  for (const auto& shard : shard_names) {
    EF_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open((fs::path(dir) / shard).string()));
    for (const auto& [name, view] : file->tensors()) {
      if (!expected.empty()) {
        auto it = expected.find(name);
        if (it == expected.end() || it->second != shard) continue;  // stray tensor not listed for this shard
      }
      if (!ckpt->index_.emplace(name, &view).second)
        return InvalidArgument("tensor \"" + name + "\" appears in more than one shard of " + dir);
    }
    ckpt->files_.push_back(std::move(file));
  }
  for (const auto& [name, shard] : expected) {
    if (!ckpt->index_.count(name))
      return DataLoss("tensor \"" + name + "\" listed in the index is missing from shard " + shard);
  }
  EF_LOG(INFO, MODEL, "checkpoint %s: %zu tensors in %zu file(s)", dir.c_str(), ckpt->index_.size(),
         ckpt->files_.size());
  return ckpt;
}

StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::FromFiles(
    std::string origin, std::vector<std::unique_ptr<SafetensorsFile>> files,
    const std::vector<std::pair<std::string, std::string>>& aliases) {
  auto ckpt = std::make_unique<Checkpoint>();
  ckpt->dir_ = std::move(origin);
  for (auto& file : files) {
    for (const auto& [name, view] : file->tensors()) {
      if (!ckpt->index_.emplace(name, &view).second)
        return InvalidArgument("tensor \"" + name + "\" appears in more than one file of " + ckpt->dir_);
    }
    ckpt->files_.push_back(std::move(file));
  }
  for (const auto& [name, target] : aliases) {
    const TensorView* t = ckpt->Find(target);
    if (t == nullptr)
      return NotFound("alias \"" + name + "\" names tensor \"" + target + "\", which " + ckpt->dir_ + " lacks");
    TensorView view = *t;
    view.name = name;
    auto [it, fresh] = ckpt->aliases_.emplace(name, std::move(view));
    if (!fresh || !ckpt->index_.emplace(name, &it->second).second)
      return InvalidArgument("alias \"" + name + "\" names a tensor " + ckpt->dir_ + " already has");
  }
  EF_LOG(INFO, MODEL, "checkpoint %s: %zu tensors in %zu file(s) in memory, %zu of them repeating another's bytes",
         ckpt->dir_.c_str(), ckpt->index_.size(), ckpt->files_.size(), ckpt->aliases_.size());
  return ckpt;
}

const TensorView* Checkpoint::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

StatusOr<const TensorView*> Checkpoint::Get(const std::string& name) const {
  const TensorView* v = Find(name);
  if (!v) return NotFound("tensor \"" + name + "\" is missing from the checkpoint in " + dir_);
  return v;
}

}  // namespace ef::runtime
