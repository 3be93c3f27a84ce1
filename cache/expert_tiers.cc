#include "cache/expert_tiers.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "runtime/core/logging.h"
#include "runtime/core/packed_bf16_format.h"
#include "runtime/core/progress.h"
#include "runtime/core/quant.h"

namespace ef::cache {

const char* TierName(Tier t) {
  switch (t) {
    case Tier::kHost:
      return "host";
    case Tier::kPeer:
      return "peer";
    case Tier::kCheckpoint:
      return "checkpoint";
  }
  return "?";
}

StatusOr<LoadPrecision> ParseLoadPrecision(const std::string& name) {
  if (name == "native" || name == "bf16") return LoadPrecision::kNative;
  if (name == "int8") return LoadPrecision::kInt8;
  if (name == "int4") return LoadPrecision::kInt4;
  if (name == "auto") return LoadPrecision::kAuto;
  if (name == "lossless") return LoadPrecision::kLossless;
  return InvalidArgument("unknown cache.miss_precision '" + name +
                         "' (native or bf16: the checkpoint's dtype, lossless, int8, int4, auto)");
}

const char* LoadPrecisionName(LoadPrecision p) {
  switch (p) {
    case LoadPrecision::kNative:
      return "native";
    case LoadPrecision::kInt8:
      return "int8";
    case LoadPrecision::kInt4:
      return "int4";
    case LoadPrecision::kAuto:
      return "auto";
    case LoadPrecision::kLossless:
      return "lossless";
  }
  return "?";
}

namespace {

DType QuantDType(LoadPrecision p) {
  if (p == LoadPrecision::kLossless) return DType::kPbf16;
  return p == LoadPrecision::kInt4 ? DType::kQ4 : DType::kQ8;
}

bool Quantizable(const runtime::ExpertWeights& w, LoadPrecision p) {
  return p != LoadPrecision::kNative && p != LoadPrecision::kAuto && CacheQuantizes(w, QuantDType(p));
}

}  // namespace

PackedLayout PackedExpertLayout(const runtime::ExpertWeights& w, LoadPrecision p) {
  PackedLayout l;
  static_cast<runtime::ExpertWeights&>(l) = w;
  for (runtime::Weight* part : l.parts()) part->data = nullptr;
  if (Quantizable(w, p)) l.gate.dtype = l.up.dtype = l.down.dtype = QuantDType(p);
  return l;
}

ExpertTiers::ExpertTiers(const runtime::ModelWeights* model, TierHooks hooks, PrecisionOptions precision)
    : model_(model),
      hooks_(std::move(hooks)),
      popts_(precision),
      precision_(precision.precision),
      quantized_precision_(precision.precision == LoadPrecision::kAuto ? precision.low : precision.precision),
      high_(precision.precision == LoadPrecision::kAuto ? LoadPrecision::kNative : precision.high) {
  // Full-precision loads packed and no low precision: every load is lossless.
  if (quantized_precision_ == LoadPrecision::kNative && high_ == LoadPrecision::kLossless)
    precision_ = quantized_precision_ = LoadPrecision::kLossless;
  if (quantized_precision_ == LoadPrecision::kLossless) high_ = LoadPrecision::kNative;
  const runtime::ModelConfig& c = model_->config();
  const size_t n = static_cast<size_t>(c.num_layers) * c.num_experts;
  convert_.assign(n, kNone);
  quantized_.resize(quantized_precision_ == LoadPrecision::kNative && high_ == LoadPrecision::kNative ? 0 : n);
  want_native_ = std::make_unique<std::atomic<uint8_t>[]>(n);
  resident_quantized_ = std::make_unique<std::atomic<uint8_t>[]>(n);
  uses_ = std::make_unique<std::atomic<int32_t>[]>(n);
  const std::vector<uint8_t>& low_layers = popts_.low_layers;
  for (int l : c.MoeLayers()) {
    const bool layer_low = low_layers.empty() || (l < static_cast<int>(low_layers.size()) && low_layers[l]);
    if (quantized_precision_ != LoadPrecision::kNative && !layer_low) ++num_native_layers_;
    for (int e = 0; e < c.num_experts; ++e) {
      const runtime::ExpertWeights& w = model_->host_expert(l, e);
      if (quantized_precision_ != LoadPrecision::kNative && layer_low) {
        const bool ok = Quantizable(w, quantized_precision_);
        if (ok) convert_[Index(l, e)] = kLow;
        if (!ok) ++num_unquantizable_;
      }
      if (convert_[Index(l, e)] == kNone && high_ == LoadPrecision::kLossless) {
        if (Quantizable(w, LoadPrecision::kLossless)) {
          convert_[Index(l, e)] = kHigh;
          ++num_packed_high_;
        } else {
          ++num_unpacked_high_;
        }
      }
      max_packed_bytes_ = std::max(max_packed_bytes_, Layout(l, e).bytes());
      // auto mixes precisions in one slot: room for the checkpoint's.
      if (precision_ == LoadPrecision::kAuto) max_packed_bytes_ = std::max(max_packed_bytes_, w.nbytes());
    }
  }
  if (num_unpacked_high_ > 0)
    EF_LOG(WARN, CACHE,
           "cache.high_precision lossless: %d experts load in the checkpoint's bytes (%s; only bf16 experts without "
           "biases whose widths are multiples of %d pack)",
           num_unpacked_high_, DTypeName(model_->expert_dtype()), PackedBf16Format::kGroup);
  if (num_unquantizable_ > 0 && quantized_precision_ == LoadPrecision::kLossless)
    EF_LOG(WARN, CACHE,
           "cache.miss_precision lossless: %d experts load in the checkpoint's dtype (%s; only bf16 experts without "
           "biases whose widths are multiples of %d pack)",
           num_unquantizable_, DTypeName(model_->expert_dtype()), PackedBf16Format::kGroup);
  else if (num_unquantizable_ > 0)
    EF_LOG(WARN, CACHE,
           "cache.miss_precision %s: %d experts load in the checkpoint's dtype (%s, biased, or widths the group of "
           "%d does not divide)",
           LoadPrecisionName(precision_), num_unquantizable_, DTypeName(model_->expert_dtype()),
           QuantFormat::Of(QuantDType(quantized_precision_)).group);
}

size_t ExpertTiers::Index(int layer, int expert) const {
  return static_cast<size_t>(layer) * model_->config().num_experts + expert;
}

PackedLayout ExpertTiers::Layout(int layer, int expert) const {
  const uint8_t c = convert_[Index(layer, expert)];
  const LoadPrecision p = c == kLow    ? quantized_precision_
                          : c == kHigh ? LoadPrecision::kLossless
                                       : LoadPrecision::kNative;
  return PackedExpertLayout(model_->host_expert(layer, expert), p);
}

PackedLayout ExpertTiers::ResidentLayout(int layer, int expert) const {
  // One precision: every load of the expert writes Layout(), through FillPacked or a host tier
  // that the owner filled with PackFromCheckpoint (the CUDA pinned tier, which FillPacked never
  // sees).
  if (precision_ != LoadPrecision::kAuto) return Layout(layer, expert);
  if (resident_quantized_[Index(layer, expert)].load(std::memory_order_acquire)) return Layout(layer, expert);
  return PackedExpertLayout(model_->host_expert(layer, expert), LoadPrecision::kNative);
}

void ExpertTiers::OnLayerRouting(int layer, std::span<const int32_t> ids, std::span<const float> weights) {
  if (precision_ != LoadPrecision::kAuto) return;
  const int E = model_->config().num_experts;
  for (int e = 0; e < E; ++e) want_native_[Index(layer, e)].store(0, std::memory_order_relaxed);
  for (size_t i = 0; i < ids.size() && i < weights.size(); ++i)
    if (ids[i] >= 0 && ids[i] < E && weights[i] >= popts_.low_gate)
      want_native_[Index(layer, ids[i])].store(1, std::memory_order_relaxed);
}

bool ExpertTiers::NoteUseWantsUpgrade(int layer, int expert) {
  if (precision_ != LoadPrecision::kAuto || popts_.upgrade_uses <= 0) return false;
  const size_t i = Index(layer, expert);
  if (!resident_quantized_[i].load(std::memory_order_acquire)) return false;
  if (uses_[i].fetch_add(1, std::memory_order_relaxed) + 1 < popts_.upgrade_uses) return false;
  want_native_[i].store(1, std::memory_order_relaxed);
  return true;
}

std::array<int64_t, 2> ExpertTiers::loads_by_precision() const {
  return {prec_loads_[0].load(std::memory_order_relaxed), prec_loads_[1].load(std::memory_order_relaxed)};
}

std::array<int64_t, 2> ExpertTiers::bytes_by_precision() const {
  return {prec_bytes_[0].load(std::memory_order_relaxed), prec_bytes_[1].load(std::memory_order_relaxed)};
}

Status ExpertTiers::Quantize(int layer, int expert, std::span<const std::byte> native, std::span<std::byte> dst) const {
  const runtime::ExpertWeights& w = model_->host_expert(layer, expert);
  const PackedLayout p = Layout(layer, expert);
  if (dst.size() < p.bytes()) return Internal("expert tiers: a slot smaller than the quantized expert");
  size_t src_off = 0, dst_off = 0;
  const runtime::Weight* from[] = {&w.gate, &w.up, &w.down};
  const runtime::Weight* to[] = {&p.gate, &p.up, &p.down};
  for (int i = 0; i < 3; ++i) {
    StatusOr<size_t> n = QuantizeExpertPart(popts_.calibrated.get(), layer, expert, i, to[i]->dtype, *from[i],
                                            native.data() + src_off, dst.data() + dst_off, to[i]->nbytes());
    if (!n.ok()) {
      Status st = std::move(n).status();
      st.Prepend("cache.miss_precision " + std::string(LoadPrecisionName(precision_)) + ": expert " +
                 std::to_string(expert) + " of layer " + std::to_string(layer));
      if (st.code() == StatusCode::kOutOfRange && to[i]->dtype == DType::kPbf16)
        st = OutOfRange(st.message() + " (load this model's experts in the checkpoint's bytes: cache.miss_precision " +
                        "and cache.high_precision native)");
      return st;
    }
    src_off += from[i]->nbytes();
    dst_off += *n;
  }
  return Status::Ok();
}

Status ExpertTiers::PackFromCheckpoint(int layer, int expert, std::span<std::byte> dst) const {
  const PackedLayout p = Layout(layer, expert);
  if (!CacheConverts(p.gate.dtype)) return CopyFromCheckpoint(layer, expert, dst);
  const runtime::ExpertWeights& w = model_->host_expert(layer, expert);
  std::vector<std::byte> native(w.nbytes());
  EF_RETURN_IF_ERROR(CopyFromCheckpoint(layer, expert, native));
  return Quantize(layer, expert, native, dst);
}

Status ExpertTiers::Prepare(bool progress) {
  if (quantized_.empty()) return Status::Ok();
  const runtime::ModelConfig& c = model_->config();
  int64_t total = 0;
  for (int l = 0; l < c.num_layers; ++l)
    if (c.IsMoeLayer(l))
      for (int e = 0; e < c.num_experts; ++e)
        if (Computes(l, e) && convert_[Index(l, e)] != kNone)
          total += static_cast<int64_t>(model_->host_expert(l, e).nbytes());
  std::string what = std::string("quantizing experts to ") + LoadPrecisionName(quantized_precision_);
  if (quantized_precision_ == LoadPrecision::kNative) what = "packing experts losslessly";
  if (num_packed_high_ > 0 && quantized_precision_ != LoadPrecision::kNative) what += ", packing the others";
  Progress bar(what, progress ? total : 0, progress ? 2.0 : 1e30);
  for (int l : c.MoeLayers()) {
    for (int e = 0; e < c.num_experts; ++e) {
      if (!Computes(l, e) || convert_[Index(l, e)] == kNone) continue;
      // The native bytes from the nearest tier, not counted as a load: this is the host tier's fill.
      const runtime::ExpertWeights& w = model_->host_expert(l, e);
      std::vector<std::byte> native(w.nbytes());
      if (hooks_.host && hooks_.host(l, e)) {
        std::memcpy(native.data(), hooks_.host(l, e), native.size());
      } else {
        EF_RETURN_IF_ERROR(CopyFromCheckpoint(l, e, native));
      }
      std::vector<std::byte> q(Layout(l, e).bytes());
      EF_RETURN_IF_ERROR(Quantize(l, e, native, q));
      {
        std::lock_guard<std::mutex> lock(quant_mu_);
        quantized_[Index(l, e)] = std::move(q);
      }
      bar.Advance(static_cast<int64_t>(w.nbytes()));
    }
  }
  return Status::Ok();
}

void ExpertTiers::Count(Tier t, size_t bytes) {
  loads_[static_cast<int>(t)].fetch_add(1, std::memory_order_relaxed);
  bytes_[static_cast<int>(t)].fetch_add(static_cast<int64_t>(bytes), std::memory_order_relaxed);
}

void ExpertTiers::ResetCounters() {
  for (auto& a : loads_) a.store(0, std::memory_order_relaxed);
  for (auto& a : bytes_) a.store(0, std::memory_order_relaxed);
  for (auto& a : prec_loads_) a.store(0, std::memory_order_relaxed);
  for (auto& a : prec_bytes_) a.store(0, std::memory_order_relaxed);
}

TierCounters ExpertTiers::counters() const {
  TierCounters c;
  for (int t = 0; t < kNumTiers; ++t) {
    c.loads[t] = loads_[t].load(std::memory_order_relaxed);
    c.bytes[t] = bytes_[t].load(std::memory_order_relaxed);
  }
  return c;
}

Status ExpertTiers::CopyFromCheckpoint(int layer, int expert, std::span<std::byte> dst) const {
  const runtime::ExpertWeights& w = model_->host_expert(layer, expert);
  if (dst.size() < w.nbytes())
    return Internal("expert tiers: a slot of " + std::to_string(dst.size()) + " bytes for an expert of " +
                    std::to_string(w.nbytes()));
  size_t off = 0;
  for (const runtime::Weight* p : w.parts()) {
    std::memcpy(dst.data() + off, p->data, p->nbytes());
    off += p->nbytes();
  }
  return Status::Ok();
}

Status ExpertTiers::FillPacked(int layer, int expert, std::span<std::byte> dst) {
  const size_t i = Index(layer, expert);
  const bool low =
      convert_[i] == kLow && (precision_ != LoadPrecision::kAuto || !want_native_[i].load(std::memory_order_relaxed));
  // Full precision, packed losslessly (cache.high_precision lossless): counted as full precision.
  const bool packed_high = convert_[i] == kHigh;
  uses_[i].store(0, std::memory_order_relaxed);
  if (!low && !packed_high) {
    EF_RETURN_IF_ERROR(FillNative(layer, expert, dst));
    resident_quantized_[i].store(0, std::memory_order_release);
    prec_loads_[0].fetch_add(1, std::memory_order_relaxed);
    prec_bytes_[0].fetch_add(static_cast<int64_t>(model_->host_expert(layer, expert).nbytes()),
                             std::memory_order_relaxed);
    return Status::Ok();
  }
  const size_t n = Layout(layer, expert).bytes();
  if (dst.size() < n) return Internal("expert tiers: a slot smaller than the converted expert");
  {
    std::lock_guard<std::mutex> lock(quant_mu_);
    std::vector<std::byte>& q = quantized_[i];
    if (!q.empty()) {
      std::memcpy(dst.data(), q.data(), n);
      Count(Tier::kHost, n);
    } else {
      // First use of an expert Prepare() did not cover: its native bytes from the nearest tier
      // (counted there), quantized once and kept.
      std::vector<std::byte> native(model_->host_expert(layer, expert).nbytes());
      EF_RETURN_IF_ERROR(FillNative(layer, expert, native));
      std::vector<std::byte> made(n);
      EF_RETURN_IF_ERROR(Quantize(layer, expert, native, made));
      std::memcpy(dst.data(), made.data(), n);
      if (keep_quantized_) q = std::move(made);
    }
  }
  resident_quantized_[i].store(low ? 1 : 0, std::memory_order_release);
  prec_loads_[low ? 1 : 0].fetch_add(1, std::memory_order_relaxed);
  prec_bytes_[low ? 1 : 0].fetch_add(static_cast<int64_t>(n), std::memory_order_relaxed);
  return Status::Ok();
}

Status ExpertTiers::FillNative(int layer, int expert, std::span<std::byte> dst) {
  const size_t n = model_->host_expert(layer, expert).nbytes();
  if (!hooks_.host) {  // one process: the mapping is the host tier
    EF_RETURN_IF_ERROR(CopyFromCheckpoint(layer, expert, dst));
    Count(Tier::kHost, n);
    return Status::Ok();
  }
  if (const std::byte* p = hooks_.host(layer, expert)) {
    if (dst.size() < n) return Internal("expert tiers: slot smaller than the expert");
    std::memcpy(dst.data(), p, n);
    Count(Tier::kHost, n);
    return Status::Ok();
  }
  return FillPackedBeyondHost(layer, expert, dst);
}

Status ExpertTiers::FillPackedBeyondHost(int layer, int expert, std::span<std::byte> dst) {
  const size_t n = model_->host_expert(layer, expert).nbytes();
  if (hooks_.peer) {
    if (dst.size() < n) return Internal("expert tiers: slot smaller than the expert");
    Status s = hooks_.peer(layer, expert, dst.first(n));
    if (s.ok()) {
      Count(Tier::kPeer, n);
      return s;
    }
    if (s.code() != StatusCode::kNotFound) return s;
  }
  EF_RETURN_IF_ERROR(CopyFromCheckpoint(layer, expert, dst));
  Count(Tier::kCheckpoint, n);
  return Status::Ok();
}

}  // namespace ef::cache
