// Bad checkpoints and configs: each is a clear error naming the problem, never a crash.
// The same cases run through the real binary to check exit codes and messages.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <vector>

#include "runtime/engine/engine.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/model_config.h"
#include "runtime/model/safetensors_file.h"
#include "runtime/tokenizer/tokenizer.h"
#include "tests/runtime/quant_checkpoint_writer.h"

namespace ef::runtime {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("ef_bad_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes a safetensors file from a header object and a data section of `data_bytes` bytes.
  std::string WriteRaw(const std::string& name, const std::string& header, size_t data_bytes,
                       int64_t header_len_override = -1) {
    std::string path = (dir_ / name).string();
    std::ofstream out(path, std::ios::binary);
    uint64_t len = header_len_override >= 0 ? static_cast<uint64_t>(header_len_override) : header.size();
    out.write(reinterpret_cast<const char*>(&len), 8);
    out << header;
    std::string data(data_bytes, '\0');
    out << data;
    return path;
  }
  // Copies the mixtral fixture, then lets the test damage it.
  std::string CopyFixture(const std::string& family = "mixtral") {
    fs::path d = dir_ / family;
    fs::create_directories(d);
    for (auto& e : fs::directory_iterator(std::string(EF_TEST_DATA) + "/" + family))
      fs::copy_file(e.path(), d / e.path().filename());
    return d.string();
  }
  static std::string Message(const Status& s) { return s.ToString(); }

  fs::path dir_;
};

TEST_F(BadInputTest, TruncatedFileShorterThanHeaderLength) {
  std::string path = (dir_ / "t.safetensors").string();
  std::ofstream(path, std::ios::binary) << "abc";
  auto f = SafetensorsFile::Open(path);
  ASSERT_FALSE(f.ok());
  EXPECT_NE(Message(f.status()).find("shorter than the 8-byte header"), std::string::npos) << Message(f.status());
}

// A directory where the weights should be (mmap said "No such device").
TEST_F(BadInputTest, DirectoryNamedLikeASafetensorsFile) {
  const fs::path d = dir_ / "model.safetensors";
  fs::create_directories(d);
  auto f = SafetensorsFile::Open(d.string());
  ASSERT_FALSE(f.ok());
  EXPECT_NE(Message(f.status()).find("is a directory, not a safetensors file"), std::string::npos)
      << Message(f.status());
}

// The model directory's errors say what was given instead: nothing, a relative path (with where it
// was looked for), a file.
TEST_F(BadInputTest, ModelDirectoryErrorsSayWhatWasGiven) {
  auto empty = ModelConfig::FromModelDir("");
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(Message(empty.status()).find("no model directory given"), std::string::npos) << Message(empty.status());
  auto relative = ModelConfig::FromModelDir("no/such/model");
  ASSERT_FALSE(relative.ok());
  EXPECT_NE(Message(relative.status()).find("looked for at " + (fs::current_path() / "no/such/model").string()),
            std::string::npos)
      << Message(relative.status());
  const fs::path file = dir_ / "weights.bin";
  std::ofstream(file) << "x";
  auto not_dir = Checkpoint::Open(file.string());
  ASSERT_FALSE(not_dir.ok());
  EXPECT_NE(Message(not_dir.status()).find("is a file: give the checkpoint's directory"), std::string::npos);
}

TEST_F(BadInputTest, HeaderLengthPastEndOfFile) {
  auto path = WriteRaw("h.safetensors", "{}", 0, /*header_len_override=*/4096);
  auto f = SafetensorsFile::Open(path);
  ASSERT_FALSE(f.ok());
  EXPECT_NE(Message(f.status()).find("runs past the end of the file"), std::string::npos) << Message(f.status());
}

TEST_F(BadInputTest, HugeHeaderLengthIsRejectedBeforeReading) {
  auto path = WriteRaw("h.safetensors", "{}", 0, /*header_len_override=*/int64_t{1} << 40);
  auto f = SafetensorsFile::Open(path);
  ASSERT_FALSE(f.ok());
  EXPECT_NE(Message(f.status()).find("exceeds the limit"), std::string::npos) << Message(f.status());
}

TEST_F(BadInputTest, MalformedHeaderJson) {
  auto path = WriteRaw("j.safetensors", "{\"a\": [1, 2", 0);
  auto f = SafetensorsFile::Open(path);
  ASSERT_FALSE(f.ok());
  EXPECT_NE(Message(f.status()).find("not a well-formed JSON"), std::string::npos);
}

TEST_F(BadInputTest, OverlappingTensors) {
  json h = {{"a", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}},
            {"b", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {8, 24}}}}};
  auto f = SafetensorsFile::Open(WriteRaw("o.safetensors", h.dump(), 24));
  ASSERT_FALSE(f.ok());
  EXPECT_NE(Message(f.status()).find("overlap"), std::string::npos) << Message(f.status());
  EXPECT_NE(Message(f.status()).find("\"a\""), std::string::npos);
  EXPECT_NE(Message(f.status()).find("\"b\""), std::string::npos);
}

TEST_F(BadInputTest, TensorRangeLeavesTheFile) {
  json h = {{"w", {{"dtype", "F32"}, {"shape", {8}}, {"data_offsets", {0, 32}}}}};
  auto f = SafetensorsFile::Open(WriteRaw("r.safetensors", h.dump(), 16));
  ASSERT_FALSE(f.ok());
  EXPECT_NE(Message(f.status()).find("leaves the data section"), std::string::npos) << Message(f.status());
}

TEST_F(BadInputTest, RangeInconsistentWithDtypeTimesShape) {
  json h = {{"w", {{"dtype", "BF16"}, {"shape", {2, 3}}, {"data_offsets", {0, 24}}}}};
  auto f = SafetensorsFile::Open(WriteRaw("s.safetensors", h.dump(), 24));
  ASSERT_FALSE(f.ok());
  EXPECT_NE(Message(f.status()).find("needs 12"), std::string::npos) << Message(f.status());
}

// dtype size x element count used to wrap to 0 (F64 x 2^61 elements), so an empty byte range
// passed for a tensor of 2^61 elements.
TEST_F(BadInputTest, ByteCountThatWouldWrapIsRejected) {
  json h = {{"w", {{"dtype", "F64"}, {"shape", {uint64_t{1} << 61}}, {"data_offsets", {0, 0}}}}};
  auto f = SafetensorsFile::Open(WriteRaw("s.safetensors", h.dump(), 0));
  ASSERT_FALSE(f.ok());
  EXPECT_NE(Message(f.status()).find("impossibly large"), std::string::npos) << Message(f.status());
}

TEST_F(BadInputTest, WrongDtypeString) {
  json h = {{"w", {{"dtype", "F33"}, {"shape", {2}}, {"data_offsets", {0, 8}}}}};
  auto f = SafetensorsFile::Open(WriteRaw("d.safetensors", h.dump(), 8));
  ASSERT_FALSE(f.ok());
  EXPECT_NE(Message(f.status()).find("unknown dtype \"F33\""), std::string::npos) << Message(f.status());
}

TEST_F(BadInputTest, ValidFileRoundTrips) {
  std::vector<float> a = {1, 2, 3, 4};
  std::vector<uint16_t> b = {F32ToBf16(0.5f), F32ToBf16(-2.f)};
  std::string path = (dir_ / "ok.safetensors").string();
  ASSERT_TRUE(WriteSafetensors(path, {{"a", DType::kF32, {2, 2}, a.data()}, {"b", DType::kBF16, {2}, b.data()}}).ok());
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  const TensorView* tb = (*f)->Find("b");
  ASSERT_NE(tb, nullptr);
  float out[2];
  ConvertToF32(tb->dtype, tb->data, out, 2);
  EXPECT_EQ(out[0], 0.5f);
  EXPECT_EQ(out[1], -2.f);
}

TEST_F(BadInputTest, MissingTensorIsNamed) {
  std::string d = CopyFixture();
  // Rewrite the checkpoint without one expert's weight.
  auto src = SafetensorsFile::Open(d + "/model.safetensors");
  ASSERT_TRUE(src.ok());
  std::vector<TensorToWrite> keep;
  const std::string dropped = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
  for (const auto& [name, v] : (*src)->tensors())
    if (name != dropped) keep.push_back({name, v.dtype, v.shape, v.data});
  ASSERT_TRUE(WriteSafetensors(d + "/model.new", keep).ok());
  src = Status(StatusCode::kInternal, "closed");
  fs::rename(d + "/model.new", d + "/model.safetensors");
  EngineOptions o;
  o.backend = "cpu";
  auto e = Engine::Create(d, o);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find(dropped), std::string::npos) << e.status().ToString();
}

TEST_F(BadInputTest, ShardListedInIndexButMissingTensor) {
  std::string d = CopyFixture("mixtral_sharded");
  std::ifstream in(d + "/model.safetensors.index.json");
  json idx = json::parse(in);
  idx["weight_map"]["model.layers.9.imaginary.weight"] = "model-00001-of-00009.safetensors";
  std::ofstream(d + "/model.safetensors.index.json") << idx.dump();
  auto c = Checkpoint::Open(d);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("model.layers.9.imaginary.weight"), std::string::npos);
}

// A NaN or an infinity in a float weight is named at load: it would fail nowhere later (the logits
// turn to NaN and greedy decoding emits token 0 on and on). F32 and BF16 checkpoints alike.
TEST_F(BadInputTest, NonFiniteWeightsAreNamed) {
  const std::string fixture = std::string(EF_TEST_DATA) + "/mixtral";
  auto file = SafetensorsFile::Open(fixture + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  const json config = testing::ReadConfig(fixture);
  const std::string bad_name = "model.layers.1.block_sparse_moe.experts.3.w2.weight";  // [64, 128]
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), kInf, -kInf}) {
      SCOPED_TRACE(std::string(DTypeName(dt)) + " " + std::to_string(bad));
      testing::TensorMap tensors;
      for (const auto& [name, v] : (*file)->tensors()) {
        std::vector<float> values = testing::AsF32(testing::ReadTensor(v));
        if (name == bad_name) values[2 * 128 + 5] = bad;  // row 2, column 5
        tensors[name] = testing::FloatTensor(dt, v.shape, values);
      }
      const std::string dir = (dir_ / (std::string("bad_") + DTypeName(dt))).string();
      ASSERT_TRUE(testing::WriteCheckpoint(dir, tensors, config).ok());
      EngineOptions o;
      o.backend = "cpu";
      auto engine = Engine::Create(dir, o);
      ASSERT_FALSE(engine.ok());
      EXPECT_NE(engine.status().message().find("\"" + bad_name +
                                               "\" holds 1 NaN or infinite value (the first at row 2, "
                                               "column 5)"),
                std::string::npos)
          << engine.status().ToString();
    }
  }
  // The same weights, every value finite, load.
  testing::TensorMap tensors;
  for (const auto& [name, v] : (*file)->tensors()) tensors[name] = testing::ReadTensor(v);
  ASSERT_TRUE(testing::WriteCheckpoint((dir_ / "good").string(), tensors, config).ok());
  EngineOptions o;
  o.backend = "cpu";
  EXPECT_TRUE(Engine::Create((dir_ / "good").string(), o).ok());
}

// CountNonFinite over an array past its threaded size: the count and the first index whatever the
// thread that finds it.
TEST(CountNonFiniteTest, LargeArraysCountEveryValueAndReportTheFirst) {
  std::vector<uint16_t> x(size_t{40} << 20, F32ToBf16(1.5f));  // 80 MiB of BF16
  int64_t first = 0;
  EXPECT_EQ(CountNonFinite(DType::kBF16, x.data(), static_cast<int64_t>(x.size()), &first), 0);
  EXPECT_EQ(first, -1);
  const int64_t at[] = {static_cast<int64_t>(x.size()) - 1, 30'000'001, 7};
  for (int64_t i : at) x[static_cast<size_t>(i)] = F32ToBf16(std::numeric_limits<float>::infinity());
  EXPECT_EQ(CountNonFinite(DType::kBF16, x.data(), static_cast<int64_t>(x.size()), &first), 3);
  EXPECT_EQ(first, 7);
  x[7] = F32ToBf16(1.5f);
  EXPECT_EQ(CountNonFinite(DType::kBF16, x.data(), static_cast<int64_t>(x.size()), &first), 2);
  EXPECT_EQ(first, 30'000'001);
  // F16 and F32: the largest finite values are not counted, NaN and infinities are.
  const uint16_t h[] = {0x7bff, 0x7c00, 0xfe00, 0x0001};
  EXPECT_EQ(CountNonFinite(DType::kF16, h, 4, &first), 2);
  EXPECT_EQ(first, 1);
  const float f[] = {3.4e38f, -3.4e38f, std::nanf(""), 0.f};
  EXPECT_EQ(CountNonFinite(DType::kF32, f, 4, &first), 1);
  EXPECT_EQ(first, 2);
}

TEST_F(BadInputTest, UnknownModelType) {
  auto c = ModelConfig::FromJson(R"({"model_type": "llama", "vocab_size": 10})", "config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(c.status().message().find("\"llama\""), std::string::npos);
}

TEST_F(BadInputTest, MalformedConfigAndMissingOrWrongFields) {
  EXPECT_NE(ModelConfig::FromJson("{\"model_type\": ", "config.json").status().message().find("not valid JSON"),
            std::string::npos);
  std::ifstream in(std::string(EF_TEST_DATA) + "/qwen3_moe/config.json");
  json good = json::parse(in);
  json missing = good;
  missing.erase("moe_intermediate_size");
  auto c1 = ModelConfig::FromJson(missing.dump(), "config.json");
  ASSERT_FALSE(c1.ok());
  EXPECT_NE(c1.status().message().find("\"moe_intermediate_size\" is missing"), std::string::npos);
  json wrong = good;
  wrong["hidden_size"] = "sixty-four";
  auto c2 = ModelConfig::FromJson(wrong.dump(), "config.json");
  ASSERT_FALSE(c2.ok());
  EXPECT_NE(c2.status().message().find("\"hidden_size\" must be an integer"), std::string::npos);
  json bad_value = good;
  bad_value["num_experts_per_tok"] = 99;
  EXPECT_FALSE(ModelConfig::FromJson(bad_value.dump(), "config.json").ok());
  EXPECT_TRUE(ModelConfig::FromJson(good.dump(), "config.json").ok());
}

// A wrongly typed rope_parameters.rope_type used to throw out of FromJson (nlohmann's value()).
TEST_F(BadInputTest, NonStringRopeTypeIsAnError) {
  std::ifstream in(std::string(EF_TEST_DATA) + "/qwen3_moe/config.json");
  json config = json::parse(in);
  config["rope_parameters"] = {{"rope_type", 7}, {"rope_theta", 10000.0}};
  auto c = ModelConfig::FromJson(config.dump(), "config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("\"rope_type\" must be a string"), std::string::npos) << c.status().message();
}

// rope_theta 0 (or negative) gave NaN rotations and pad tokens out; refused, in both spellings.
TEST_F(BadInputTest, NonPositiveRopeThetaIsAnError) {
  std::ifstream in(std::string(EF_TEST_DATA) + "/qwen3_moe/config.json");
  const json good = json::parse(in);
  json v5 = good;
  v5["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 0.0}};
  json old = good;
  old.erase("rope_parameters");
  old["rope_theta"] = -1.0;
  for (const json& config : {v5, old}) {
    auto c = ModelConfig::FromJson(config.dump(), "config.json");
    ASSERT_FALSE(c.ok()) << config.dump();
    EXPECT_NE(c.status().message().find("\"rope_theta\" must be positive"), std::string::npos) << c.status().message();
  }
}

TEST_F(BadInputTest, MissingTokenizer) {
  auto t = Tokenizer::FromModelDir(CopyFixture());  // fixtures ship no tokenizer.json
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("tokenizer.json"), std::string::npos);
}

TEST_F(BadInputTest, TokenOutsideVocabulary) {
  EngineOptions o;
  o.backend = "cpu";
  auto e = Engine::Create(std::string(EF_TEST_DATA) + "/mixtral", o);
  ASSERT_TRUE(e.ok());
  ASSERT_TRUE((*e)->AddSequence(0).ok());
  std::vector<int32_t> ids = {1, 100000};
  SeqChunk chunk{0, ids, false};
  ForwardResult r;
  Status s = (*e)->Forward({&chunk, 1}, &r);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("outside the vocabulary"), std::string::npos);
}

// The binary: non-zero exit, "error:" naming the problem, no signal.
struct RunResult {
  int exit_code;
  bool signaled;
  std::string output;
};
RunResult RunBinary(const std::string& args) {
  std::string cmd = std::string(EF_BINARY) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int st = pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, WIFSIGNALED(st), out};
}

TEST_F(BadInputTest, BinaryReportsErrorsWithNonZeroExit) {
  std::string d = CopyFixture();
  // Truncate the weights to half.
  auto size = fs::file_size(d + "/model.safetensors");
  fs::resize_file(d + "/model.safetensors", size / 2);
  std::ofstream(dir_ / "ids.json") << R"({"input_ids": [[1, 2, 3]]})";
  RunResult r = RunBinary("score --backend cpu --model " + d + " --ids-file " + (dir_ / "ids.json").string());
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_FALSE(r.signaled);
  EXPECT_NE(r.output.find("error: invalid safetensors file"), std::string::npos) << r.output;

  std::ofstream(d + "/config.json") << R"({"model_type": "gpt2"})";
  r = RunBinary("score --backend cpu --model " + d + " --ids-file " + (dir_ / "ids.json").string());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("model_type \"gpt2\" is not supported"), std::string::npos) << r.output;

  r = RunBinary("generate --backend cpu --model " + CopyFixture("olmoe") + " -n 2");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("tokenizer.json"), std::string::npos) << r.output;

  r = RunBinary("generate --model /nonexistent/dir -n 2");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("/nonexistent/dir"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace ef::runtime
