// Fuzzes SafetensorsFile's validation (runtime/model/safetensors_file.cc) on whole files: the
// header length, the JSON header, dtypes, shapes and data_offsets. An accepted file must
// describe tensors whose bytes lie inside it and match dtype x shape, so every byte is read.
#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/core/dtype.h"
#include "runtime/model/safetensors_file.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string bytes(reinterpret_cast<const char*>(data), size);
  auto file = ef::runtime::SafetensorsFile::FromBytes(std::move(bytes), "fuzz.safetensors");
  if (!file.ok()) return 0;
  unsigned sum = 0;
  for (const auto& [name, view] : (*file)->tensors()) {
    unsigned __int128 expect = ef::DTypeSize(view.dtype);
    for (int64_t d : view.shape) {
      EF_FUZZ_CHECK(d >= 0);
      expect *= static_cast<uint64_t>(d);
      if (expect > size) break;  // only a wrong shape can get here; the check below fails
    }
    EF_FUZZ_CHECK(expect == view.nbytes);
    EF_FUZZ_CHECK(view.nbytes <= size);
    // ASan reports a view that runs past the file's copy of the bytes.
    for (size_t i = 0; i < view.nbytes; ++i) sum += static_cast<unsigned>(view.data[i]);
  }
  return sum == 0xffffffffu ? 0 : 0;  // uses sum, so the reads are not optimized away
}
