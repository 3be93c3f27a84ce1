#include "cache/cuda/pinned_host_tier.h"

#include <algorithm>
#include <string>

#include "runtime/core/progress.h"

namespace ef::cache {

StatusOr<std::unique_ptr<PinnedHostTier>> PinnedHostTier::Create(int num_layers, int num_experts,
                                                                 size_t bytes_per_expert,
                                                                 const std::vector<bool>& present, size_t max_bytes,
                                                                 const std::function<bool(int, int)>& keep) {
  if (num_layers < 1 || num_experts < 1 || bytes_per_expert == 0 || present.size() != static_cast<size_t>(num_layers))
    return InvalidArgument("pinned host tier: bad shape");
  auto t = std::unique_ptr<PinnedHostTier>(new PinnedHostTier());
  t->num_layers_ = num_layers;
  t->num_experts_ = num_experts;
  t->bytes_ = bytes_per_expert;
  t->buffers_.assign(static_cast<size_t>(num_layers) * num_experts, nullptr);
  t->kind_ = runtime::cuda::DefaultPinnedKind();
  // What one expert's buffer pins (huge pages round it up to 2 MiB): the budget counts that.
  const size_t pinned = runtime::cuda::PinnedBytes(bytes_per_expert, t->kind_);
  // Pinning takes the driver a while per GB (it locks every page): shown like the fill that follows.
  int64_t planned = 0;
  for (int l = 0; l < num_layers; ++l)
    for (int e = 0; present[l] && e < num_experts; ++e)
      if (!keep || keep(l, e)) planned += static_cast<int64_t>(pinned);
  if (max_bytes > 0) planned = std::min<int64_t>(planned, static_cast<int64_t>(max_bytes / pinned * pinned));
  Progress bar(std::string("allocating pinned host memory (") + runtime::cuda::PinnedKindName(t->kind_) + ")", planned);
  for (int l = 0; l < num_layers; ++l) {
    if (!present[l]) continue;
    for (int e = 0; e < num_experts; ++e) {
      if (keep && !keep(l, e)) continue;
      if (max_bytes > 0 && t->total_ + pinned > max_bytes) return t;
      StatusOr<void*> p = runtime::cuda::AllocatePinned(bytes_per_expert, t->kind_);
      if (!p.ok())
        return ResourceExhausted("pinned host tier: " + p.status().message() + ", after " + std::to_string(t->total_) +
                                 " bytes pinned");
      t->buffers_[static_cast<size_t>(l) * num_experts + e] = static_cast<std::byte*>(*p);
      t->total_ += pinned;
      ++t->num_pinned_;
      bar.Advance(static_cast<int64_t>(pinned));
    }
  }
  return t;
}

PinnedHostTier::~PinnedHostTier() {
  for (auto it = buffers_.rbegin(); it != buffers_.rend(); ++it) runtime::cuda::FreePinned(*it, bytes_, kind_);
}

}  // namespace ef::cache
