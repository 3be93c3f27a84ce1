// `expertflow place` end to end: the real binary fits a placement on the FLAME-MoE trace, prints the
// costs as JSON, and writes a file the cluster's placement reader takes for the same rank count and
// refuses for another; bad input fails with an error naming the file and the field.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "comm/expert_placement.h"

namespace ef::launch {
namespace {

namespace fs = std::filesystem;

const std::string kFlame = std::string(EF_TEST_DATA) + "/traces/flame_moe_290m_prefill.jsonl";

class PlaceCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("ef_place_test_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  int Place(const std::string& args) {
    const std::string cmd = std::string(EF_BINARY) + " place " + args + " >" + (dir_ / "stdout").string() + " 2>" +
                            (dir_ / "stderr").string();
    const int rc = std::system(cmd.c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  }
  std::string Read(const fs::path& p) {
    std::ifstream in(p);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  std::string Path(const std::string& name) { return (dir_ / name).string(); }

  fs::path dir_;
};

TEST_F(PlaceCliTest, FitsScoresAndWritesAReadableFile) {
  const std::string out = Path("p4.json");
  ASSERT_EQ(Place("--trace " + kFlame + " --ranks 4 --train-seqs 0-23 --out " + out + " --json"), 0)
      << Read(dir_ / "stderr");
  const auto j = nlohmann::json::parse(Read(dir_ / "stdout"), nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << Read(dir_ / "stdout");
  EXPECT_EQ(j["test_seqs"], "24-31");
  EXPECT_LE(j["placed"].get<double>(), 0.7 * j["contiguous"].get<double>()) << j.dump();
  EXPECT_GT(j["round_robin"].get<double>(), j["placed"].get<double>());
  // The trace's 8 layers are the model's MoE layers (here decoder layers 1..8 after a dense one).
  std::vector<int> moe_layers;
  for (int l = 1; l <= 8; ++l) moe_layers.push_back(l);
  auto p = comm::ExpertPlacement::Create({out, "home", 1}, 4, 9, 64, moe_layers);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  auto other = comm::ExpertPlacement::Create({out, "home", 1}, 8, 9, 64, moe_layers);
  ASSERT_FALSE(other.ok());
  EXPECT_NE(other.status().message().find(out), std::string::npos);
  EXPECT_NE(other.status().message().find("\"num_ranks\" is 4"), std::string::npos) << other.status().message();
  auto shape = comm::ExpertPlacement::Create({out, "home", 1}, 4, 9, 32, moe_layers);
  ASSERT_FALSE(shape.ok());
  EXPECT_NE(shape.status().message().find("must list 32 ranks"), std::string::npos) << shape.status().message();
}

TEST_F(PlaceCliTest, TraceWithoutSequenceIdsFails) {
  const std::string trace = Path("noseq.jsonl");
  std::ofstream(trace) << R"({"format":"moe-routing-trace","version":1,"num_layers":1,"num_experts":4,"top_k":2})"
                       << "\n"
                       << R"({"pos":0,"experts":[[0,1]]})"
                       << "\n";
  EXPECT_EQ(Place("--trace " + trace + " --ranks 2 --out " + Path("p.json")), 1);
  const std::string err = Read(dir_ / "stderr");
  EXPECT_NE(err.find(trace), std::string::npos) << err;
  EXPECT_NE(err.find("\"seq\""), std::string::npos) << err;
}

TEST_F(PlaceCliTest, BadSplitsFailClearly) {
  EXPECT_EQ(Place("--trace " + kFlame + " --ranks 4 --train-seqs 0-31 --out " + Path("p.json")), 1);
  EXPECT_NE(Read(dir_ / "stderr").find("--test-seqs"), std::string::npos) << Read(dir_ / "stderr");
  EXPECT_EQ(Place("--trace " + kFlame + " --ranks 4 --train-seqs 100-120 --out " + Path("p.json")), 1);
  EXPECT_NE(Read(dir_ / "stderr").find("selects no sequence"), std::string::npos) << Read(dir_ / "stderr");
  EXPECT_EQ(Place("--trace " + kFlame + " --ranks 65 --out " + Path("p.json")), 1);
  EXPECT_NE(Read(dir_ / "stderr").find("--ranks"), std::string::npos) << Read(dir_ / "stderr");
}

}  // namespace
}  // namespace ef::launch
