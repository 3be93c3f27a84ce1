// Predictor files: a small self-contained safetensors writer/reader for predictor parameters,
// plus the metadata every predictor file carries.
//
// Format (the standard safetensors layout): 8-byte little-endian header length N, N bytes of
// JSON header {"name": {"dtype": "F32"|"I32", "shape": [...], "data_offsets": [b, e]}, ...,
// "__metadata__": {string: string}}, then the raw little-endian data. Offsets are relative to
// the end of the header, contiguous and in bounds. The reader validates all of this and
// returns kInvalidArgument/kDataLoss naming the file and what is wrong; it never aborts.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "runtime/core/status.h"

namespace ef::placement {

// One tensor: exactly one of f32/i32 is used, according to dtype.
struct PredictorTensor {
  std::string dtype = "F32";  // "F32" or "I32"
  std::vector<int64_t> shape;
  std::vector<float> f32;
  std::vector<int32_t> i32;

  int64_t numel() const;
  static PredictorTensor F32(std::vector<int64_t> shape, std::vector<float> data);
  static PredictorTensor I32(std::vector<int64_t> shape, std::vector<int32_t> data);
};

struct PredictorFile {
  std::map<std::string, std::string> metadata;  // written as "__metadata__"
  std::map<std::string, PredictorTensor> tensors;

  // Lookups that fail with a clear message naming `path` (the file, for messages).
  StatusOr<const PredictorTensor*> Tensor(const std::string& name, const std::string& dtype,
                                          const std::vector<int64_t>& shape, const std::string& path) const;
  StatusOr<std::string> Meta(const std::string& key, const std::string& path) const;
  StatusOr<int64_t> MetaInt(const std::string& key, const std::string& path) const;
  StatusOr<double> MetaDouble(const std::string& key, const std::string& path) const;
};

Status WritePredictorFile(const PredictorFile& file, const std::string& path);
StatusOr<PredictorFile> ReadPredictorFile(const std::string& path);
// The same validation on the file's bytes held in memory; `origin` names them in errors.
StatusOr<PredictorFile> ParsePredictorFile(const std::string& bytes, const std::string& origin);

// Sequence-id lists as written on the command line and in metadata: "0-23", "0-5,8,10-12".
StatusOr<std::vector<int64_t>> ParseSeqList(const std::string& text);
std::string FormatSeqList(std::vector<int64_t> seqs);

}  // namespace ef::placement
