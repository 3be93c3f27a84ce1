#include "placement/predictor_io.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "runtime/core/limits.h"

namespace ef::placement {
namespace {

using json = nlohmann::json;

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

int64_t PredictorTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

PredictorTensor PredictorTensor::F32(std::vector<int64_t> shape, std::vector<float> data) {
  PredictorTensor t;
  t.dtype = "F32";
  t.shape = std::move(shape);
  t.f32 = std::move(data);
  return t;
}

PredictorTensor PredictorTensor::I32(std::vector<int64_t> shape, std::vector<int32_t> data) {
  PredictorTensor t;
  t.dtype = "I32";
  t.shape = std::move(shape);
  t.i32 = std::move(data);
  return t;
}

StatusOr<const PredictorTensor*> PredictorFile::Tensor(const std::string& name, const std::string& dtype,
                                                       const std::vector<int64_t>& shape,
                                                       const std::string& path) const {
  auto it = tensors.find(name);
  if (it == tensors.end()) return InvalidArgument("predictor file " + path + ": tensor \"" + name + "\" is missing");
  const PredictorTensor& t = it->second;
  if (t.dtype != dtype)
    return InvalidArgument("predictor file " + path + ": tensor \"" + name + "\" has dtype " + t.dtype + ", expected " +
                           dtype);
  if (t.shape != shape)
    return InvalidArgument("predictor file " + path + ": tensor \"" + name + "\" has shape " + ShapeString(t.shape) +
                           ", expected " + ShapeString(shape) + " (a predictor for another model or shape?)");
  return &t;
}

StatusOr<std::string> PredictorFile::Meta(const std::string& key, const std::string& path) const {
  auto it = metadata.find(key);
  if (it == metadata.end()) return InvalidArgument("predictor file " + path + ": metadata \"" + key + "\" is missing");
  return it->second;
}

StatusOr<int64_t> PredictorFile::MetaInt(const std::string& key, const std::string& path) const {
  EF_ASSIGN_OR_RETURN(std::string s, Meta(key, path));
  char* end = nullptr;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0')
    return InvalidArgument("predictor file " + path + ": metadata \"" + key + "\" = \"" + s + "\" is not an integer");
  return static_cast<int64_t>(v);
}

StatusOr<double> PredictorFile::MetaDouble(const std::string& key, const std::string& path) const {
  EF_ASSIGN_OR_RETURN(std::string s, Meta(key, path));
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0')
    return InvalidArgument("predictor file " + path + ": metadata \"" + key + "\" = \"" + s + "\" is not a number");
  return v;
}

Status WritePredictorFile(const PredictorFile& file, const std::string& path) {
  json header = json::object();
  json meta = json::object();
  for (const auto& [k, v] : file.metadata) meta[k] = v;
  header["__metadata__"] = meta;
  uint64_t offset = 0;
  for (const auto& [name, t] : file.tensors) {
    const size_t n = t.dtype == "F32" ? t.f32.size() : t.i32.size();
    if ((t.dtype != "F32" && t.dtype != "I32") || static_cast<int64_t>(n) != t.numel())
      return Internal("tensor " + name + " is inconsistent (dtype " + t.dtype + ", shape " + ShapeString(t.shape) +
                      ")");
    header[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + n * 4}}};
    offset += n * 4;
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');  // pad so the data starts 8-byte aligned
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return InvalidArgument("cannot write predictor file " + path);
  uint64_t len = h.size();
  unsigned char le[8];
  for (int i = 0; i < 8; ++i) le[i] = static_cast<unsigned char>(len >> (8 * i));
  out.write(reinterpret_cast<const char*>(le), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  // Tensors in the same (sorted) order as their offsets; host is little-endian (x86/ARM).
  for (const auto& [name, t] : file.tensors) {
    if (t.dtype == "F32")
      out.write(reinterpret_cast<const char*>(t.f32.data()), static_cast<std::streamsize>(t.f32.size() * 4));
    else
      out.write(reinterpret_cast<const char*>(t.i32.data()), static_cast<std::streamsize>(t.i32.size() * 4));
  }
  if (!out) return DataLoss("error writing predictor file " + path);
  return Status::Ok();
}

StatusOr<PredictorFile> ReadPredictorFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot open predictor file " + path);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return ParsePredictorFile(bytes, path);
}

StatusOr<PredictorFile> ParsePredictorFile(const std::string& bytes, const std::string& path) {
  auto bad = [&](const std::string& what) {
    return InvalidArgument("predictor file " + path + " is not a valid safetensors file: " + what);
  };
  if (bytes.size() < 8) return bad("shorter than the 8-byte header length");
  uint64_t len = 0;
  for (int i = 0; i < 8; ++i) len |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  if (len > limits::kMaxSafetensorsHeaderBytes || len > bytes.size() - 8)
    return bad("header length " + std::to_string(len) + " exceeds the file size");
  json header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(len), nullptr,
                            /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) return bad("header is not a JSON object");
  const uint64_t data_size = bytes.size() - 8 - len;
  const char* data = bytes.data() + 8 + len;
  PredictorFile file;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      if (!v.is_object()) return bad("\"__metadata__\" is not an object");
      for (const auto& [k, s] : v.items()) {
        if (!s.is_string()) return bad("metadata \"" + k + "\" is not a string");
        file.metadata[k] = s.get<std::string>();
      }
      continue;
    }
    if (!v.is_object() || !v.contains("dtype") || !v["dtype"].is_string() || !v.contains("shape") ||
        !v["shape"].is_array() || !v.contains("data_offsets") || !v["data_offsets"].is_array() ||
        v["data_offsets"].size() != 2)
      return bad("tensor \"" + name + "\" lacks dtype, shape or data_offsets");
    PredictorTensor t;
    t.dtype = v["dtype"].get<std::string>();
    if (t.dtype != "F32" && t.dtype != "I32") return bad("tensor \"" + name + "\" has unsupported dtype " + t.dtype);
    if (v["shape"].size() > static_cast<size_t>(limits::kMaxTensorRank)) return bad("tensor \"" + name + "\" rank");
    for (const auto& d : v["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0 || d.get<int64_t>() > (int64_t{1} << 40))
        return bad("tensor \"" + name + "\" has a bad shape");
      t.shape.push_back(d.get<int64_t>());
    }
    // The element count must fit the data before numel() multiplies it out (signed overflow) and
    // the byte count below wraps to a size that matches a too-short range.
    bool has_zero = false, overflow = false;
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      has_zero |= d == 0;
      overflow |= __builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel);
    }
    if (overflow || (!has_zero && numel > data_size / 4))
      return bad("tensor \"" + name + "\" shape " + ShapeString(t.shape) + " needs more bytes than the file holds");
    const auto& off = v["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) return bad("tensor \"" + name + "\" offsets");
    uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (b > e || e > data_size) return bad("tensor \"" + name + "\" data_offsets out of bounds");
    if (e - b != static_cast<uint64_t>(t.numel()) * 4)
      return bad("tensor \"" + name + "\" byte size does not match its shape " + ShapeString(t.shape));
    ranges.emplace_back(b, e);
    const size_t n = static_cast<size_t>(t.numel());
    if (t.dtype == "F32") {
      t.f32.resize(n);
      if (n) std::memcpy(t.f32.data(), data + b, n * 4);
    } else {
      t.i32.resize(n);
      if (n) std::memcpy(t.i32.data(), data + b, n * 4);
    }
    file.tensors[name] = std::move(t);
  }
  std::sort(ranges.begin(), ranges.end());
  uint64_t cursor = 0;
  for (auto [b, e] : ranges) {
    if (b != cursor) return bad("tensor data overlaps or leaves gaps");
    cursor = e;
  }
  if (cursor != data_size) return bad("trailing bytes after the last tensor");
  return file;
}

StatusOr<std::vector<int64_t>> ParseSeqList(const std::string& text) {
  std::set<int64_t> out;
  size_t i = 0;
  auto bad = [&] {
    return InvalidArgument("bad sequence list \"" + text + "\" (expected e.g. \"0-23\" or \"0-5,8\")");
  };
  if (text.empty()) return bad();
  while (i <= text.size()) {
    size_t j = text.find(',', i);
    if (j == std::string::npos) j = text.size();
    std::string item = text.substr(i, j - i);
    size_t dash = item.find('-', 1);
    auto num = [](const std::string& s, int64_t* v) {
      if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos || s.size() > 12) return false;
      *v = std::stoll(s);
      return true;
    };
    int64_t a = 0, b = 0;
    if (dash == std::string::npos) {
      if (!num(item, &a)) return bad();
      b = a;
    } else if (!num(item.substr(0, dash), &a) || !num(item.substr(dash + 1), &b) || b < a || b - a > 100000000) {
      return bad();
    }
    for (int64_t s = a; s <= b; ++s) out.insert(s);
    i = j + 1;
  }
  return std::vector<int64_t>(out.begin(), out.end());
}

std::string FormatSeqList(std::vector<int64_t> seqs) {
  std::sort(seqs.begin(), seqs.end());
  seqs.erase(std::unique(seqs.begin(), seqs.end()), seqs.end());
  std::string out;
  for (size_t i = 0; i < seqs.size();) {
    size_t j = i;
    while (j + 1 < seqs.size() && seqs[j + 1] == seqs[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += std::to_string(seqs[i]);
    if (j > i) {
      out += '-';
      out += std::to_string(seqs[j]);
    }
    i = j + 1;
  }
  return out;
}

}  // namespace ef::placement
