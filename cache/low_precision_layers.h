// The MoE layers whose expert loads may be low precision (cache.low_precision_layers): parsed from
// the config's text, resolved against a model. Apart from the expert tiers so the config's check
// (launch/config.cc) needs nothing of the cache.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "runtime/core/status.h"
#include "runtime/model/model_config.h"

namespace ef::cache {

// cache.low_precision_layers: the MoE layers whose experts may load in low precision (int8, int4,
// or auto's low precision); the other layers' loads stay in the checkpoint's dtype.
//   "all"        every MoE layer (the default);
//   "last P%"    the last floor(P% of the MoE layers), e.g. "last 50%" (0 < P <= 100);
//   "A-B,C,..."  decoder layer indices and inclusive ranges (dense layers inside a range are
//                skipped; a single index must be an MoE layer).
// Quantization noise in an early layer's experts reaches every later router, so early layers are
// the sensitive ones: on tiny-code-moe the first MoE layer in int8 alone costs most of what every
// layer in int8 costs (docs/results/quant/README.md, "Which layers").
struct LowPrecisionLayers {
  bool all = true;
  double last_percent = 0;                  // > 0: "last P%"
  std::vector<std::pair<int, int>> ranges;  // inclusive decoder layer ranges
};
// Syntax alone (the config's check): InvalidArgument naming the key and the text.
StatusOr<LowPrecisionLayers> ParseLowPrecisionLayers(const std::string& spec);
// Against a model: per decoder layer, 1 where loads may be low precision; empty for "all". An index
// past the model's layers, a single dense (non-MoE) layer, or a selection of no MoE layer is an
// error.
StatusOr<std::vector<uint8_t>> ResolveLowPrecisionLayers(const std::string& spec, const runtime::ModelConfig& config);
// "MoE layers 4-7" style text of a resolved selection ("every MoE layer" when empty).
std::string DescribeLayers(const std::vector<uint8_t>& layers);

}  // namespace ef::cache
