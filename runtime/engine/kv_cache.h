// The paged KV cache: every layer's keys and values live in one pool of fixed-size blocks of
// `block_size` token rows, and a sequence owns a list of block ids (its block table, the same for
// every layer). Position t of a sequence is row blocks[t / block_size] * block_size +
// t % block_size of the layer's pool, so sequences of any length share the memory without each
// reserving the context limit, and a finished sequence's blocks go straight to the next one.
//
// The pool is one backend allocation per layer (keys and values apart), sized in blocks. With a
// fixed capacity (kv_cache_tokens > 0) a request past it fails with ResourceExhausted and changes
// nothing; with capacity 0 the pool doubles when it runs out (its rows are copied over on the
// backend; the tables stay valid since ids do not change).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/core/status.h"

namespace ef::runtime {

class PagedKvCache {
 public:
  struct Options {
    int num_layers = 0;
    size_t key_row_bytes = 0;     // bytes of one token's keys in one layer
    size_t value_row_bytes = 0;   // 0: no separate values (MLA keeps one cached row)
    int block_size = 16;          // token rows per block: a power of two
    int64_t capacity_tokens = 0;  // 0: grow on demand, starting at initial_tokens
    int64_t initial_tokens = 0;
  };
  // Allocates nothing yet: the pool is made on the first Reserve.
  static StatusOr<PagedKvCache> Create(Backend* backend, const Options& options);
  PagedKvCache() = default;
  PagedKvCache(PagedKvCache&&) = default;
  PagedKvCache& operator=(PagedKvCache&&) = default;

  // Grows `blocks` (a sequence's table) until it covers `tokens` rows. ResourceExhausted, with
  // `blocks` unchanged, when the pool cannot give them.
  Status Reserve(std::vector<int32_t>* blocks, int64_t tokens);
  // Takes several tables' growth at once, all or nothing: tables[i] to cover tokens[i] rows.
  Status ReserveAll(std::span<std::vector<int32_t>* const> tables, std::span<const int64_t> tokens);
  // A fixed-size pool: allocates all of it now (otherwise on the first Reserve).
  Status AllocateCapacity();
  // Returns a table's blocks to the pool and clears it.
  void Release(std::vector<int32_t>* blocks);

  // Layer pools (null before the first Reserve). Row r of layer l's keys starts at
  // key(l) + r * key_row_bytes.
  void* key(int layer) const { return keys_.empty() ? nullptr : keys_[layer].data(); }
  void* value(int layer) const { return values_.empty() ? nullptr : values_[layer].data(); }
  int block_size() const { return options_.block_size; }
  int64_t capacity_tokens() const { return options_.capacity_tokens; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  // Blocks needed for `tokens` rows.
  int64_t BlocksFor(int64_t tokens) const { return (tokens + options_.block_size - 1) / options_.block_size; }

 private:
  // Makes the pool hold at least `blocks` blocks (copying what it holds).
  Status Grow(int64_t blocks);

  Backend* backend_ = nullptr;
  Options options_;
  std::vector<Buffer> keys_, values_;  // per layer
  int64_t num_blocks_ = 0;
  std::vector<int32_t> free_;  // a stack: the lowest ids are handed out first
};

}  // namespace ef::runtime
