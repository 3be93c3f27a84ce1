// ExpertPlacement: a static plan of where each routed expert lives and where it is computed.
//
// Home ranks hold an expert's weights in host memory (registered for peers' UCX gets); there are
// `replication` of them, consecutive ranks starting at the primary home. Compute ranks run the
// expert's GEMMs for the tokens routed to it: a token on rank s goes to compute replica
// (s mod replicas) so replicas share the load deterministically. By default the compute ranks
// are the home ranks; a different compute policy (compute_placement) makes ranks compute experts
// they are not home for, which they then fetch from a home rank (the peer tier).
//
// Policies: contiguous (expert e -> rank e * N / E, blocks), round_robin (e mod N), or a JSON
// file (written by `expertflow place`, placement/expert_layout.h):
//   {"num_ranks": N, "home": [[rank per expert] per MoE layer],
//    "replicas": [{"layer": m, "expert": e, "ranks": [extra home ranks]}, ...]}
// or {"home": [rank per expert]} (every MoE layer). Rows index MoE layers in order (a model's dense
// layers have none), like a routing trace's layers. "num_ranks" and "replicas" are optional; a file
// for another rank count, layer count or expert count is an error naming the file and the field.
// A file must be balanced: every rank holds floor or ceil of (copies / N) expert copies of each
// layer (copies = experts + replicas), so no rank's host shard or compute is a multiple of another's.
// "replicas" gives an expert extra home ranks, each computing it for the tokens of ranks that hold
// a copy themselves (those rows do not travel) and the others spread over the copies by source
// rank; it excludes cluster.replication > 1.
// Plain data, immutable after Create; thread-safe to read.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "runtime/core/status.h"

namespace ef::comm {

struct PlacementOptions {
  std::string placement = "contiguous";    // contiguous | round_robin | JSON file path
  std::string compute_placement = "home";  // home | contiguous | round_robin
  int replication = 1;                     // 1..world size
  // static: the compute ranks above, every step; planned: per MoE layer the ranks re-plan from the
  // step's row counts (comm/row_balancer.h), starting from the static compute ranks.
  std::string mode = "static";
  double max_imbalance = 1.15;  // planned: busiest rank's rows / mean rows to aim for, >= 1
};

class ExpertPlacement {
 public:
  // num_layers: decoder layers; every method takes decoder layer indices. moe_layers: the decoder
  // layers that are MoE layers, in order (empty: all), which a file's rows map to.
  static StatusOr<ExpertPlacement> Create(const PlacementOptions& options, int world_size, int num_layers,
                                          int num_experts, const std::vector<int>& moe_layers = {});

  int world_size() const { return world_size_; }
  int replication() const { return replication_; }
  // Home ranks of (layer, expert), primary first.
  std::vector<int> HomeRanks(int layer, int expert) const;
  int PrimaryHome(int layer, int expert) const { return home_[Index(layer, expert)]; }
  bool IsHome(int rank, int layer, int expert) const;
  // The rank that computes expert `expert` of `layer` for tokens that live on `source_rank`.
  int ComputeRank(int layer, int expert, int source_rank) const;
  // Whether this placement ever computes an expert on a rank that is not its home (planned mode
  // over several ranks may: a rank computes its own tokens' rows of any expert).
  bool NeedsPeerFetch() const;
  bool planned() const { return planned_; }
  double max_imbalance() const { return max_imbalance_; }
  std::string Describe() const;

 private:
  size_t Index(int layer, int expert) const { return static_cast<size_t>(layer) * num_experts_ + expert; }
  int world_size_ = 1, num_layers_ = 0, num_experts_ = 0, replication_ = 1;
  bool planned_ = false;
  double max_imbalance_ = 1.15;
  std::string policy_, compute_policy_;
  int first_moe_layer_ = 0;                 // the layer Describe shows
  std::vector<int> home_;                   // primary home per (layer, expert)
  std::vector<int> compute_;                // primary compute rank per (layer, expert)
  std::vector<std::vector<int>> replicas_;  // a file's extra homes per (layer, expert); empty: none
};

}  // namespace ef::comm
