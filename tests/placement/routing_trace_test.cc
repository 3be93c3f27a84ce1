// The trace reader rejects malformed input with an error naming the file and line.
#include "placement/routing_trace.h"

#include <gtest/gtest.h>

#include "tests/placement/predictor_test_util.h"

namespace ef::placement {
namespace {

const char* kHeader =
    R"({"format":"moe-routing-trace","version":1,"model":"m","num_layers":2,"num_experts":4,"top_k":2})";

Status ReadText(const std::string& name, const std::string& text) {
  auto path = testing::TempDir("trace") / name;
  testing::WriteText(path, text);
  return ReadRoutingTrace(path.string()).status();
}

TEST(RoutingTraceTest, ReadsAWellFormedTrace) {
  auto path = testing::TempDir("trace") / "good.jsonl";
  testing::WriteText(path,
                     std::string(kHeader) + "\n" + R"({"seq":0,"pos":0,"token":5,"experts":[[0,1],[2,3]]})" + "\n");
  auto tr = ReadRoutingTrace(path.string());
  ASSERT_TRUE(tr.ok()) << tr.status().ToString();
  EXPECT_EQ(tr->tokens.size(), 1u);
  EXPECT_EQ(tr->expert(0, 1, 1), 3);
}

TEST(RoutingTraceTest, RejectsBadJsonNamingTheLine) {
  Status s =
      ReadText("badjson.jsonl", std::string(kHeader) + "\n" + R"({"seq":0,"pos":0,"token":5,"experts":[[0,1],[2,3]]})" +
                                    "\n" + R"({"seq":0,"pos":1,"token":5,"experts":[[0,1],[2,3)" + "\n");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("line 3"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("not valid JSON"), std::string::npos) << s.message();
}

TEST(RoutingTraceTest, RejectsWrongLayerCount) {
  Status s =
      ReadText("layers.jsonl", std::string(kHeader) + "\n" + R"({"seq":0,"pos":0,"token":5,"experts":[[0,1]]})" + "\n");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("line 2"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("layers"), std::string::npos) << s.message();
}

TEST(RoutingTraceTest, RejectsExpertOutOfRange) {
  Status s =
      ReadText("range.jsonl", std::string(kHeader) + "\n" + R"({"seq":0,"pos":0,"token":5,"experts":[[0,1],[2,3]]})" +
                                  "\n" + R"({"seq":0,"pos":1,"token":5,"experts":[[0,1],[2,9]]})" + "\n");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("line 3"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("out of range"), std::string::npos) << s.message();
}

TEST(RoutingTraceTest, RejectsAnExpertListedTwiceInALayer) {
  Status s = ReadText("twice.jsonl",
                      std::string(kHeader) + "\n" + R"({"seq":0,"pos":0,"token":5,"experts":[[0,1],[3,3]]})" + "\n");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("line 2: expert id 3 listed twice at layer 1"), std::string::npos) << s.message();
}

// Found by tests/fuzz/routing_trace_fuzzer: a non-string "format" used to throw out of the
// reader (nlohmann's value()) and end the process.
TEST(RoutingTraceTest, RejectsNonStringFormat) {
  auto tr = ParseRoutingTrace(R"({"format":1,"version":1,"num_layers":2,"num_experts":4,"top_k":2})"
                              "\n"
                              R"({"seq":0,"pos":0,"token":5,"experts":[[0,1],[2,3]]})"
                              "\n",
                              "format.jsonl");
  ASSERT_FALSE(tr.ok());
  EXPECT_NE(tr.status().message().find("\"format\""), std::string::npos) << tr.status().message();
}

TEST(RoutingTraceTest, RejectsEmptyFileAndHeaderOnly) {
  Status empty = ReadText("empty.jsonl", "");
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(empty.message().find("empty"), std::string::npos) << empty.message();
  Status header_only = ReadText("header_only.jsonl", std::string(kHeader) + "\n");
  ASSERT_FALSE(header_only.ok());
  EXPECT_NE(header_only.message().find("no tokens"), std::string::npos) << header_only.message();
}

}  // namespace
}  // namespace ef::placement
