// Fuzzes ModelConfig::FromJson (runtime/model/model_config.cc): config.json of every family.
// An accepted config must give a consistent layer layout and tensor names.
#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/model/model_config.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  auto config = ef::runtime::ModelConfig::FromJson(text, "fuzz/config.json");
  if (!config.ok()) return 0;
  const ef::runtime::ModelConfig& c = *config;
  EF_FUZZ_CHECK(c.num_layers > 0 && c.num_experts > 0 && c.top_k > 0 && c.top_k <= c.num_experts);
  EF_FUZZ_CHECK(c.hidden_size > 0 && c.num_heads > 0 && c.num_kv_heads > 0 && c.head_dim > 0);
  int moe_layers = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    const std::optional<ef::runtime::MoeLayer> m = c.MoeLayerOf(l);
    EF_FUZZ_CHECK(c.IsMoeLayer(l) == m.has_value());
    if (m) {
      EF_FUZZ_CHECK(m->index == moe_layers && c.DecoderLayer(*m) == l);
      ++moe_layers;
      EF_FUZZ_CHECK(!c.RouterName(l).empty() && !c.ExpertName(l, c.num_experts - 1, 2).empty());
    }
  }
  EF_FUZZ_CHECK(moe_layers == c.num_moe_layers());
  (void)c.q_dim();
  (void)c.kv_dim();
  return 0;
}
