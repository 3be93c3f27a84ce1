#include "comm/expert_placement.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace ef::comm {
namespace {

int Policy(const std::string& p, int e, int num_experts, int world) {
  if (p == "round_robin") return e % world;
  return static_cast<int>(static_cast<int64_t>(e) * world / num_experts);  // contiguous
}

struct FileHomes {
  std::vector<int> home;                   // [decoder layer * E + e]
  std::vector<std::vector<int>> replicas;  // same index; empty when the file has none
};

// Every rank must hold floor or ceil of (copies / world) experts of each MoE layer.
Status CheckBalance(const std::string& path, const FileHomes& f, int world, int num_experts,
                    const std::vector<int>& moe_layers) {
  for (size_t m = 0; m < moe_layers.size(); ++m) {
    std::vector<int> copies(world, 0);
    const size_t base = static_cast<size_t>(moe_layers[m]) * num_experts;
    for (int e = 0; e < num_experts; ++e) {
      ++copies[f.home[base + e]];
      if (!f.replicas.empty())
        for (int r : f.replicas[base + e]) ++copies[r];
    }
    int total = 0;
    for (int c : copies) total += c;
    const int lo = total / world, hi = (total + world - 1) / world;
    for (int r = 0; r < world; ++r) {
      if (copies[r] >= lo && copies[r] <= hi) continue;
      return InvalidArgument(path + ": \"home\" row " + std::to_string(m) + " (MoE layer " + std::to_string(m) +
                             ") puts " + std::to_string(copies[r]) + " expert copies on rank " + std::to_string(r) +
                             "; a placement must be balanced, " +
                             (lo == hi ? std::to_string(lo) : std::to_string(lo) + " or " + std::to_string(hi)) +
                             " per rank (" + std::to_string(total) + " copies over " + std::to_string(world) +
                             " ranks; expertflow place writes balanced files)");
    }
  }
  return Status::Ok();
}

Status LoadReplicas(const std::string& path, const nlohmann::json& list, int world, int num_experts,
                    const std::vector<int>& moe_layers, FileHomes* f) {
  if (!list.is_array()) return InvalidArgument(path + ": \"replicas\" must be a list of {layer, expert, ranks}");
  f->replicas.assign(f->home.size(), {});
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& r = list[i];
    const std::string where = path + ": \"replicas\"[" + std::to_string(i) + "]";
    if (!r.is_object() || !r.contains("layer") || !r["layer"].is_number_integer() || !r.contains("expert") ||
        !r["expert"].is_number_integer() || !r.contains("ranks") || !r["ranks"].is_array())
      return InvalidArgument(where + ": expected {\"layer\": MoE layer, \"expert\": id, \"ranks\": [ranks]}");
    const int m = r["layer"].get<int>(), e = r["expert"].get<int>();
    if (m < 0 || m >= static_cast<int>(moe_layers.size()))
      return InvalidArgument(where + ": \"layer\" " + std::to_string(m) + " is not an MoE layer in [0, " +
                             std::to_string(moe_layers.size()) + ")");
    if (e < 0 || e >= num_experts)
      return InvalidArgument(where + ": \"expert\" " + std::to_string(e) + " out of [0, " +
                             std::to_string(num_experts) + ")");
    const size_t idx = static_cast<size_t>(moe_layers[m]) * num_experts + e;
    for (const auto& x : r["ranks"]) {
      if (!x.is_number_integer() || x.get<int>() < 0 || x.get<int>() >= world)
        return InvalidArgument(where + ": \"ranks\" must be ranks in [0, " + std::to_string(world) + ")");
      const int rank = x.get<int>();
      auto& extra = f->replicas[idx];
      if (rank == f->home[idx] || std::find(extra.begin(), extra.end(), rank) != extra.end())
        return InvalidArgument(where + ": rank " + std::to_string(rank) + " already holds expert " + std::to_string(e) +
                               " of MoE layer " + std::to_string(m));
      extra.push_back(rank);
    }
  }
  return Status::Ok();
}

StatusOr<FileHomes> LoadFile(const std::string& path, int world, int num_layers, int num_experts,
                             const std::vector<int>& moe_layers, int replication) {
  std::ifstream in(path);
  if (!in) return NotFound("cannot open placement file " + path + " (placement: contiguous|round_robin|FILE)");
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("home") || !j["home"].is_array())
    return InvalidArgument(path + ": expected {\"home\": [[rank per expert] per MoE layer]} or {\"home\": [ranks]}");
  if (j.contains("num_ranks") && (!j["num_ranks"].is_number_integer() || j["num_ranks"].get<int>() != world))
    return InvalidArgument(path + ": \"num_ranks\" is " + j["num_ranks"].dump() + " but this run has " +
                           std::to_string(world) + " ranks (write one for " + std::to_string(world) +
                           ": expertflow place --ranks " + std::to_string(world) + ")");
  const auto& h = j["home"];
  const int num_moe = static_cast<int>(moe_layers.size());
  FileHomes f;
  f.home.assign(static_cast<size_t>(num_layers) * num_experts, 0);
  auto row = [&](const nlohmann::json& r, int m) -> Status {
    const std::string name = "\"home\" row " + std::to_string(m);
    if (!r.is_array() || static_cast<int>(r.size()) != num_experts)
      return InvalidArgument(path + ": " + name + " must list " + std::to_string(num_experts) +
                             " ranks (one per expert of the model), got " +
                             (r.is_array() ? std::to_string(r.size()) : std::string("no list")));
    for (int e = 0; e < num_experts; ++e) {
      if (!r[e].is_number_integer() || r[e].get<int>() < 0 || r[e].get<int>() >= world)
        return InvalidArgument(path + ": " + name + ": home rank of expert " + std::to_string(e) + " must be in [0, " +
                               std::to_string(world) + "), got " + r[e].dump());
      f.home[static_cast<size_t>(moe_layers[m]) * num_experts + e] = r[e].get<int>();
    }
    return Status::Ok();
  };
  if (!h.empty() && h[0].is_array()) {
    if (static_cast<int>(h.size()) != num_moe)
      return InvalidArgument(path + ": \"home\" has " + std::to_string(h.size()) + " rows, the model has " +
                             std::to_string(num_moe) +
                             " MoE layers (rows are MoE layers in order, dense layers have "
                             "none)");
    for (int m = 0; m < num_moe; ++m) EF_RETURN_IF_ERROR(row(h[m], m));
  } else {
    for (int m = 0; m < num_moe; ++m) EF_RETURN_IF_ERROR(row(h, m));
  }
  if (j.contains("replicas")) {
    if (replication > 1)
      return InvalidArgument(path + ": \"replicas\" and cluster.replication " + std::to_string(replication) +
                             " both replicate experts; use one");
    EF_RETURN_IF_ERROR(LoadReplicas(path, j["replicas"], world, num_experts, moe_layers, &f));
  }
  if (replication == 1) EF_RETURN_IF_ERROR(CheckBalance(path, f, world, num_experts, moe_layers));
  return f;
}

}  // namespace

StatusOr<ExpertPlacement> ExpertPlacement::Create(const PlacementOptions& o, int world, int num_layers, int num_experts,
                                                  const std::vector<int>& moe_layers_in) {
  if (world < 1 || num_experts < 1) return InvalidArgument("placement needs at least one rank and one expert");
  if (o.replication < 1 || o.replication > world)
    return InvalidArgument("cluster.replication must be in [1, " + std::to_string(world) + "] for " +
                           std::to_string(world) + " ranks, got " + std::to_string(o.replication));
  if (o.compute_placement != "home" && o.compute_placement != "contiguous" && o.compute_placement != "round_robin")
    return InvalidArgument("unknown compute placement '" + o.compute_placement + "'");
  if (o.mode != "static" && o.mode != "planned")
    return InvalidArgument("cluster.placement_mode: unknown value '" + o.mode + "' (static|planned)");
  if (!(o.max_imbalance >= 1))
    return InvalidArgument("cluster.planned_max_imbalance must be >= 1, got " + std::to_string(o.max_imbalance));
  ExpertPlacement p;
  p.planned_ = o.mode == "planned";
  p.max_imbalance_ = o.max_imbalance;
  p.world_size_ = world;
  p.num_layers_ = num_layers;
  p.num_experts_ = num_experts;
  p.replication_ = o.replication;
  p.policy_ = o.placement;
  p.compute_policy_ = o.compute_placement;
  p.first_moe_layer_ = moe_layers_in.empty() ? 0 : std::clamp(moe_layers_in.front(), 0, std::max(num_layers - 1, 0));
  const size_t n = static_cast<size_t>(num_layers) * num_experts;
  if (o.placement == "contiguous" || o.placement == "round_robin") {
    p.home_.resize(n);
    for (int l = 0; l < num_layers; ++l)
      for (int e = 0; e < num_experts; ++e) p.home_[p.Index(l, e)] = Policy(o.placement, e, num_experts, world);
  } else {
    std::vector<int> moe_layers = moe_layers_in;
    if (moe_layers.empty())
      for (int l = 0; l < num_layers; ++l) moe_layers.push_back(l);
    EF_ASSIGN_OR_RETURN(FileHomes f, LoadFile(o.placement, world, num_layers, num_experts, moe_layers, o.replication));
    p.home_ = std::move(f.home);
    p.replicas_ = std::move(f.replicas);
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
  if (!replicas_.empty()) {
    r.push_back(h);
    r.insert(r.end(), replicas_[Index(layer, expert)].begin(), replicas_[Index(layer, expert)].end());
    return r;
  }
  for (int i = 0; i < replication_; ++i) r.push_back((h + i) % world_size_);
  return r;
}

bool ExpertPlacement::IsHome(int rank, int layer, int expert) const {
  const int h = home_[Index(layer, expert)];
  if (!replicas_.empty()) {
    const auto& x = replicas_[Index(layer, expert)];
    return rank == h || std::find(x.begin(), x.end(), rank) != x.end();
  }
  return ((rank - h) % world_size_ + world_size_) % world_size_ < replication_;
}

int ExpertPlacement::ComputeRank(int layer, int expert, int source_rank) const {
  const int c = compute_[Index(layer, expert)];
  if (!replicas_.empty() && compute_policy_ == "home" && !replicas_[Index(layer, expert)].empty()) {
    // A rank holding a copy computes its own tokens' rows; the others spread over the copies.
    if (IsHome(source_rank, layer, expert)) return source_rank;
    const auto& x = replicas_[Index(layer, expert)];
    const size_t i = static_cast<size_t>(source_rank) % (x.size() + 1);
    return i == 0 ? c : x[i - 1];
  }
  return (c + source_rank % replication_) % world_size_;
}

bool ExpertPlacement::NeedsPeerFetch() const {
  if (planned_ && world_size_ > 1) return true;
  for (int l = 0; l < num_layers_; ++l)
    for (int e = 0; e < num_experts_; ++e)
      for (int s = 0; s < world_size_; ++s)
        if (!IsHome(ComputeRank(l, e, s), l, e)) return true;
  return false;
}

std::string ExpertPlacement::Describe() const {
  // The first MoE layer's (a dense layer's row is all zeros).
  const int l = first_moe_layer_;
  std::string s = std::string(planned_ ? "planned per layer from " : "") + "home " + policy_ + ", compute " +
                  compute_policy_ + ", replication " + std::to_string(replication_) + ", layer " + std::to_string(l) +
                  " homes [";
  for (int e = 0; e < num_experts_; ++e) {
    if (e) s.push_back(' ');
    s.append(std::to_string(home_[Index(l, e)]));
  }
  s.append("] computes [");
  for (int e = 0; e < num_experts_; ++e) {
    if (e) s.push_back(' ');
    s.append(std::to_string(compute_[Index(l, e)]));
  }
  s.push_back(']');
  return s;
}

}  // namespace ef::comm
