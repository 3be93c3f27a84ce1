#include "cache/quantized_experts.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "runtime/core/packed_bf16.h"
#include "runtime/core/quant.h"
#include "runtime/core/quant_format.h"

namespace ef::cache {
namespace {

constexpr const char* kVersion = "1";
constexpr const char* kPartNames[3] = {"gate", "up", "down"};

uint64_t Fnv1a(uint64_t h, const void* p, size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) {
    h ^= b[i];
    h *= 1099511628211ull;
  }
  return h;
}

const runtime::Weight* Part(const runtime::ExpertWeights& w, int part) {
  return part == 0 ? &w.gate : part == 1 ? &w.up : &w.down;
}

}  // namespace

std::string ExpertFingerprint(const runtime::ModelWeights& model) {
  const runtime::ModelConfig& c = model.config();
  uint64_t h = 14695981039346656037ull;
  constexpr size_t kEdge = 4096;
  for (int l : c.MoeLayers()) {
    for (int e = 0; e < c.num_experts; ++e) {
      const runtime::ExpertWeights& w = model.host_expert(l, e);
      for (int p = 0; p < 3; ++p) {
        const runtime::Weight* x = Part(w, p);
        const int64_t head[3] = {static_cast<int64_t>(x->dtype), x->rows, x->cols};
        h = Fnv1a(h, head, sizeof head);
        const size_t n = x->nbytes();
        const auto* b = static_cast<const std::byte*>(x->data);
        if (!b) continue;
        h = Fnv1a(h, b, std::min(n, kEdge));
        if (n > kEdge) h = Fnv1a(h, b + n - std::min(n - kEdge, kEdge), std::min(n - kEdge, kEdge));
      }
    }
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

bool CacheQuantizes(const runtime::ExpertWeights& w, DType t) {
  if (!IsFloatWeight(w.gate.dtype) || w.up.dtype != w.gate.dtype || w.down.dtype != w.gate.dtype || w.has_bias())
    return false;
  if (t == DType::kPbf16)
    return w.gate.dtype == DType::kBF16 && PackedBf16Format::divides(w.gate.cols) &&
           PackedBf16Format::divides(w.up.cols) && PackedBf16Format::divides(w.down.cols);
  const QuantFormat& f = QuantFormat::Of(t);
  return f.divides(w.gate.cols) && f.divides(w.up.cols) && f.divides(w.down.cols) && w.up.rows == w.gate.rows &&
         w.up.cols == w.gate.cols && w.down.cols == w.gate.rows && w.down.rows == w.gate.cols;
}

std::string QuantizedExpertName(int layer, int expert, int part) {
  return "layers." + std::to_string(layer) + ".experts." + std::to_string(expert) + "." + kPartNames[part];
}

StatusOr<std::shared_ptr<const QuantizedExperts>> QuantizedExperts::Open(const std::string& path,
                                                                         const runtime::ModelWeights& model) {
  auto fail = [&](const std::string& why) { return InvalidArgument("quantized experts " + path + ": " + why); };
  auto file = runtime::SafetensorsFile::Open(path);
  if (!file.ok()) return std::move(file).status().Prepend("quantized experts");
  auto q = std::shared_ptr<QuantizedExperts>(new QuantizedExperts());
  q->file_ = std::move(file).value();
  const auto& meta = q->file_->metadata();
  const auto get = [&](const char* key) -> std::string {
    auto it = meta.find(key);
    return it == meta.end() ? std::string() : it->second;
  };
  if (get("format") != kQuantizedExpertsFormat)
    return fail(std::string("not a quantized-experts file (metadata \"format\" is '") + get("format") +
                "', expected '" + kQuantizedExpertsFormat + "')");
  if (get("version") != kVersion) return fail("version '" + get("version") + "' (this build reads " + kVersion + ")");
  const std::string precision = get("precision");
  if (precision == "int8") {
    q->dtype_ = DType::kQ8;
  } else if (precision == "int4") {
    q->dtype_ = DType::kQ4;
  } else {
    return fail("precision '" + precision + "' (int8 or int4)");
  }
  q->method_ = get("method");
  const std::string want = ExpertFingerprint(model);
  if (get("fingerprint") != want)
    return fail("made from another checkpoint (fingerprint " + get("fingerprint") + ", this model's is " + want + ")");

  const runtime::ModelConfig& c = model.config();
  q->num_experts_ = c.num_experts;
  q->blocks_.assign(static_cast<size_t>(c.num_layers) * c.num_experts * 3, nullptr);
  const QuantFormat& f = QuantFormat::Of(q->dtype_);
  size_t matched = 0;
  for (int l : c.MoeLayers()) {
    for (int e = 0; e < c.num_experts; ++e) {
      int parts = 0;
      for (int p = 0; p < 3; ++p) {
        const std::string name = QuantizedExpertName(l, e, p);
        const runtime::TensorView* t = q->file_->Find(name);
        if (!t) continue;
        if (!CacheQuantizes(model.host_expert(l, e), q->dtype_))
          return fail(name +
                      ": the cache keeps this expert in the checkpoint's precision (biased, packed, or widths the "
                      "group does not divide)");
        const runtime::Weight* w = Part(model.host_expert(l, e), p);
        const size_t need = f.bytes(w->rows, w->cols);
        if (t->dtype != DType::kU8 || t->shape.size() != 1 || t->nbytes != need)
          return fail(name + " is " + DTypeName(t->dtype) + " " + t->ShapeString() + ", expected U8 [" +
                      std::to_string(need) + "] (" + precision + " of [" + std::to_string(w->rows) + ", " +
                      std::to_string(w->cols) + "])");
        // Every scale (and min) finite: a block that would compute NaN is refused here, not in the logits.
        const std::byte* params = t->data + f.params_offset(w->rows, w->cols);
        const int64_t n_params = w->rows * f.groups_per_row(w->cols) * f.params_per_group();
        for (int64_t i = 0; i < n_params; ++i) {
          uint16_t h;
          std::memcpy(&h, params + i * QuantFormat::kParamBytes, 2);
          if ((h & 0x7c00u) == 0x7c00u)
            return fail(name + ": parameter " + std::to_string(i) + " of its groups is not finite");
        }
        q->blocks_[(static_cast<size_t>(l) * c.num_experts + e) * 3 + p] = t->data;
        ++parts;
        ++matched;
      }
      if (parts != 0 && parts != 3)
        return fail("expert " + std::to_string(e) + " of layer " + std::to_string(l) + " has " + std::to_string(parts) +
                    " of its 3 matrices");
      if (parts == 3) ++q->held_;
    }
  }
  if (matched != q->file_->tensors().size()) {
    for (const auto& [name, t] : q->file_->tensors()) {
      bool known = false;
      for (int l : c.MoeLayers())
        for (int e = 0; e < c.num_experts && !known; ++e)
          for (int p = 0; p < 3 && !known; ++p) known = name == QuantizedExpertName(l, e, p);
      if (!known) return fail("tensor '" + name + "' names no routed expert of this model");
    }
  }
  return std::shared_ptr<const QuantizedExperts>(std::move(q));
}

StatusOr<size_t> QuantizeExpertPart(const QuantizedExperts* calibrated, int layer, int expert, int part, DType target,
                                    const runtime::Weight& from, const void* src, void* dst, size_t dst_bytes,
                                    int max_threads) {
  if (calibrated && calibrated->dtype() == target) {
    if (const std::byte* block = calibrated->Find(layer, expert, part)) {
      const size_t n = QuantFormat::Of(target).bytes(from.rows, from.cols);
      if (dst_bytes < n)
        return InvalidArgument("a slot of " + std::to_string(dst_bytes) + " bytes for a block of " + std::to_string(n));
      std::memcpy(dst, block, n);
      return n;
    }
  }
  if (target == DType::kPbf16) {
    if (from.dtype != DType::kBF16)
      return InvalidArgument(std::string("packing a ") + DTypeName(from.dtype) + " weight as PBF16: only bf16 packs");
    return PackBf16(static_cast<const uint16_t*>(src), from.rows, from.cols, dst, dst_bytes, max_threads);
  }
  return Quantize(target, from.dtype, src, from.rows, from.cols, dst, dst_bytes, max_threads);
}

const std::byte* QuantizedExperts::Find(int layer, int expert, int part) const {
  const size_t i = (static_cast<size_t>(layer) * num_experts_ + expert) * 3 + part;
  return i < blocks_.size() ? blocks_[i] : nullptr;
}

Status QuantizedExperts::Write(const std::string& path, const runtime::ModelWeights& model, DType dtype,
                               const std::string& method, const std::vector<Block>& blocks,
                               const std::map<std::string, std::string>& extra_metadata) {
  if (dtype != DType::kQ8 && dtype != DType::kQ4) return InvalidArgument("quantized experts are int8 or int4");
  std::vector<runtime::TensorToWrite> tensors;
  for (const Block& b : blocks)
    tensors.push_back({QuantizedExpertName(b.layer, b.expert, b.part),
                       DType::kU8,
                       {static_cast<int64_t>(b.bytes.size())},
                       b.bytes.data()});
  std::map<std::string, std::string> meta = extra_metadata;
  meta["format"] = kQuantizedExpertsFormat;
  meta["version"] = std::string(kVersion);  // not from the char*: GCC 12 sees a false -Wrestrict there
  meta["precision"] = dtype == DType::kQ8 ? "int8" : "int4";
  meta["method"] = method;
  meta["fingerprint"] = ExpertFingerprint(model);
  // Written aside and renamed into place: a process that maps the old file keeps its bytes.
  const std::string tmp = path + ".tmp";
  Status st = runtime::WriteSafetensors(tmp, tensors, meta);
  if (st.ok() && std::rename(tmp.c_str(), path.c_str()) != 0) st = DataLoss("cannot rename " + tmp + " to " + path);
  if (!st.ok()) std::remove(tmp.c_str());
  return st;
}

}  // namespace ef::cache
