// The sequence descriptors of one attention launch, shared by the attention kernels of this folder
// (included by .cu files only).
#pragma once

#include "runtime/backend/cuda/cuda_kernels.h"

namespace ef::runtime::cuda {

// The sequences of one launch: inline (in the kernel parameters, __grid_constant__ so they are
// read in place) when there are few, else a device array.
// A step's sequences (Backend::AttentionStep) are always the device array, and every sequence's k
// and v are the layer's pools (k_pool, v_pool set).
struct SeqTable {
  const AttentionSeqDesc* dev;
  const void* k_pool;
  const void* v_pool;
  int num_inline;  // > 0: inl[0, num_inline) holds the descriptors
  AttentionSeqDesc inl[kAttentionInlineSeqs];
  __device__ __forceinline__ AttentionSeqDesc operator[](int i) const {
    AttentionSeqDesc d = num_inline > 0 ? inl[i] : dev[i];
    if (k_pool != nullptr) {
      d.k = k_pool;
      d.v = v_pool;
    }
    return d;
  }
};

// The pool row of position t (contiguous: t; paged: through the block table).
__device__ __forceinline__ int64_t KvRow(const AttentionSeqDesc& sd, int t) {
  if (sd.blocks == nullptr) return t;
  return (static_cast<int64_t>(__ldg(sd.blocks + (t >> sd.block_shift))) << sd.block_shift) |
         (t & ((1 << sd.block_shift) - 1));
}

// Fills `table` for num_seqs sequences: inline from seqs_host when they fit, else the device copy
// seqs_dev. False when the array the case needs is null.
inline bool MakeSeqTable(const AttentionSeqDesc* seqs_host, const AttentionSeqDesc* seqs_dev, int num_seqs,
                         SeqTable* table) {
  *table = SeqTable{};
  if (num_seqs <= kAttentionInlineSeqs) {
    if (seqs_host == nullptr) return false;
    table->num_inline = num_seqs;
    for (int s = 0; s < num_seqs; ++s) table->inl[s] = seqs_host[s];
    return true;
  }
  if (seqs_dev == nullptr) return false;
  table->dev = seqs_dev;
  return true;
}

}  // namespace ef::runtime::cuda
