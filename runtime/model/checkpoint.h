// A Hugging Face checkpoint directory's weights: one model.safetensors, or the shards listed in
// model.safetensors.index.json. Every shard is mapped and validated at Open; tensors are looked
// up by name across shards without copying. FromFiles assembles one from files held in memory
// (benchmarks' synthetic weights, generated without touching disk).
//
// Thread-safe after Open (immutable).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/model/safetensors_file.h"

namespace ef::runtime {

// The weight_map of a model.safetensors.index.json: tensor name -> shard file name. Every shard
// name must be a plain file name (not empty or ".", no '/' and no ".."), so an index cannot point outside its
// directory. `origin` names the index in errors.
StatusOr<std::map<std::string, std::string>> ParseCheckpointIndex(const std::string& text, const std::string& origin);

class Checkpoint {
 public:
  // dir holds model.safetensors or model.safetensors.index.json (the index wins when both exist).
  static StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);
  // The tensors of `files` (SafetensorsFile::FromBytes), plus `aliases`: (name, target) pairs, a
  // tensor called name whose view is target's bytes (a layer that repeats another's weights).
  // `origin` stands for the directory in errors. A name in two files, or an alias that names an
  // existing tensor or a missing target, is refused.
  static StatusOr<std::unique_ptr<Checkpoint>> FromFiles(
      std::string origin, std::vector<std::unique_ptr<SafetensorsFile>> files,
      const std::vector<std::pair<std::string, std::string>>& aliases = {});

  const std::string& dir() const { return dir_; }
  // The tensor, or a NotFound error naming it and the checkpoint.
  StatusOr<const TensorView*> Get(const std::string& name) const;
  const TensorView* Find(const std::string& name) const;
  bool Has(const std::string& name) const { return Find(name) != nullptr; }
  size_t num_tensors() const { return index_.size(); }
  // Every tensor's name, in order.
  std::vector<std::string> names() const;
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
  std::map<std::string, TensorView> aliases_;  // FromFiles' aliases (node addresses are stable)
};

}  // namespace ef::runtime
