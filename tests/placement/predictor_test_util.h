// Helpers shared by the placement predictor tests: temp dirs and synthetic traces.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "placement/routing_trace.h"

namespace ef::placement::testing {

inline std::filesystem::path TempDir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("ef_placement_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return dir;
}

inline void WriteText(const std::filesystem::path& p, const std::string& text) {
  std::ofstream out(p);
  out << text;
}

// A synthetic top-2 prefill trace of num_seqs x seq_len tokens; route(rng, token) fills the
// token's id and its experts (layer by layer, 2 per layer).
template <typename Route>
RoutingTrace SyntheticTrace(int num_seqs, int seq_len, int num_layers, int num_experts, uint32_t seed, Route route) {
  RoutingTrace tr;
  tr.header.model = "synthetic";
  tr.header.num_layers = num_layers;
  tr.header.num_experts = num_experts;
  tr.header.top_k = 2;
  tr.header.phase = "prefill";
  std::mt19937 rng(seed);
  for (int s = 0; s < num_seqs; ++s) {
    for (int p = 0; p < seq_len; ++p) {
      TraceToken t;
      t.seq = s;
      t.pos = p;
      route(rng, t);
      tr.tokens.push_back(std::move(t));
    }
  }
  return tr;
}

// A trace with a planted rule: token t at layer l routes to experts (3t + l) % E and
// (5t + 2l + 1) % E, the second moved on by one where the two coincide (a router's experts are
// distinct). Token ids are random in [0, vocab).
inline RoutingTrace PlantedTrace(int num_seqs, int seq_len, int num_layers, int num_experts, int vocab, uint32_t seed) {
  return SyntheticTrace(num_seqs, seq_len, num_layers, num_experts, seed, [&](std::mt19937& rng, TraceToken& t) {
    t.token = static_cast<int64_t>(rng() % vocab);
    for (int l = 0; l < num_layers; ++l) {
      const int a = static_cast<int>((3 * t.token + l) % num_experts);
      int b = static_cast<int>((5 * t.token + 2 * l + 1) % num_experts);
      if (b == a) b = (b + 1) % num_experts;  // a router's two experts are distinct
      t.experts.push_back(static_cast<int16_t>(a));
      t.experts.push_back(static_cast<int16_t>(b));
    }
  });
}

// A trace whose token ids say nothing: layer 0 routes each token to a random even expert x and a
// random odd expert y, and every later layer l to (x + 2l) % E and (y + 2l) % E. Only the
// observed path tells what comes next.
inline RoutingTrace PathRuleTrace(int num_seqs, int seq_len, int num_layers, int num_experts, uint32_t seed) {
  return SyntheticTrace(num_seqs, seq_len, num_layers, num_experts, seed, [&](std::mt19937& rng, TraceToken& t) {
    t.token = static_cast<int64_t>(rng() % 50);
    const int x = 2 * static_cast<int>(rng() % (num_experts / 2));
    const int y = 1 + 2 * static_cast<int>(rng() % (num_experts / 2));
    for (int l = 0; l < num_layers; ++l) {
      t.experts.push_back(static_cast<int16_t>((x + 2 * l) % num_experts));
      t.experts.push_back(static_cast<int16_t>((y + 2 * l) % num_experts));
    }
  });
}

}  // namespace ef::placement::testing
