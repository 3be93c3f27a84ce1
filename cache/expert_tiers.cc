#include "cache/expert_tiers.h"

#include <cstring>
#include <string>
#include <utility>

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

ExpertTiers::ExpertTiers(const runtime::ModelWeights* model, TierHooks hooks)
    : model_(model), hooks_(std::move(hooks)) {}

void ExpertTiers::Count(Tier t, size_t bytes) {
  loads_[static_cast<int>(t)].fetch_add(1, std::memory_order_relaxed);
  bytes_[static_cast<int>(t)].fetch_add(static_cast<int64_t>(bytes), std::memory_order_relaxed);
}

TierCounters ExpertTiers::counters() const {
  TierCounters c;
  for (int t = 0; t < kNumTiers; ++t) {
    c.loads[t] = loads_[t].load(std::memory_order_relaxed);
    c.bytes[t] = bytes_[t].load(std::memory_order_relaxed);
  }
  return c;
}

Status ExpertTiers::CopyFromCheckpoint(int layer, int expert, std::span<std::byte> dst) {
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
