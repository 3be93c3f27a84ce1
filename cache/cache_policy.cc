#include "cache/cache_policy.h"

#include "cache/belady_policy.h"
#include "cache/expertflow_policy.h"
#include "cache/lfu_policy.h"
#include "cache/lru_policy.h"
#include "cache/static_policy.h"

namespace ef::cache {

const std::vector<std::string>& CachePolicyNames() {
  static const std::vector<std::string> names = {"lru", "lfu", "belady", "static", "expertflow"};
  return names;
}

StatusOr<std::unique_ptr<CachePolicy>> MakeCachePolicy(std::string_view name, const PolicyConfig& config) {
  if (config.num_layers <= 0 || config.num_experts <= 0)
    return InvalidArgument("cache policy '" + std::string(name) + "': num_layers (" +
                           std::to_string(config.num_layers) + ") and num_experts (" +
                           std::to_string(config.num_experts) + ") must be positive");
  const size_t n = static_cast<size_t>(config.num_layers) * config.num_experts;
  if (name == "lru") return std::unique_ptr<CachePolicy>(new LruPolicy(config));
  if (name == "lfu") return std::unique_ptr<CachePolicy>(new LfuPolicy(config));
  if (name == "belady") {
    if (config.future.empty())
      return InvalidArgument("cache policy 'belady' needs the future access sequence (offline analysis only)");
    for (const ExpertKey& k : config.future) {
      if (k.layer < 0 || k.layer >= config.num_layers || k.expert < 0 || k.expert >= config.num_experts)
        return InvalidArgument("cache policy 'belady': future access (layer " + std::to_string(k.layer) + ", expert " +
                               std::to_string(k.expert) + ") out of range");
    }
    return std::unique_ptr<CachePolicy>(new BeladyPolicy(config));
  }
  if (name == "static") {
    if (config.counts.size() != n)
      return InvalidArgument("cache policy 'static' needs " + std::to_string(n) +
                             " expert counts (num_layers x num_experts), got " + std::to_string(config.counts.size()));
    return std::unique_ptr<CachePolicy>(new StaticPolicy(config));
  }
  if (name == "expertflow") return std::unique_ptr<CachePolicy>(new ExpertflowPolicy(config));
  std::string valid;
  for (const auto& v : CachePolicyNames()) valid += (valid.empty() ? "" : ", ") + v;
  return InvalidArgument("unknown cache policy '" + std::string(name) + "' (valid: " + valid + ")");
}

}  // namespace ef::cache
