#include "comm/expert_placement.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace ef::comm {
namespace {

int Policy(const std::string& p, int e, int num_experts, int world) {
  if (p == "round_robin") return e % world;
  return static_cast<int>(static_cast<int64_t>(e) * world / num_experts);  // contiguous
}

StatusOr<std::vector<int>> LoadFile(const std::string& path, int world, int num_layers, int num_experts) {
  std::ifstream in(path);
  if (!in) return NotFound("cannot open placement file " + path + " (placement: contiguous|round_robin|FILE)");
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("home") || !j["home"].is_array())
    return InvalidArgument(path + ": expected {\"home\": [[rank per expert] per layer]} or {\"home\": [ranks]}");
  const auto& h = j["home"];
  std::vector<int> home(static_cast<size_t>(num_layers) * num_experts, 0);
  auto row = [&](const nlohmann::json& r, int layer) -> Status {
    if (!r.is_array() || static_cast<int>(r.size()) != num_experts)
      return InvalidArgument(path + ": each row must list " + std::to_string(num_experts) + " ranks");
    for (int e = 0; e < num_experts; ++e) {
      if (!r[e].is_number_integer() || r[e].get<int>() < 0 || r[e].get<int>() >= world)
        return InvalidArgument(path + ": home rank of expert " + std::to_string(e) + " must be in [0, " +
                               std::to_string(world) + ")");
      home[static_cast<size_t>(layer) * num_experts + e] = r[e].get<int>();
    }
    return Status::Ok();
  };
  if (!h.empty() && h[0].is_array()) {
    if (static_cast<int>(h.size()) != num_layers)
      return InvalidArgument(path + ": expected one row per decoder layer (" + std::to_string(num_layers) + ")");
    for (int l = 0; l < num_layers; ++l) EF_RETURN_IF_ERROR(row(h[l], l));
  } else {
    for (int l = 0; l < num_layers; ++l) EF_RETURN_IF_ERROR(row(h, l));
  }
  return home;
}

}  // namespace

StatusOr<ExpertPlacement> ExpertPlacement::Create(const PlacementOptions& o, int world, int num_layers,
                                                  int num_experts) {
  if (world < 1 || num_experts < 1) return InvalidArgument("placement needs at least one rank and one expert");
  if (o.replication < 1 || o.replication > world)
    return InvalidArgument("cluster.replication must be in [1, " + std::to_string(world) + "] for " +
                           std::to_string(world) + " ranks, got " + std::to_string(o.replication));
  if (o.compute_placement != "home" && o.compute_placement != "contiguous" && o.compute_placement != "round_robin")
    return InvalidArgument("unknown compute placement '" + o.compute_placement + "'");
  ExpertPlacement p;
  p.world_size_ = world;
  p.num_layers_ = num_layers;
  p.num_experts_ = num_experts;
  p.replication_ = o.replication;
  p.policy_ = o.placement;
  p.compute_policy_ = o.compute_placement;
  const size_t n = static_cast<size_t>(num_layers) * num_experts;
  if (o.placement == "contiguous" || o.placement == "round_robin") {
    p.home_.resize(n);
    for (int l = 0; l < num_layers; ++l)
      for (int e = 0; e < num_experts; ++e) p.home_[p.Index(l, e)] = Policy(o.placement, e, num_experts, world);
  } else {
    EF_ASSIGN_OR_RETURN(p.home_, LoadFile(o.placement, world, num_layers, num_experts));
  }
  p.compute_.resize(n);
  for (int l = 0; l < num_layers; ++l)
    for (int e = 0; e < num_experts; ++e)
      p.compute_[p.Index(l, e)] =
          o.compute_placement == "home" ? p.home_[p.Index(l, e)] : Policy(o.compute_placement, e, num_experts, world);
  return p;
}

std::vector<int> ExpertPlacement::HomeRanks(int layer, int expert) const {
  std::vector<int> r;
  const int h = home_[Index(layer, expert)];
  for (int i = 0; i < replication_; ++i) r.push_back((h + i) % world_size_);
  return r;
}

bool ExpertPlacement::IsHome(int rank, int layer, int expert) const {
  const int h = home_[Index(layer, expert)];
  return ((rank - h) % world_size_ + world_size_) % world_size_ < replication_;
}

int ExpertPlacement::ComputeRank(int layer, int expert, int source_rank) const {
  const int c = compute_[Index(layer, expert)];
  return (c + source_rank % replication_) % world_size_;
}

bool ExpertPlacement::NeedsPeerFetch() const {
  for (int l = 0; l < num_layers_; ++l)
    for (int e = 0; e < num_experts_; ++e)
      for (int s = 0; s < world_size_; ++s)
        if (!IsHome(ComputeRank(l, e, s), l, e)) return true;
  return false;
}

std::string ExpertPlacement::Describe() const {
  std::string s = "home " + policy_ + ", compute " + compute_policy_ + ", replication " + std::to_string(replication_) +
                  ", layer 0 homes [";
  for (int e = 0; e < num_experts_; ++e) {
    if (e) s.push_back(' ');
    s.append(std::to_string(home_[Index(0, e)]));
  }
  s.append("] computes [");
  for (int e = 0; e < num_experts_; ++e) {
    if (e) s.push_back(' ');
    s.append(std::to_string(compute_[Index(0, e)]));
  }
  s.push_back(']');
  return s;
}

}  // namespace ef::comm
