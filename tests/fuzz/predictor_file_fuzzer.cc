// Fuzzes predictor files (placement/predictor_io.cc, placement/predictor_file.cc): the
// safetensors container, then the metadata and tensors of each predictor kind. An accepted
// predictor must forecast a batch without reading past its tables.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "placement/predictor_file.h"
#include "placement/predictor_io.h"
#include "tests/fuzz/fuzz_check.h"

using ef::placement::PredictorInput;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string bytes(reinterpret_cast<const char*>(data), size);
  auto file = ef::placement::ParsePredictorFile(bytes, "fuzz.predictor");
  if (!file.ok()) return 0;
  for (const auto& [name, t] : file->tensors) {
    const size_t n = t.dtype == "F32" ? t.f32.size() : t.i32.size();
    EF_FUZZ_CHECK(static_cast<int64_t>(n) == t.numel());
  }
  auto loaded = ef::placement::PredictorFromFile(*file, "fuzz.predictor");
  if (!loaded.ok()) return 0;
  const auto& info = loaded->info;
  ef::placement::Predictor& p = *loaded->predictor;
  EF_FUZZ_CHECK(p.num_layers() == info.num_layers && p.num_experts() == info.num_experts);
  // Forecasts are tokens x layers x experts floats: keep them small enough to run often.
  if (static_cast<int64_t>(info.num_layers) * info.num_experts > (1 << 16)) return 0;
  const std::vector<int32_t> context = {1, 2, 3, 0, 7};
  std::vector<PredictorInput> batch(2);
  batch[0] = {0, 0, 5, {}, {}};
  batch[1] = {1, 5, 9, context, {}};
  auto forecast = p.Predict(batch);
  if (forecast.ok()) {
    EF_FUZZ_CHECK(forecast->num_tokens == 2 && forecast->num_layers == info.num_layers &&
                  forecast->num_experts == info.num_experts);
    EF_FUZZ_CHECK(forecast->prob.size() == static_cast<size_t>(2) * info.num_layers * info.num_experts);
  }
  std::vector<int16_t> experts(static_cast<size_t>(info.num_layers) * info.top_k);
  for (size_t i = 0; i < experts.size(); ++i) experts[i] = static_cast<int16_t>(i % info.top_k);
  p.Observe(batch[1], experts, info.top_k);
  return 0;
}
