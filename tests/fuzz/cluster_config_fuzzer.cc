// Fuzzes ParseConfig (launch/config.cc): the YAML cluster/serving configuration. An accepted
// config must print as YAML that parses again to the same YAML.
#include <cstddef>
#include <cstdint>
#include <string>

#include "launch/config.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  auto config = ef::launch::ParseConfig(text, "fuzz.yaml");
  if (!config.ok()) return 0;
  const std::string yaml = ef::launch::ConfigToYaml(*config);
  auto again = ef::launch::ParseConfig(yaml, "fuzz.yaml (printed)");
  if (!again.ok()) std::fprintf(stderr, "%s\n---\n%s\n", again.status().ToString().c_str(), yaml.c_str());
  EF_FUZZ_CHECK(again.ok());
  EF_FUZZ_CHECK(ef::launch::ConfigToYaml(*again) == yaml);
  return 0;
}
