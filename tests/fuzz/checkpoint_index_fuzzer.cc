// Fuzzes ParseCheckpointIndex (runtime/model/checkpoint.cc): model.safetensors.index.json.
// An accepted index must name only plain shard files inside the checkpoint directory.
#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/model/checkpoint.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  auto index = ef::runtime::ParseCheckpointIndex(text, "fuzz.index.json");
  if (!index.ok()) return 0;
  for (const auto& [tensor, shard] : *index) {
    EF_FUZZ_CHECK(!shard.empty() && shard != "." && shard != "..");
    EF_FUZZ_CHECK(shard.find('/') == std::string::npos);
  }
  return 0;
}
