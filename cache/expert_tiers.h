// ExpertTiers: where a rank's expert cache reads an expert that is not in its device slots. The
// tiers, nearest first:
//   host        this rank's host copy: on one process the checkpoint mapping (CPU) or the pinned
//               host tier (CUDA); under expert parallelism the experts homed on this rank (its
//               host shard, which peers read too);
//   peer        another rank's host shard, read with a UCX get (comm::PeerExpertSource);
//   checkpoint  the safetensors mapping (an expert no host tier keeps: past cache.host_budget, or
//               homed on a rank that keeps no copy of it).
// The hooks come from the deployment (launch/), so cache/ does not depend on the transport.
// Bytes are "packed": gate | up | down back to back, as the CPU slots and the host shards lay them
// out, in the load precision: the checkpoint's dtype, or (cache.miss_precision int8 | int4) the
// runtime's group-quantized kQ8 / kQ4 (runtime/core/quant_format.h), so a load moves 1.9x / 3.6x
// fewer bytes than bf16 and the backend's Gemm computes on the quantized block, or (lossless) bf16
// packed bit-exactly into kPbf16 (1.32x fewer bytes). "Low precision" and "quantized" below name
// all three; lossless loses nothing. The quantized host
// copies are made once: at Prepare() for the experts this rank computes, on first use for others
// (from the native bytes of the nearest tier). An expert whose shape the group does not divide
// stays in the checkpoint's dtype (a warning says how many; under lossless every expert that is
// not bf16).
//
// Host memory: under expert parallelism the rank's shard holds its home experts up to
// cache.host_budget; on CUDA the pinned tier pins those same experts (in the load precision), so
// the host holds up to about twice the budget; on the CPU path with int8/int4 the quantized copies
// of every expert this rank computes are made at Prepare, whatever the budget.
//
// Counters are per tier (loads and bytes; refills of a slot in another precision count as loads),
// atomic: counters() may be read from any thread while
// FillPacked runs on the engine's or the store's worker thread. FillPacked is thread-safe when the
// hooks are.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "cache/low_precision_layers.h"
#include "cache/quantized_experts.h"
#include "runtime/core/status.h"
#include "runtime/engine/model_weights.h"

namespace ef::cache {

enum class Tier { kHost = 0, kPeer = 1, kCheckpoint = 2 };
inline constexpr int kNumTiers = 3;
const char* TierName(Tier t);  // "host", "peer", "checkpoint"

struct TierHooks {
  // The packed host copy of (layer, expert) this rank keeps, or null: read from a peer or the
  // checkpoint. Unset: every expert has a host copy (one process: the checkpoint mapping is host
  // memory, CUDA pins it).
  std::function<const std::byte*(int layer, int expert)> host;
  // Reads the packed expert from a peer rank into `dst` (its exact size). NotFound when no peer
  // keeps a copy; any other error is returned to the load that needed it (a dead peer is named).
  std::function<Status(int layer, int expert, std::span<std::byte> dst)> peer;
  // Whether this rank computes (layer, expert) for its own tokens (prefetches are filtered by it:
  // under expert parallelism a rank loads only experts it computes). Unset: every expert.
  std::function<bool(int layer, int expert)> computes;
};

// The precision experts are loaded into device slots in (cache.miss_precision).
//   native, int8, int4: every load in that precision;
//   auto: HOBBIT's rule (arXiv 2411.01433): a miss whose gate weight is below low_gate for every
//         token of this rank's batch that routes to it loads in `low` precision, the others in the
//         checkpoint's; a low-precision resident expert used `upgrade_uses` times is reloaded in
//         the checkpoint's precision (it turned hot). Slots are then sized for native experts.
//   lossless: bf16 experts packed without losing a bit (kPbf16, runtime/core/packed_bf16_format.h):
//         0.756x the bytes of bf16 per load and 1.32x the experts per slot budget, outputs unchanged
//         up to the summation order of the backend's packed GEMV (bitwise on the CPU backend).
enum class LoadPrecision { kNative, kInt8, kInt4, kAuto, kLossless };
struct PrecisionOptions {
  LoadPrecision precision = LoadPrecision::kNative;
  LoadPrecision low = LoadPrecision::kInt8;  // auto's low precision: int8 or int4
  double low_gate = 0.5;                     // auto: gate weight below which a miss loads low
  int upgrade_uses = 16;                     // auto: uses of a low-precision copy before its upgrade; 0: never
  // Experts quantized ahead of time (GPTQ, cache.quantized_experts), in the low precision: their
  // blocks replace the round to nearest of the checkpoint. Null: every copy is rounded at load.
  std::shared_ptr<const QuantizedExperts> calibrated;
  // cache.low_precision_layers resolved (ResolveLowPrecisionLayers): per decoder layer, whether its
  // experts may load in low precision; the others always load in the checkpoint's dtype. Empty:
  // every layer.
  std::vector<uint8_t> low_layers;
  // cache.high_precision: how loads in the checkpoint's precision move, kNative (its bytes) or
  // kLossless (bf16 experts packed, PBF16): the layers outside low_layers and the experts the low
  // precision cannot take. Not with auto, whose slots hold either precision.
  LoadPrecision high = LoadPrecision::kNative;
};

// "native" (alias "bf16": the checkpoint's own dtype, outputs unchanged), "lossless", "int8", "int4",
// "auto".
StatusOr<LoadPrecision> ParseLoadPrecision(const std::string& name);
const char* LoadPrecisionName(LoadPrecision p);

// An expert's weights as packed at some precision: the shapes and dtypes of its parts() (data
// null), back to back; Rebased(base) views a packed copy.
struct PackedLayout : runtime::ExpertWeights {
  size_t bytes() const { return nbytes(); }
};

// The layout of `w` loaded at precision p: quantized, or the checkpoint's dtype when p is native
// or the group does not divide a width.
PackedLayout PackedExpertLayout(const runtime::ExpertWeights& w, LoadPrecision p);

struct TierCounters {
  std::array<int64_t, kNumTiers> loads{};
  std::array<int64_t, kNumTiers> bytes{};
};

class ExpertTiers {
 public:
  // `model` must outlive this object.
  ExpertTiers(const runtime::ModelWeights* model, TierHooks hooks, PrecisionOptions precision = {});

  // With a quantized precision: quantizes every routed expert this rank computes into the host
  // tier (all cores), printing progress on stderr when `progress` and it takes a while. No-op for
  // native loads.
  Status Prepare(bool progress);
  LoadPrecision precision() const { return precision_; }
  const PrecisionOptions& precision_options() const { return popts_; }
  // The packed layout of (layer, expert) in the low precision it loads in (quantized, or native
  // when the shape does not allow it), and the largest packed size any load may write (a slot's
  // size: native under auto).
  PackedLayout Layout(int layer, int expert) const;
  // The layout of what the last fill of (layer, expert) wrote (the slot's current contents):
  // Layout() unless the precision is auto.
  PackedLayout ResidentLayout(int layer, int expert) const;
  size_t ResidentBytes(int layer, int expert) const { return ResidentLayout(layer, expert).bytes(); }

  // auto: this rank's routing of `layer` (ids and gate weights, [tokens * top_k]) decides which of
  // its misses load in the checkpoint's precision (some token weighs the expert >= low_gate).
  void OnLayerRouting(int layer, std::span<const int32_t> ids, std::span<const float> weights);
  // auto: a use of the resident copy; true when it is low precision and turned hot (the caller
  // then refills it: the next fill is native).
  bool NoteUseWantsUpgrade(int layer, int expert);
  // Loads and bytes by precision: [0] the checkpoint's, [1] quantized.
  std::array<int64_t, 2> loads_by_precision() const;
  std::array<int64_t, 2> bytes_by_precision() const;
  size_t max_packed_bytes() const { return max_packed_bytes_; }
  // Experts left in the checkpoint's dtype by their shape (biases, widths the group does not
  // divide), and the MoE layers cache.low_precision_layers keeps there.
  int num_unquantizable() const { return num_unquantizable_; }
  int num_unpacked_high() const { return num_unpacked_high_; }
  // Experts whose full-precision loads are packed (cache.high_precision lossless).
  int num_packed_high() const { return num_packed_high_; }
  LoadPrecision high_precision() const { return high_; }
  int num_native_layers() const { return num_native_layers_; }
  // Whether (layer, expert) ever loads in low precision.
  bool LoadsLow(int layer, int expert) const { return !convert_.empty() && convert_[Index(layer, expert)] == kLow; }
  // Whether its full-precision loads are packed losslessly (cache.high_precision lossless).
  bool LoadsPackedHigh(int layer, int expert) const {
    return !convert_.empty() && convert_[Index(layer, expert)] == kHigh;
  }
  // Writes the packed expert at the load precision from the checkpoint mapping, counting nothing
  // (a host tier's initial fill).
  Status PackFromCheckpoint(int layer, int expert, std::span<std::byte> dst) const;
  // Whether a quantized copy made on first use is kept (the host tier of the CPU path). A CUDA
  // source pins its own host tier: copies of experts past it are made per load and dropped, so
  // cache.host_budget bounds host memory.
  void set_keep_quantized(bool keep) { keep_quantized_ = keep; }

  // Fills dst (at least the expert's packed size) from the nearest tier that keeps the expert.
  Status FillPacked(int layer, int expert, std::span<std::byte> dst);
  // Fills dst from the peer or checkpoint tier only (CUDA: the pinned host tier serves the rest).
  Status FillPackedBeyondHost(int layer, int expert, std::span<std::byte> dst);
  bool HasHostCopy(int layer, int expert) const { return !hooks_.host || hooks_.host(layer, expert) != nullptr; }
  bool Computes(int layer, int expert) const { return !hooks_.computes || hooks_.computes(layer, expert); }
  const TierHooks& hooks() const { return hooks_; }
  TierCounters counters() const;
  // Zeroes the load counters (by tier and by precision) after a warm-up.
  void ResetCounters();

 private:
  void Count(Tier t, size_t bytes);
  Status CopyFromCheckpoint(int layer, int expert, std::span<std::byte> dst) const;
  // Native packed bytes from the nearest tier (counted), for loads in the checkpoint's dtype.
  Status FillNative(int layer, int expert, std::span<std::byte> dst);
  // Quantizes native packed bytes into the layout of (layer, expert).
  Status Quantize(int layer, int expert, std::span<const std::byte> native, std::span<std::byte> dst) const;
  size_t Index(int layer, int expert) const;

  const runtime::ModelWeights* model_;
  TierHooks hooks_;
  PrecisionOptions popts_;
  LoadPrecision precision_;
  LoadPrecision quantized_precision_;  // int8, int4 or lossless: what a low-precision load writes
  LoadPrecision high_;                 // native or lossless: what a full-precision load writes
  size_t max_packed_bytes_ = 0;
  // Per (layer, expert), relaxed atomics (the engine thread and the store's loader touch them):
  // auto's choice for the next fill, what the last fill wrote, uses since that fill.
  std::unique_ptr<std::atomic<uint8_t>[]> want_native_, resident_quantized_;
  std::unique_ptr<std::atomic<int32_t>[]> uses_;
  std::array<std::atomic<int64_t>, 2> prec_loads_{}, prec_bytes_{};
  int num_unquantizable_ = 0;
  int num_unpacked_high_ = 0;  // experts cache.high_precision lossless leaves in the checkpoint's bytes
  int num_packed_high_ = 0;    // experts whose full-precision loads it packs
  int num_native_layers_ = 0;
  // [layer * E + expert]: how its loads are converted: not (the checkpoint's bytes), to the low
  // precision (shape allows it, layer selected) or packed losslessly (cache.high_precision).
  enum Convert : uint8_t { kNone = 0, kLow = 1, kHigh = 2 };
  std::vector<uint8_t> convert_;
  // Quantized host copies [layer * E + expert]; guarded by quant_mu_ (filled lazily off Prepare).
  std::mutex quant_mu_;
  std::vector<std::vector<std::byte>> quantized_;
  bool keep_quantized_ = true;
  std::array<std::atomic<int64_t>, kNumTiers> loads_{};
  std::array<std::atomic<int64_t>, kNumTiers> bytes_{};
};

}  // namespace ef::cache
