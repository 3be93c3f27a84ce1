// QuantizedExperts: a model's experts quantized ahead of time (`expertflow quantize`, GPTQ over
// calibration text), which the expert cache's host tier takes instead of quantizing the checkpoint
// to nearest at load (cache.quantized_experts).
//
// The file is safetensors. Metadata:
//   format       "expertflow-quantized-experts", version "1"
//   precision    "int8" | "int4"  (kQ8 / kQ4 blocks, runtime/core/quant_format.h)
//   method       how the blocks were made ("gptq"), for people
//   fingerprint  ExpertFingerprint() of the checkpoint they were made from
// and one U8 tensor per quantized matrix, "layers.L.experts.E.gate|up|down", holding exactly the
// block Backend::Gemm reads (QuantFormat::bytes of the checkpoint's shape). An expert the file
// leaves out (its width not a multiple of the group, or no calibration input reached it) is
// quantized to nearest at load, as without the file.
//
// Open checks everything against the model before a byte is used: the format and version, the
// precision, the fingerprint (a file made from another checkpoint, even of the same shapes, is
// refused), every tensor's name, dtype and size. Thread-safe after Open (immutable).
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/core/status.h"
#include "runtime/engine/model_weights.h"
#include "runtime/model/safetensors_file.h"

namespace ef::cache {

inline constexpr const char* kQuantizedExpertsFormat = "expertflow-quantized-experts";

// A 16-hex-digit digest of the model's routed experts: every MoE layer's expert shapes and dtypes
// and the first and last 4 KiB of each matrix. Cheap on any model size; tells checkpoints apart.
std::string ExpertFingerprint(const runtime::ModelWeights& model);

// Whether the expert cache quantizes `w` to `t` (kQ8 or kQ4) at all: float weights (F32, F16, BF16)
// without biases whose widths the group divides. Biased experts (GPT-OSS) stay in the checkpoint's
// precision (their packed layout appends the biases, which a quantized block does not carry), and so
// do experts a checkpoint ships packed (MXFP4, block FP8): requantizing them would only add error.
// t == kPbf16 (cache.miss_precision lossless): bf16 experts without biases whose widths
// PackedBf16Format divides.
bool CacheQuantizes(const runtime::ExpertWeights& w, DType t);
// Whether the cache writes a part of dtype t by converting the checkpoint's bytes (quantizing or
// packing them) rather than copying them.
constexpr bool CacheConverts(DType t) { return IsQuantized(t) || t == DType::kPbf16; }

// The tensor name of part (0 gate, 1 up, 2 down) of (layer, expert).
std::string QuantizedExpertName(int layer, int expert, int part);

class QuantizedExperts {
 public:
  static StatusOr<std::shared_ptr<const QuantizedExperts>> Open(const std::string& path,
                                                                const runtime::ModelWeights& model);

  DType dtype() const { return dtype_; }  // kQ8 or kQ4
  const std::string& path() const { return file_->path(); }
  const std::string& method() const { return method_; }
  int num_experts_held() const { return held_; }
  // The block of part (0 gate, 1 up, 2 down) of (layer, expert), or null when the file has none.
  const std::byte* Find(int layer, int expert, int part) const;

  struct Block {
    int layer, expert, part;
    std::vector<std::byte> bytes;
  };
  // Writes a file Open reads back for `model`.
  static Status Write(const std::string& path, const runtime::ModelWeights& model, DType dtype,
                      const std::string& method, const std::vector<Block>& blocks,
                      const std::map<std::string, std::string>& extra_metadata = {});

 private:
  QuantizedExperts() = default;
  std::unique_ptr<runtime::SafetensorsFile> file_;
  DType dtype_ = DType::kQ8;
  std::string method_;
  int num_experts_ = 0;
  int held_ = 0;
  std::vector<const std::byte*> blocks_;  // [(layer * E + expert) * 3 + part]
};

// Part `part` (0 gate, 1 up, 2 down) of (layer, expert), whose checkpoint bytes are `src` (the
// shape and dtype of `from`), in the quantized dtype `target` into dst: the calibrated block when
// `calibrated` (may be null) holds one in that dtype, else Quantize's round to nearest; target kPbf16
// packs the bf16 part losslessly (PackBf16: OutOfRange for a part with too many exceptions). Returns
// the bytes written.
[[nodiscard]] StatusOr<size_t> QuantizeExpertPart(const QuantizedExperts* calibrated, int layer, int expert, int part,
                                                  DType target, const runtime::Weight& from, const void* src, void* dst,
                                                  size_t dst_bytes, int max_threads = 0);

}  // namespace ef::cache
