// Backend::CombineRows on the CPU backend: the MoE combine in one call adds, for every token, its
// experts' scaled rows in ascending expert order, so it gives the bits of ScatterAddRows called
// once per expert in ascending order (what the executor did before, and what the CUDA kernel and
// MoeRouted are checked against in tests/gpu). Routings with k = 1, 2 and 8 of 16 experts, a
// token count that leaves experts empty, and k = 1 onto a zeroed output (LocalMoeExecutor::
// ComputeRows).
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"

namespace ef::runtime {
namespace {

struct Routed {
  std::vector<int32_t> offset;  // [E + 1]: rows of expert e are [offset[e], offset[e + 1])
  std::vector<int32_t> perm;    // row -> token (expert-major)
  std::vector<float> scale;     // per row
  std::vector<int32_t> pos;     // [T * k]: token t's rows, ascending
};

// k distinct experts per token, counting-sorted by expert as the executor does.
Routed Route(int T, int k, int E, std::mt19937& rng) {
  std::vector<int32_t> ids;
  std::vector<float> w;
  std::uniform_real_distribution<float> u(0.05f, 1.f);
  for (int t = 0; t < T; ++t) {
    std::vector<int32_t> all(E);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    for (int j = 0; j < k; ++j) {
      ids.push_back(all[j]);
      w.push_back(u(rng));
    }
  }
  Routed r;
  r.offset.assign(E + 1, 0);
  for (int32_t e : ids) ++r.offset[e + 1];
  for (int e = 0; e < E; ++e) r.offset[e + 1] += r.offset[e];
  std::vector<int32_t> cursor(r.offset.begin(), r.offset.end() - 1);
  r.perm.resize(ids.size());
  r.scale.resize(ids.size());
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const int32_t e = ids[t * k + j];
      r.perm[cursor[e]] = t;
      r.scale[cursor[e]++] = w[t * k + j];
    }
  std::vector<int> filled(T, 0);
  r.pos.resize(ids.size());
  for (size_t row = 0; row < r.perm.size(); ++row) {
    const int32_t t = r.perm[row];
    r.pos[t * k + filled[t]++] = static_cast<int32_t>(row);
  }
  return r;
}

TEST(CombineRowsTest, IsTheScatterAddsInAscendingExpertOrder) {
  CpuBackend cpu;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int E = 16, H = 40;
  for (int k : {1, 2, 8}) {
    for (int T : {1, 3, 37}) {
      SCOPED_TRACE("k=" + std::to_string(k) + " T=" + std::to_string(T));
      const Routed r = Route(T, k, E, rng);
      std::vector<float> ye(r.perm.size() * H), base(static_cast<size_t>(T) * H);
      for (float& v : ye) v = nd(rng);
      for (float& v : base) v = nd(rng);
      std::vector<float> want = base, got = base;
      for (int e = 0; e < E; ++e) {
        const int64_t begin = r.offset[e], cnt = r.offset[e + 1] - begin;
        if (cnt > 0)
          cpu.ScatterAddRows(ye.data() + begin * H, r.perm.data() + begin, r.scale.data() + begin, cnt, H, want.data());
      }
      cpu.CombineRows(ye.data(), r.pos.data(), r.scale.data(), T, k, H, got.data());
      EXPECT_EQ(got, want);
      EXPECT_NE(got, base);
    }
  }
}

TEST(CombineRowsTest, OneRowEachOntoZeros) {
  // ComputeRows: every row has one expert; y starts at zero and receives scale * its expert's row.
  CpuBackend cpu;
  std::mt19937 rng(11);
  const int E = 8, H = 24, n = 19;
  const Routed r = Route(n, 1, E, rng);
  std::vector<float> ye(n * H);
  for (size_t i = 0; i < ye.size(); ++i) ye[i] = 0.25f * static_cast<float>(i % 13) - 1.f;
  std::vector<float> y(n * H, 0.f);
  cpu.CombineRows(ye.data(), r.pos.data(), r.scale.data(), n, 1, H, y.data());
  for (int t = 0; t < n; ++t)
    for (int d = 0; d < H; ++d) {
      const int32_t row = r.pos[t];
      ASSERT_EQ(r.perm[row], t);
      EXPECT_EQ(y[t * H + d], r.scale[row] * ye[row * H + d]) << "token " << t << " column " << d;
    }
}

}  // namespace
}  // namespace ef::runtime
