// Lossless packing of bf16 weights (DType kPbf16; layout and the reasons for it in
// runtime/core/packed_bf16_format.h) and its decoding.
//
// The expert cache packs a model's bf16 experts once at load (cache.miss_precision lossless),
// copies the blocks into device slots on a miss (0.756x the bytes of bf16) and hands them to
// Backend::Gemm as Weight{kPbf16, block, rows, cols}: the backends decode each value to its exact
// bf16 bits. All functions are thread-safe (they touch only their arguments).
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/core/packed_bf16_format.h"
#include "runtime/core/status.h"

namespace ef {

// Packs the [rows, cols] bf16 weight `src` (row-major) into dst and returns the bytes written,
// WeightBytes(kPbf16, rows, cols) (unused exception entries and padding zeroed). InvalidArgument
// when cols is not a multiple of 128 or past 65536, or dst_bytes is too small; OutOfRange, naming
// the count, when more values than the format's capacity (one per 1024) fall more than 14 binades
// below their group's largest: such a weight cannot be packed. On error dst's contents are
// unspecified.
// Rows are split over up to max_threads threads (0: the process's CPUs, at most 16); the result
// does not depend on the split.
[[nodiscard]] StatusOr<size_t> PackBf16(const uint16_t* src, int64_t rows, int64_t cols, void* dst, size_t dst_bytes,
                                        int max_threads = 0);

// Row `row` of the packed [rows, cols] block `src`, as its exact bf16 bits into dst[cols] or as
// fp32 (the same values) into dst[cols]. The backends' inner loop, so unchecked: cols divides the
// format, row in [0, rows).
void UnpackBf16Row(const void* src, int64_t rows, int64_t cols, int64_t row, uint16_t* dst);
void UnpackBf16RowF32(const void* src, int64_t rows, int64_t cols, int64_t row, float* dst);

// The whole block back to bf16 (dst[rows * cols]). InvalidArgument when cols does not divide the
// format, or the row ends go backwards or past the capacity, or an entry names a column past cols
// (a corrupt block; nothing is read outside the block).
[[nodiscard]] Status UnpackBf16(const void* src, int64_t rows, int64_t cols, uint16_t* dst);

// Values of the [rows, cols] bf16 weight that PackBf16 would list as exceptions (for reports).
int64_t CountBf16Exceptions(const uint16_t* src, int64_t rows, int64_t cols);

}  // namespace ef
