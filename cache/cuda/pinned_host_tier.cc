#include "cache/cuda/pinned_host_tier.h"

#include <algorithm>
#include <string>

#include "runtime/core/progress.h"

namespace ef::cache {

StatusOr<std::unique_ptr<PinnedHostTier>> PinnedHostTier::Create(int num_layers, int num_experts,
                                                                 size_t bytes_per_expert,
                                                                 const std::vector<bool>& present, size_t max_bytes,
                                                                 const std::function<bool(int, int)>& keep,
                                                                 const std::vector<size_t>& layer_bytes) {
  if (num_layers < 1 || num_experts < 1 || bytes_per_expert == 0 || present.size() != static_cast<size_t>(num_layers))
    return InvalidArgument("pinned host tier: bad shape");
  if (!layer_bytes.empty() &&
      (layer_bytes.size() != static_cast<size_t>(num_layers) ||
       std::any_of(layer_bytes.begin(), layer_bytes.end(), [&](size_t b) { return b > bytes_per_expert; })))
    return InvalidArgument("pinned host tier: per-layer expert bytes of another shape, or past the largest expert");
  auto t = std::unique_ptr<PinnedHostTier>(new PinnedHostTier());
  t->num_layers_ = num_layers;
  t->num_experts_ = num_experts;
  t->bytes_ = bytes_per_expert;
  t->layer_bytes_ =
      layer_bytes.empty() ? std::vector<size_t>(static_cast<size_t>(num_layers), bytes_per_expert) : layer_bytes;
  for (int l = 0; l < num_layers; ++l)
    if (present[l] && t->layer_bytes_[l] == 0) return InvalidArgument("pinned host tier: a layer of 0-byte experts");
  t->buffers_.assign(static_cast<size_t>(num_layers) * num_experts, nullptr);
  t->kind_ = runtime::cuda::DefaultPinnedKind();
  // What one expert's buffer pins (huge pages round it up to 2 MiB): the budget counts that.
  auto pinned = [&t](int l) { return runtime::cuda::PinnedBytes(t->layer_bytes_[l], t->kind_); };
  // Pinning takes the driver a while per GB (it locks every page): shown like the fill that follows.
  int64_t planned = 0;
  for (int l = 0; l < num_layers; ++l)
    for (int e = 0; present[l] && e < num_experts; ++e)
      if (!keep || keep(l, e)) planned += static_cast<int64_t>(pinned(l));
  if (max_bytes > 0) planned = std::min<int64_t>(planned, static_cast<int64_t>(max_bytes));
  Progress bar(std::string("allocating pinned host memory (") + runtime::cuda::PinnedKindName(t->kind_) + ")", planned);
  for (int l = 0; l < num_layers; ++l) {
    if (!present[l]) continue;
    for (int e = 0; e < num_experts; ++e) {
      if (keep && !keep(l, e)) continue;
      // Layers may differ in size: a smaller expert of a later layer may still fit.
      if (max_bytes > 0 && t->total_ + pinned(l) > max_bytes) continue;
      StatusOr<void*> p = runtime::cuda::AllocatePinned(t->layer_bytes_[l], t->kind_);
      if (!p.ok())
        return ResourceExhausted("pinned host tier: " + p.status().message() + ", after " + std::to_string(t->total_) +
                                 " bytes pinned");
      t->buffers_[static_cast<size_t>(l) * num_experts + e] = static_cast<std::byte*>(*p);
      t->total_ += pinned(l);
      ++t->num_pinned_;
      bar.Advance(static_cast<int64_t>(pinned(l)));
    }
  }
  return t;
}

PinnedHostTier::~PinnedHostTier() {
  for (size_t i = buffers_.size(); i-- > 0;)
    runtime::cuda::FreePinned(buffers_[i], layer_bytes_[i / static_cast<size_t>(num_experts_)], kind_);
}

}  // namespace ef::cache
