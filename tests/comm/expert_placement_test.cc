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

}  // namespace
}  // namespace ef::comm
