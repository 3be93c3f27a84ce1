// ExpertKey: names one expert of one MoE layer. The unit every cache structure tracks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace ef::cache {

struct ExpertKey {
  int layer = 0;
  int expert = 0;

  friend bool operator==(const ExpertKey&, const ExpertKey&) = default;
  // Dense index layer-major, for per-(layer, expert) arrays of size num_layers * num_experts.
  size_t Index(int num_experts) const { return static_cast<size_t>(layer) * num_experts + expert; }
};

}  // namespace ef::cache

template <>
struct std::hash<ef::cache::ExpertKey> {
  size_t operator()(const ef::cache::ExpertKey& k) const noexcept {
    return std::hash<uint64_t>()((static_cast<uint64_t>(static_cast<uint32_t>(k.layer)) << 32) |
                                 static_cast<uint32_t>(k.expert));
  }
};
