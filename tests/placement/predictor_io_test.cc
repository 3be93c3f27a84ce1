// The predictor file reader rejects shapes that do not fit the file before multiplying them out.
#include "placement/predictor_io.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

namespace ef::placement {
namespace {

// A predictor file with `header` as its JSON header and `data_bytes` zero bytes of data.
std::string FileBytes(const nlohmann::json& header, size_t data_bytes) {
  const std::string text = header.dump();
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((text.size() >> (8 * i)) & 0xff);
  return bytes + text + std::string(data_bytes, '\0');
}

TEST(PredictorIoTest, ParsesAWellFormedFile) {
  auto f = ParsePredictorFile(FileBytes({{"__metadata__", {{"kind", "frequency"}}},
                                         {"w", {{"dtype", "F32"}, {"shape", {2, 3}}, {"data_offsets", {0, 24}}}}},
                                        24),
                              "good.safetensors");
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->tensors.at("w").f32.size(), 6u);
  EXPECT_EQ(f->metadata.at("kind"), "frequency");
}

// Found by tests/fuzz/predictor_file_fuzzer's harness: 2^40 x 2^40 overflowed int64 in numel()
// (undefined behaviour), and 2^31 x 2^31 F32 wrapped the byte count to 0, so an empty range
// passed and the reader tried to allocate 2^62 floats.
TEST(PredictorIoTest, RejectsShapesLargerThanTheFile) {
  for (const auto& shape :
       {nlohmann::json{int64_t{1} << 40, int64_t{1} << 40}, nlohmann::json{int64_t{1} << 31, int64_t{1} << 31}}) {
    auto f = ParsePredictorFile(FileBytes({{"w", {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {0, 0}}}}}, 0),
                                "huge.safetensors");
    ASSERT_FALSE(f.ok()) << shape.dump();
    EXPECT_NE(f.status().message().find("more bytes than the file holds"), std::string::npos) << f.status().message();
  }
}

TEST(PredictorIoTest, AcceptsEmptyTensors) {
  auto f = ParsePredictorFile(
      FileBytes({{"w", {{"dtype", "I32"}, {"shape", {0, int64_t{1} << 40}}, {"data_offsets", {0, 0}}}}}, 0),
      "empty.safetensors");
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_TRUE(f->tensors.at("w").i32.empty());
}

}  // namespace
}  // namespace ef::placement
