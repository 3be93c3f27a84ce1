#include "cache/slot_fill.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "runtime/core/quant.h"
#include "runtime/core/thread_pool.h"

namespace ef::cache {

Status WriteExpertSlot(const runtime::ModelWeights& model, const SlotLayout& layout, int layer, int expert,
                       std::span<std::byte> dst, int quant_threads, const QuantizedExperts* calibrated) {
  const runtime::ExpertWeights& from = model.host_expert(layer, expert);
  const runtime::ExpertWeights shape = layout.Shape(layer, expert);
  const auto name = [&] { return "expert " + std::to_string(expert) + " of layer " + std::to_string(layer); };
  if (dst.size() < layout.Bytes(shape))
    return InvalidArgument(name() + ": a slot of " + std::to_string(dst.size()) + " bytes for a layout of " +
                           std::to_string(layout.Bytes(shape)));
  const std::vector<const runtime::Weight*> src = from.parts(), to = shape.parts();
  const std::vector<size_t> off = layout.Offsets(shape);
  if (src.size() != to.size()) return Internal(name() + ": the slot layout has other parts than the checkpoint");
  for (size_t i = 0; i < src.size(); ++i) {
    const runtime::Weight& s = *src[i];
    const runtime::Weight& t = *to[i];
    if (s.rows != t.rows || s.cols != t.cols)
      return Internal(name() + ": part " + std::to_string(i) + " has another shape in the slot layout");
    std::byte* out = dst.data() + off[i];
    if (CacheConverts(t.dtype)) {
      StatusOr<size_t> n = QuantizeExpertPart(i < 3 ? calibrated : nullptr, layer, expert, static_cast<int>(i), t.dtype,
                                              s, s.data, out, t.nbytes(), quant_threads);
      if (!n.ok()) {
        Status st = std::move(n).status();
        st.Prepend(name());
        if (st.code() == StatusCode::kOutOfRange && t.dtype == DType::kPbf16)
          st = OutOfRange(st.message() + " (load this model's experts in the checkpoint's bytes: " +
                          "cache.miss_precision and cache.high_precision native)");
        return st;
      }
    } else {
      if (s.dtype != t.dtype) return Internal(name() + ": part " + std::to_string(i) + " changes dtype unquantized");
      std::memcpy(out, s.data, s.nbytes());
    }
  }
  return Status::Ok();
}

Status WriteExpertSlots(const runtime::ModelWeights& model, const SlotLayout& layout, std::span<const SlotFill> fills,
                        Progress* progress, int threads, const QuantizedExperts* calibrated) {
  if (fills.empty()) return Status::Ok();
  if (threads <= 0) threads = std::min(AvailableCpus(), 16);
  threads = std::min<int>(threads, static_cast<int>(fills.size()));
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;  // guards first_error and progress
  Status first_error = Status::Ok();
  // Fewer experts than CPUs: each expert's quantization takes the CPUs left over.
  const int quant_threads = std::max(1, AvailableCpus() / threads);
  auto work = [&] {
    for (size_t i = next.fetch_add(1); i < fills.size() && !failed.load(); i = next.fetch_add(1)) {
      const SlotFill& f = fills[i];
      Status st = WriteExpertSlot(model, layout, f.layer, f.expert, f.dst, quant_threads, calibrated);
      std::lock_guard<std::mutex> lock(mu);
      if (!st.ok()) {
        if (!failed.exchange(true)) first_error = std::move(st);
        return;
      }
      if (progress) progress->Advance(static_cast<int64_t>(f.dst.size()));
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  try {
    for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  } catch (const std::system_error&) {
    // No more threads to be had: the ones started and this one share the experts.
  }
  work();
  for (std::thread& t : pool) t.join();
  return first_error;
}

}  // namespace ef::cache
