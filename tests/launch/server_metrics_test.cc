// ServerMetrics::Render: the communication series (rank 0's own all-to-all and UCX peer-fetch
// counters under mpirun) render with the values the source gives, and as zeros without one.
#include "launch/server/server_metrics.h"

#include <gtest/gtest.h>

#include <string>

namespace ef::launch {
namespace {

bool Has(const std::string& text, const std::string& line) { return text.find(line + "\n") != std::string::npos; }

TEST(ServerMetricsTest, CommCountersRenderWithTheSourcesValues) {
  ServerMetrics m(2, 4);
  comm::CommCounters c;
  c.rank = 0;
  c.world_size = 2;
  c.a2a_bytes_sent = 123456;
  c.a2a_bytes_received = 7890;
  c.a2a_exchanges = 42;
  c.peer_fetch_bytes = 9876543210;
  c.peer_fetches = 3;
  c.a2a_layer_bytes_sent = {0, 123456};
  c.a2a_layer_bytes_received = {0, 7890};
  m.SetCommCounters([&c] { return c; });
  std::string out = m.Render();
  for (const char* line : {
           "# HELP expertflow_a2a_bytes_total",
           "# TYPE expertflow_a2a_bytes_total counter",
           "# TYPE expertflow_a2a_exchanges_total counter",
           "# TYPE expertflow_peer_fetch_bytes_total counter",
           "# TYPE expertflow_peer_fetches_total counter",
           "# TYPE expertflow_cluster_ranks gauge",
       }) {
    EXPECT_NE(out.find(line), std::string::npos) << line << "\n" << out;
  }
  EXPECT_TRUE(Has(out, "expertflow_cluster_ranks 2")) << out;
  EXPECT_TRUE(Has(out, "expertflow_a2a_bytes_total{direction=\"sent\"} 123456")) << out;
  EXPECT_TRUE(Has(out, "expertflow_a2a_bytes_total{direction=\"received\"} 7890")) << out;
  EXPECT_TRUE(Has(out, "expertflow_a2a_exchanges_total 42")) << out;
  EXPECT_TRUE(Has(out, "expertflow_peer_fetch_bytes_total 9876543210")) << out;
  EXPECT_TRUE(Has(out, "expertflow_peer_fetches_total 3")) << out;
  EXPECT_TRUE(Has(out, "expertflow_a2a_layer_bytes_total{layer=\"0\",direction=\"sent\"} 0")) << out;
  EXPECT_TRUE(Has(out, "expertflow_a2a_layer_bytes_total{layer=\"1\",direction=\"sent\"} 123456")) << out;
  EXPECT_TRUE(Has(out, "expertflow_a2a_layer_bytes_total{layer=\"1\",direction=\"received\"} 7890")) << out;
  EXPECT_EQ(out.find("layer=\"2\""), std::string::npos) << "only the layers the source gives\n" << out;

  // Read at each render, not copied at SetCommCounters.
  c.a2a_bytes_sent = 200000;
  out = m.Render();
  EXPECT_TRUE(Has(out, "expertflow_a2a_bytes_total{direction=\"sent\"} 200000")) << out;
}

TEST(ServerMetricsTest, WithoutAClusterTheCommSeriesAreZero) {
  ServerMetrics m(2, 4);
  m.SetCommCounters([] {
    comm::CommCounters c;
    c.world_size = 4;
    c.a2a_bytes_sent = 1;
    return c;
  });
  m.SetCommCounters({});  // as serve does before the cluster goes
  const std::string out = m.Render();
  EXPECT_TRUE(Has(out, "expertflow_cluster_ranks 1")) << out;
  EXPECT_TRUE(Has(out, "expertflow_a2a_bytes_total{direction=\"sent\"} 0")) << out;
  EXPECT_TRUE(Has(out, "expertflow_a2a_bytes_total{direction=\"received\"} 0")) << out;
  EXPECT_TRUE(Has(out, "expertflow_a2a_exchanges_total 0")) << out;
  EXPECT_TRUE(Has(out, "expertflow_peer_fetch_bytes_total 0")) << out;
  EXPECT_TRUE(Has(out, "expertflow_peer_fetches_total 0")) << out;
}

// Every series has exactly one HELP and one TYPE line, and each sample follows its TYPE line's
// family (the exposition format's grouping rule).
TEST(ServerMetricsTest, EachFamilyHasOneHelpAndTypeLine) {
  ServerMetrics m(1, 2);
  m.SetCommCounters([] { return comm::CommCounters{}; });
  const std::string out = m.Render();
  for (const char* family : {"expertflow_a2a_bytes_total", "expertflow_a2a_exchanges_total",
                             "expertflow_peer_fetch_bytes_total", "expertflow_peer_fetches_total"}) {
    const std::string help = std::string("# HELP ") + family + " ";
    const std::string type = std::string("# TYPE ") + family + " counter\n";
    const size_t h = out.find(help), t = out.find(type);
    ASSERT_NE(h, std::string::npos) << family;
    ASSERT_NE(t, std::string::npos) << family;
    EXPECT_EQ(out.find(help, h + 1), std::string::npos) << family;
    EXPECT_LT(h, t) << family;
    EXPECT_EQ(out.compare(t + type.size(), std::string(family).size(), family), 0) << family;
  }
}

}  // namespace
}  // namespace ef::launch
