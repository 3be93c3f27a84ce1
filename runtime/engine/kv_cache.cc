#include "runtime/engine/kv_cache.h"

#include <algorithm>
#include <limits>
#include <string>

namespace ef::runtime {

StatusOr<PagedKvCache> PagedKvCache::Create(Backend* backend, const Options& options) {
  const int bs = options.block_size;
  if (bs < 1 || bs > 1024 || (bs & (bs - 1)) != 0)
    return InvalidArgument("kv cache block size must be a power of two from 1 to 1024, got " + std::to_string(bs));
  if (options.num_layers < 1 || options.key_row_bytes == 0)
    return InvalidArgument("kv cache: no layers or an empty key row");
  if (options.capacity_tokens < 0) return InvalidArgument("kv cache capacity must not be negative");
  PagedKvCache c;
  c.backend_ = backend;
  c.options_ = options;
  return c;
}

Status PagedKvCache::Grow(int64_t blocks) {
  if (blocks <= num_blocks_) return Status::Ok();
  if (blocks > std::numeric_limits<int32_t>::max()) return ResourceExhausted("kv cache: too many blocks");
  const size_t rows = static_cast<size_t>(blocks) * options_.block_size;
  const size_t old_rows = static_cast<size_t>(num_blocks_) * options_.block_size;
  std::vector<Buffer> keys, values;
  std::vector<Backend::CopyItem> copies;
  // One layer's new pool of `row_bytes` rows, holding a copy of the old one's.
  auto grow = [&](const std::vector<Buffer>& old, int layer, size_t row_bytes, std::vector<Buffer>* out) -> Status {
    auto b = backend_->Allocate(rows * row_bytes);
    if (!b.ok())
      return ResourceExhausted("kv cache: " + std::to_string(rows) + " token rows of " +
                               std::to_string(options_.num_layers) + " layers do not fit on " + backend_->name() +
                               ": " + b.status().message());
    out->push_back(std::move(b).value());
    if (num_blocks_ > 0) copies.push_back({out->back().data(), old[layer].data(), old_rows * row_bytes});
    return Status::Ok();
  };
  for (int l = 0; l < options_.num_layers; ++l) {
    EF_RETURN_IF_ERROR(grow(keys_, l, options_.key_row_bytes, &keys));
    if (options_.value_row_bytes > 0) EF_RETURN_IF_ERROR(grow(values_, l, options_.value_row_bytes, &values));
  }
  if (!copies.empty()) backend_->CopyBatch(copies.data(), static_cast<int>(copies.size()));
  keys_ = std::move(keys);  // the old pools free after the copies (ordered on the backend's stream)
  values_ = std::move(values);
  // The new ids go under the free ones, lowest on top.
  std::vector<int32_t> free;
  for (int64_t b = blocks - 1; b >= num_blocks_; --b) free.push_back(static_cast<int32_t>(b));
  free.insert(free.end(), free_.begin(), free_.end());
  free_ = std::move(free);
  num_blocks_ = blocks;
  return backend_->status();
}

Status PagedKvCache::AllocateCapacity() {
  if (options_.capacity_tokens <= 0) return Status::Ok();
  return Grow(BlocksFor(options_.capacity_tokens));
}

Status PagedKvCache::Reserve(std::vector<int32_t>* blocks, int64_t tokens) {
  std::vector<int32_t>* tables[] = {blocks};
  const int64_t want[] = {tokens};
  return ReserveAll(tables, want);
}

Status PagedKvCache::ReserveAll(std::span<std::vector<int32_t>* const> tables, std::span<const int64_t> tokens) {
  int64_t need = 0;
  for (size_t i = 0; i < tables.size(); ++i)
    need += std::max<int64_t>(0, BlocksFor(tokens[i]) - static_cast<int64_t>(tables[i]->size()));
  if (need == 0) return Status::Ok();
  if (need > free_blocks()) {
    const int64_t want = num_blocks_ + need - free_blocks();
    if (options_.capacity_tokens > 0) {
      const int64_t capacity = BlocksFor(options_.capacity_tokens);
      if (want > capacity)
        return ResourceExhausted(
            "kv cache full: " + std::to_string(need) + " more blocks of " + std::to_string(options_.block_size) +
            " tokens wanted, " + std::to_string(free_blocks() + capacity - num_blocks_) + " free of " +
            std::to_string(capacity) + " (runtime.kv_cache_tokens = " + std::to_string(options_.capacity_tokens) + ")");
      EF_RETURN_IF_ERROR(Grow(BlocksFor(options_.capacity_tokens)));
    } else {
      // Doubling keeps growths rare; near the device's limit, exactly what is wanted may still fit
      // (the old pool and the new one live together during the copy).
      const int64_t ample = std::max({want, 2 * num_blocks_, BlocksFor(options_.initial_tokens)});
      if (Status s = Grow(ample); !s.ok()) {
        if (ample == want) return s;
        EF_RETURN_IF_ERROR(Grow(want));
      }
    }
  }
  for (size_t i = 0; i < tables.size(); ++i)
    while (static_cast<int64_t>(tables[i]->size()) < BlocksFor(tokens[i])) {
      tables[i]->push_back(free_.back());
      free_.pop_back();
    }
  return Status::Ok();
}

void PagedKvCache::Release(std::vector<int32_t>* blocks) {
  // Pushed back so the lowest ids come out first again.
  for (auto it = blocks->rbegin(); it != blocks->rend(); ++it) free_.push_back(*it);
  blocks->clear();
}

}  // namespace ef::runtime
