// The CUDA backend's ops for DeepSeek MLA and GPT-OSS (RopeTable, AttentionEx, GemmPerHead,
// Copy2D, ClampedSwiGlu) against the CPU backend on random inputs, in the shapes the engine uses
// them with. fp32: normwise relative error (max |d| / max |ref|) <= 1e-5; Copy2D is exact.
// Skips when no CUDA device is visible.
#include <gtest/gtest.h>

#include "runtime/backend/cpu/cpu_backend.h"
#include "tests/gpu/gpu_test_util.h"

namespace ef::runtime {
namespace {

using testing::DeviceArrays;
using testing::MaxRelError;
using testing::RandomFloats;

class CudaModelOpsTest : public testing::CpuVsCudaTest<> {};

TEST_F(CudaModelOpsTest, RopeTableStridedSlicesBothConventions) {
  const int rows = 13, heads = 4, dq = 24, nope = 16, rot = 8;
  std::vector<int32_t> pos(rows);
  for (int r = 0; r < rows; ++r) pos[r] = r * 311 % 4000;
  const std::vector<float> inv = RandomFloats(rot / 2, 3, 0.001f, 1.f);
  for (bool interleaved : {false, true}) {
    auto x = RandomFloats(rows * heads * dq, 1);
    RopeSpec spec{rot, heads * dq, dq, nope, inv.data(), 1.3f, interleaved};
    std::vector<float> want = x;
    cpu_.RopeTable(want.data(), pos.data(), rows, heads, spec);
    float* xd = dev_->Put(x);
    spec.inv_freq = dev_->Put(inv);
    gpu_->RopeTable(xd, dev_->Put(pos), rows, heads, spec);
    EXPECT_LE(MaxRelError(dev_->Get(xd, x.size()), want), 1e-5) << "interleaved " << interleaved;
  }
}

struct AttnCase {
  const char* name;
  int heads, kv_heads, qk_dim, v_dim, k_stride, window;
  bool sinks;
  int decode_total = 700;  // n_total of the decode step (past ~12k keys the kernel opts in to more shared memory)
};

TEST_F(CudaModelOpsTest, AttentionExMatchesCpuForMlaWindowAndSinks) {
  // MLA absorbed form: one 40-float cached row (latent 32 | rope 8) serves every head, value = latent.
  for (AttnCase c :
       {AttnCase{"mla", 4, 1, 40, 32, 40, 0, false}, AttnCase{"gpt_oss_sliding", 4, 2, 16, 16, 32, 8, true},
        AttnCase{"gpt_oss_full", 4, 2, 16, 16, 32, 0, true}, AttnCase{"long_gqa", 8, 2, 64, 64, 128, 0, false},
        // DeepSeek's real MLA widths (latent 512 | rope 64), at the 48 KiB boundary and past it.
        AttnCase{"mla_real_boundary", 8, 1, 576, 512, 576, 0, false, 11705},
        AttnCase{"mla_real_optin", 8, 1, 576, 512, 576, 0, false, 13000}}) {
    const bool mla = c.kv_heads == 1 && c.v_dim < c.qk_dim;
    const int v_stride = mla ? c.k_stride : c.kv_heads * c.v_dim;
    // (n_new, n_total): a prefill, a decode step
    const int lens[2][2] = {{11, 11}, {1, c.window ? 300 : c.decode_total}};
    int64_t rows = 0;
    std::vector<AttentionSeq> seqs;
    std::vector<std::vector<float>> ks, vs;
    for (int s = 0; s < 2; ++s) {
      ks.push_back(RandomFloats(static_cast<size_t>(lens[s][1]) * c.k_stride, 10 + s));
      vs.push_back(RandomFloats(static_cast<size_t>(lens[s][1]) * v_stride, 20 + s));
      seqs.push_back(AttentionSeq{ks[s].data(), mla ? ks[s].data() : vs[s].data(), rows, lens[s][0], lens[s][1]});
      rows += lens[s][0];
    }
    AttentionSpec spec;
    spec.num_heads = c.heads;
    spec.num_kv_heads = c.kv_heads;
    spec.qk_dim = c.qk_dim;
    spec.v_dim = c.v_dim;
    spec.q_stride = c.heads * c.qk_dim;
    spec.k_stride = c.k_stride;
    spec.v_stride = v_stride;
    spec.out_stride = c.heads * c.v_dim;
    spec.scale = 0.2f;
    spec.window = c.window;
    const std::vector<float> sinks = RandomFloats(c.heads, 5, -2.f, 2.f);
    spec.sinks = c.sinks ? sinks.data() : nullptr;
    const auto q = RandomFloats(rows * spec.q_stride, 2);
    std::vector<float> want(rows * spec.out_stride);
    cpu_.AttentionEx(q.data(), seqs.data(), 2, spec, want.data());
    std::vector<AttentionSeq> dseqs = seqs;
    for (int s = 0; s < 2; ++s) {
      dseqs[s].k = dev_->Put(ks[s]);
      dseqs[s].v = mla ? dseqs[s].k : dev_->Put(vs[s]);
    }
    if (c.sinks) spec.sinks = dev_->Put(sinks);
    float* out = dev_->Zeros<float>(want.size());
    gpu_->AttentionEx(dev_->Put(q), dseqs.data(), 2, spec, out);
    EXPECT_LE(MaxRelError(dev_->Get(out, want.size()), want), 1e-5) << c.name;
  }
}

TEST_F(CudaModelOpsTest, GemmPerHeadStridedF32AndBf16) {
  const int rows = 7, heads = 4, k = 16, n = 32, x_head = 24, y_head = 40;
  const auto x = RandomFloats(rows * heads * x_head, 1);
  for (DType dt : {DType::kF32, DType::kBF16}) {
    const auto wf = RandomFloats(heads * n * k, 2);
    std::vector<uint16_t> wb(wf.size());
    for (size_t i = 0; i < wf.size(); ++i) wb[i] = F32ToBf16(wf[i]);
    const void* host = dt == DType::kF32 ? static_cast<const void*>(wf.data()) : wb.data();
    Weight wc{dt, host, heads * n, k};
    auto wg = gpu_->UploadWeight(dt, host, heads * n, k);
    ASSERT_TRUE(wg.ok());
    std::vector<float> want(rows * heads * y_head, 0.f);
    cpu_.GemmPerHead(x.data(), rows, heads, heads * x_head, x_head, wc, n, want.data(), heads * y_head, y_head);
    float* y = dev_->Zeros<float>(want.size());
    gpu_->GemmPerHead(dev_->Put(x), rows, heads, heads * x_head, x_head, *wg, n, y, heads * y_head, y_head);
    EXPECT_LE(MaxRelError(dev_->Get(y, want.size()), want), 1e-5) << DTypeName(dt);
  }
}

TEST_F(CudaModelOpsTest, Copy2DIsExact) {
  const auto src = RandomFloats(9 * 40, 1);
  std::vector<float> want(9 * 24, 0.f);
  cpu_.Copy2D(want.data(), 24, src.data() + 32, 40, 8, 9);
  float* dst = dev_->Zeros<float>(want.size());
  gpu_->Copy2D(dst, 24, dev_->Put(src) + 32, 40, 8, 9);
  EXPECT_EQ(dev_->Get(dst, want.size()), want);
}

TEST_F(CudaModelOpsTest, ClampedSwiGluIncludingTheClamps) {
  const int n = 5000;
  const auto gate = RandomFloats(n, 1, -12.f, 12.f), up = RandomFloats(n, 2, -12.f, 12.f);
  std::vector<float> want(n);
  cpu_.ClampedSwiGlu(gate.data(), up.data(), want.data(), n, 1.702f, 7.f);
  float* out = dev_->Zeros<float>(n);
  gpu_->ClampedSwiGlu(dev_->Put(gate), dev_->Put(up), out, n, 1.702f, 7.f);
  EXPECT_LE(MaxRelError(dev_->Get(out, n), want), 1e-6);
}

}  // namespace
}  // namespace ef::runtime
