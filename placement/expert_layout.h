// ExpertLayout: which ranks hold each routed expert of each MoE layer, and the all-to-all cost of
// a layout on a routing trace.
//
// Layers are MoE layers (a routing trace's layers, in order), not decoder layers: a model with
// dense first layers has fewer rows than decoder layers. ToJson() writes the placement file that
// `cluster.placement` / `--placement` read (comm/expert_placement.h):
//   {"num_ranks": R, "layers": "moe", "home": [[rank per expert] per MoE layer],
//    "replicas": [{"layer": m, "expert": e, "ranks": [extra ranks]}, ...]}   (replicas optional)
//
// Cost model (RemoteRanksPerTokenLayer): attention is data-parallel, so a token's hidden state
// crosses to every rank that computes one of its top-k experts other than the rank it lives on.
// The cost of one token at one layer is the number of distinct ranks among its experts' ranks
// beyond the first: it assumes the token lives on one of those ranks, so the count does not
// depend on where tokens are (it is the hypergraph "connectivity - 1" metric). Were tokens spread
// uniformly over R ranks instead, the expected number of remote ranks would be
// distinct * (1 - 1/R), the same ordering of layouts. A replicated expert costs nothing when one
// of its copies sits on a rank the token already reaches (replicas are chosen greedily per token).
//
// This cost is separable by layer, so it does not reward cross-layer affinity. PinnedRemoteRanks
// does: each sequence lives on one rank for all layers (data-parallel attention with a locality
// request->rank assignment) and every expert rank other than that one is remote.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <vector>

#include "placement/routing_trace.h"

namespace ef::placement {

struct ExpertLayout {
  int num_layers = 0;  // MoE layers
  int num_experts = 0;
  int num_ranks = 1;
  // ranks[layer * num_experts + expert]: the ranks holding it, primary (home) first; at least one.
  std::vector<std::vector<int>> ranks;

  static ExpertLayout Contiguous(int num_layers, int num_experts, int num_ranks);  // e * R / E
  static ExpertLayout RoundRobin(int num_layers, int num_experts, int num_ranks);  // e mod R
  const std::vector<int>& RanksOf(int layer, int expert) const {
    return ranks[static_cast<size_t>(layer) * num_experts + expert];
  }
  int Home(int layer, int expert) const { return RanksOf(layer, expert)[0]; }
  // Expert copies held by `rank` at `layer` (primaries and replicas).
  int CopiesOn(int layer, int rank) const;
  nlohmann::json ToJson() const;
};

// Mean over the trace's token-layers of (distinct ranks among the token's experts - 1).
double RemoteRanksPerTokenLayer(const RoutingTrace& trace, const ExpertLayout& layout);

// Each sequence is assigned to one rank (at most ceil(sequences / R) per rank, greedily by how many
// of its (layer, expert) activations a rank holds); mean over token-layers of the number of ranks
// among the token's experts' ranks other than its sequence's rank.
double PinnedRemoteRanks(const RoutingTrace& trace, const ExpertLayout& layout);

}  // namespace ef::placement
