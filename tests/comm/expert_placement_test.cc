// ExpertPlacement: home and compute ranks for contiguous / round-robin / file placements,
// replication, and when a placement needs the peer tier.
#include "comm/expert_placement.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

namespace ef::comm {
namespace {

TEST(ExpertPlacementTest, ContiguousAndRoundRobin) {
  auto c = ExpertPlacement::Create({"contiguous", "home", 1}, 2, 3, 8);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  for (int e = 0; e < 8; ++e) {
    EXPECT_EQ(c->PrimaryHome(1, e), e < 4 ? 0 : 1);
    EXPECT_EQ(c->ComputeRank(1, e, 0), c->PrimaryHome(1, e));
  }
  EXPECT_FALSE(c->NeedsPeerFetch());
  auto r = ExpertPlacement::Create({"round_robin", "home", 1}, 3, 1, 8);
  ASSERT_TRUE(r.ok());
  for (int e = 0; e < 8; ++e) EXPECT_EQ(r->PrimaryHome(0, e), e % 3);
}

TEST(ExpertPlacementTest, ComputeAwayFromHomeNeedsPeerFetch) {
  auto p = ExpertPlacement::Create({"contiguous", "round_robin", 1}, 2, 1, 8);
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE(p->NeedsPeerFetch());
  EXPECT_EQ(p->ComputeRank(0, 1, 0), 1);  // expert 1 lives on rank 0, computes on rank 1
  EXPECT_FALSE(p->IsHome(1, 0, 1));
}

TEST(ExpertPlacementTest, ReplicationSpreadsHomesAndLoad) {
  auto p = ExpertPlacement::Create({"contiguous", "home", 2}, 4, 1, 8);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->HomeRanks(0, 7), (std::vector<int>{3, 0}));
  EXPECT_TRUE(p->IsHome(0, 0, 7));
  EXPECT_EQ(p->ComputeRank(0, 7, 0), 3);
  EXPECT_EQ(p->ComputeRank(0, 7, 1), 0);
  EXPECT_FALSE(p->NeedsPeerFetch());
  EXPECT_FALSE(ExpertPlacement::Create({"contiguous", "home", 5}, 4, 1, 8).ok());
}

TEST(ExpertPlacementTest, FromFile) {
  const auto path = std::filesystem::temp_directory_path() / "ef_placement_test.json";
  {
    std::ofstream f(path);
    f << R"({"home": [1, 1, 0, 0]})";
  }
  auto p = ExpertPlacement::Create({path.string(), "home", 1}, 2, 2, 4);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->PrimaryHome(1, 0), 1);
  EXPECT_EQ(p->PrimaryHome(1, 3), 0);
  {
    std::ofstream f(path);
    f << R"({"home": [1, 1, 0, 7]})";
  }
  auto bad = ExpertPlacement::Create({path.string(), "home", 1}, 2, 2, 4);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("home rank of expert 3"), std::string::npos);
  std::filesystem::remove(path);
}

// Writes `text` to a temporary placement file and returns its path.
std::string WriteFile(const std::string& name, const std::string& text) {
  const auto path = std::filesystem::temp_directory_path() / name;
  std::ofstream(path) << text;
  return path.string();
}

// Expects Create to fail with a message naming the file and containing `field`.
void ExpectError(const StatusOr<ExpertPlacement>& p, const std::string& path, const std::string& field) {
  ASSERT_FALSE(p.ok());
  const std::string m(p.status().message());
  EXPECT_NE(m.find(path), std::string::npos) << m;
  EXPECT_NE(m.find(field), std::string::npos) << m;
}

TEST(ExpertPlacementTest, FileRowsAreMoeLayers) {
  // Decoder layer 0 is dense: two rows map to decoder layers 1 and 2.
  const std::string path =
      WriteFile("ef_placement_moe.json", R"({"num_ranks": 2, "home": [[0, 1, 0, 1], [1, 1, 0, 0]]})");
  auto p = ExpertPlacement::Create({path, "home", 1}, 2, 3, 4, {1, 2});
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->PrimaryHome(1, 1), 1);
  EXPECT_EQ(p->PrimaryHome(2, 0), 1);
  EXPECT_EQ(p->PrimaryHome(2, 3), 0);
  // The run's banner shows the first MoE layer's homes, not the dense layer's zeros.
  EXPECT_NE(p->Describe().find("layer 1 homes [0 1 0 1] computes [0 1 0 1]"), std::string::npos) << p->Describe();
  // One row per decoder layer is the wrong shape.
  ExpectError(ExpertPlacement::Create({path, "home", 1}, 2, 3, 4, {0, 1, 2}), path, "\"home\" has 2 rows");
  std::filesystem::remove(path);
}

TEST(ExpertPlacementTest, FileForAnotherShapeOrRankCountFails) {
  const std::string path = WriteFile("ef_placement_shape.json", R"({"num_ranks": 2, "home": [[0, 1, 0, 1]]})");
  ExpectError(ExpertPlacement::Create({path, "home", 1}, 4, 1, 4), path, "\"num_ranks\" is 2 but this run has 4");
  ExpectError(ExpertPlacement::Create({path, "home", 1}, 2, 1, 8), path, "\"home\" row 0 must list 8 ranks");
  ExpectError(ExpertPlacement::Create({path, "home", 1}, 2, 2, 4), path, "\"home\" has 1 rows");
  std::filesystem::remove(path);
}

TEST(ExpertPlacementTest, UnbalancedFileFailsWithoutReplication) {
  const std::string path = WriteFile("ef_placement_unbalanced.json", R"({"home": [[0, 0, 0, 1]]})");
  ExpectError(ExpertPlacement::Create({path, "home", 1}, 2, 1, 4), path, "balanced");
  ExpectError(ExpertPlacement::Create({path, "home", 1}, 2, 1, 4), path, "\"home\" row 0");
  // With cluster.replication every expert has consecutive homes: the balance is the operator's.
  EXPECT_TRUE(ExpertPlacement::Create({path, "home", 2}, 2, 1, 4).ok());
  std::filesystem::remove(path);
}

TEST(ExpertPlacementTest, FileReplicas) {
  // Expert 0 has copies on ranks 0 and 1; 3 copies per rank.
  const std::string path = WriteFile("ef_placement_replicas.json",
                                     R"({"num_ranks": 2, "home": [[0, 0, 1, 1, 0]],
                                        "replicas": [{"layer": 0, "expert": 0, "ranks": [1]}]})");
  auto p = ExpertPlacement::Create({path, "home", 1}, 2, 1, 5);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->HomeRanks(0, 0), (std::vector<int>{0, 1}));
  EXPECT_TRUE(p->IsHome(1, 0, 0));
  EXPECT_EQ(p->ComputeRank(0, 0, 0), 0);  // each copy computes its own rank's tokens
  EXPECT_EQ(p->ComputeRank(0, 0, 1), 1);
  EXPECT_EQ(p->ComputeRank(0, 1, 1), 0);
  EXPECT_FALSE(p->NeedsPeerFetch());
  ExpectError(ExpertPlacement::Create({path, "home", 2}, 2, 1, 5), path, "\"replicas\" and cluster.replication");
  const std::string bad =
      WriteFile("ef_placement_replicas_bad.json",
                R"({"home": [[0, 0, 1, 1, 0]], "replicas": [{"layer": 3, "expert": 0, "ranks": [1]}]})");
  ExpectError(ExpertPlacement::Create({bad, "home", 1}, 2, 1, 5), bad, "\"replicas\"[0]: \"layer\" 3");
  std::filesystem::remove(path);
  std::filesystem::remove(bad);
}

}  // namespace
}  // namespace ef::comm
