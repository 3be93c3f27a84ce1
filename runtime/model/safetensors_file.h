// A safetensors file mapped read-only into memory.
//
// Open() validates everything before any tensor is used: the 8-byte header length is within
// the file and below limits::kMaxSafetensorsHeaderBytes, the header is well-formed JSON, every
// entry has a known dtype, a shape of non-negative dims and data_offsets [begin, end) inside the
// data section whose length equals dtype size x element count, and no two tensors overlap.
// Tensor data stays in the mapping: nothing is copied at load time, so experts can be streamed
// to a device or another tier straight from the page cache.
//
// Thread-safe after Open (immutable).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/core/status.h"

namespace ef::runtime {

// A read-only view of one tensor's bytes. Valid while the owning file is open.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;
  size_t nbytes = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  int64_t dim(int i) const { return shape[static_cast<size_t>(i)]; }
  std::string ShapeString() const;
};

class SafetensorsFile {
 public:
  static StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // The same validation on bytes held in memory (the file keeps its own copy); `origin` names
  // them in errors. For tests, fuzzing and checkpoints built in memory (Checkpoint::FromFiles).
  static StatusOr<std::unique_ptr<SafetensorsFile>> FromBytes(std::string bytes, const std::string& origin);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // nullptr when absent.
  const TensorView* Find(const std::string& name) const;
  size_t file_size() const { return size_; }

 private:
  SafetensorsFile() = default;
  // Validates the header of the size_ bytes at data_ and fills tensors_ and metadata_.
  Status Parse();

  std::string path_;
  void* map_ = nullptr;  // the mapping (Open), or nullptr (FromBytes)
  std::string owned_;    // the bytes (FromBytes)
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors to a safetensors file (F32/F16/BF16/I32/I64 data given as raw bytes).
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;
};
Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata = {});
// The same file's bytes, in memory (SafetensorsFile::FromBytes reads them).
std::string SafetensorsBytes(const std::vector<TensorToWrite>& tensors,
                             const std::map<std::string, std::string>& metadata = {});

}  // namespace ef::runtime
