#include "runtime/model/safetensors_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/core/limits.h"
#include "runtime/core/logging.h"

namespace ef::runtime {
namespace {

using json = nlohmann::json;

Status Bad(const std::string& path, const std::string& what) {
  return DataLoss("invalid safetensors file " + path + ": " + what);
}

}  // namespace

std::string TensorView::ShapeString() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ && map_ != MAP_FAILED) munmap(map_, size_);
}

const TensorView* SafetensorsFile::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

Status SafetensorsFile::Parse() {
  const std::string& path = path_;
  if (size_ < 8) return Bad(path, "file is " + std::to_string(size_) + " bytes, shorter than the 8-byte header length");
  const std::byte* bytes = data_;
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes, 8);  // little-endian on every supported host
  if (header_len > limits::kMaxSafetensorsHeaderBytes)
    return Bad(path, "header length " + std::to_string(header_len) + " exceeds the limit of " +
                         std::to_string(limits::kMaxSafetensorsHeaderBytes) + " bytes");
  if (header_len > size_ - 8)
    return Bad(path, "header length " + std::to_string(header_len) + " runs past the end of the file (" +
                         std::to_string(size_) + " bytes); the file is truncated or not safetensors");
  const char* header_text = reinterpret_cast<const char*>(bytes + 8);
  json header = json::parse(header_text, header_text + header_len, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) return Bad(path, "header is not a well-formed JSON object");

  const size_t data_begin = 8 + header_len;
  const size_t data_size = size_ - data_begin;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) return Bad(path, "__metadata__ is not an object");
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) return Bad(path, "__metadata__ value of \"" + m.key() + "\" is not a string");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
      return Bad(path, "tensor \"" + name + "\" needs dtype, shape and data_offsets");
    TensorView view;
    view.name = name;
    if (!entry["dtype"].is_string() || !ParseDType(entry["dtype"].get<std::string>(), &view.dtype))
      return Bad(path, "tensor \"" + name + "\" has unknown dtype " + entry["dtype"].dump());
    const json& shape = entry["shape"];
    if (!shape.is_array() || shape.size() > static_cast<size_t>(limits::kMaxTensorRank))
      return Bad(path, "tensor \"" + name + "\" has an invalid shape " + shape.dump());
    // Bytes (not only elements) stay below 2^62, so dtype size x element count cannot wrap.
    const uint64_t max_numel = (uint64_t{1} << 62) / DTypeSize(view.dtype);
    uint64_t numel = 1;
    for (const json& d : shape) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        return Bad(path, "tensor \"" + name + "\" has an invalid dimension in shape " + shape.dump());
      uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > max_numel / dim) return Bad(path, "tensor \"" + name + "\" is impossibly large");
      numel *= dim;
      view.shape.push_back(static_cast<int64_t>(dim));
    }
    const json& off = entry["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      return Bad(path, "tensor \"" + name + "\" has invalid data_offsets " + off.dump());
    uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > data_size)
      return Bad(path, "tensor \"" + name + "\" byte range [" + std::to_string(begin) + ", " + std::to_string(end) +
                           ") leaves the data section of " + std::to_string(data_size) + " bytes");
    uint64_t expect = numel * DTypeSize(view.dtype);
    if (end - begin != expect)
      return Bad(path, "tensor \"" + name + "\" has " + std::to_string(end - begin) + " bytes but " +
                           DTypeName(view.dtype) + " x " + view.ShapeString() + " needs " + std::to_string(expect));
    view.data = bytes + data_begin + begin;
    view.nbytes = static_cast<size_t>(expect);
    if (end > begin) ranges.emplace_back(begin, end);
    tensors_.emplace(name, std::move(view));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) {
      std::string a, b;
      for (const auto& [n, v] : tensors_) {
        uint64_t s = static_cast<uint64_t>(v.data - (bytes + data_begin));
        if (s == ranges[i - 1].first && a.empty())
          a = n;
        else if (s == ranges[i].first)
          b = n;
      }
      return Bad(path, "tensors \"" + a + "\" and \"" + b + "\" overlap");
    }
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBytes(std::string bytes, const std::string& origin) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = origin;
  file->owned_ = std::move(bytes);
  file->data_ = reinterpret_cast<const std::byte*>(file->owned_.data());
  file->size_ = file->owned_.size();
  EF_RETURN_IF_ERROR(file->Parse());
  return file;
}

StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return NotFound("cannot open safetensors file " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    return Internal("cannot stat " + path + ": " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Bad(path, S_ISDIR(st.st_mode) ? "is a directory, not a safetensors file" : "is not a regular file");
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->size_ = static_cast<size_t>(st.st_size);
  if (file->size_ < 8) {
    ::close(fd);
    return Bad(path, "file is " + std::to_string(file->size_) + " bytes, shorter than the 8-byte header length");
  }
  file->map_ = mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (file->map_ == MAP_FAILED) {
    file->map_ = nullptr;
    return Internal("cannot mmap " + path + ": " + std::strerror(errno));
  }
  file->data_ = static_cast<const std::byte*>(file->map_);
  EF_RETURN_IF_ERROR(file->Parse());
  EF_LOG(DEBUG, MODEL, "opened %s: %zu tensors, %zu bytes", path.c_str(), file->tensors_.size(), file->size_);
  return file;
}

namespace {

// The 8-byte length and the header text (padded so the data section starts 8-byte aligned), and
// each tensor's byte count.
std::string SafetensorsHeader(const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata, std::vector<uint64_t>* sizes) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    uint64_t n = DTypeSize(t.dtype);
    for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
    header[t.name] = {{"dtype", DTypeName(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
    sizes->push_back(n);
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');  // align the data section
  const uint64_t len = text.size();
  return std::string(reinterpret_cast<const char*>(&len), 8) + text;
}

}  // namespace

Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  std::vector<uint64_t> sizes;
  const std::string head = SafetensorsHeader(tensors, metadata, &sizes);
  std::ofstream out(path, std::ios::binary);
  if (!out) return InvalidArgument("cannot write " + path + ": " + std::strerror(errno));
  out.write(head.data(), static_cast<std::streamsize>(head.size()));
  for (size_t i = 0; i < tensors.size(); ++i)
    out.write(static_cast<const char*>(tensors[i].data), static_cast<std::streamsize>(sizes[i]));
  if (!out) return DataLoss("error writing " + path);
  return Status::Ok();
}

std::string SafetensorsBytes(const std::vector<TensorToWrite>& tensors,
                             const std::map<std::string, std::string>& metadata) {
  std::vector<uint64_t> sizes;
  std::string bytes = SafetensorsHeader(tensors, metadata, &sizes);
  uint64_t total = bytes.size();
  for (uint64_t n : sizes) total += n;
  bytes.reserve(total);
  for (size_t i = 0; i < tensors.size(); ++i) bytes.append(static_cast<const char*>(tensors[i].data), sizes[i]);
  return bytes;
}

}  // namespace ef::runtime
