// Every CUDA backend op against the CPU backend (the reference) on random inputs, in the spirit
// of ggml's test-backend-ops. fp32 paths: normwise relative error (max |d| / max |ref|) <= 1e-5
// or tighter; bf16 weights: NMSE stated per test. Skips when no CUDA device is visible.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/engine/sampler.h"
#include "tests/gpu/gpu_test_util.h"

namespace ef::runtime {
namespace {

using testing::DeviceArrays;
using testing::MaxRelError;
using testing::Nmse;
using testing::RandomFloats;
using testing::RoundedToBf16;

std::vector<uint16_t> ToBf16(const std::vector<float>& f) {
  std::vector<uint16_t> o(f.size());
  for (size_t i = 0; i < f.size(); ++i) o[i] = F32ToBf16(f[i]);
  return o;
}

class CudaOpsTest : public testing::CpuVsCudaTest<> {
 protected:
  // A weight on both backends from the same host bytes (kept alive by the fixture).
  std::pair<Weight, Weight> Weights(const std::vector<float>& f, int64_t rows, int64_t cols, DType dt) {
    const void* host = f.data();
    if (dt == DType::kBF16) {
      keep_.push_back(ToBf16(f));
      host = keep_.back().data();
    }
    Weight c{dt, host, rows, cols};
    auto g = gpu_->UploadWeight(dt, host, rows, cols);
    EXPECT_TRUE(g.ok()) << g.status().ToString();
    return {c, g.ok() ? *g : Weight{}};
  }

  std::vector<std::vector<uint16_t>> keep_;
};

TEST_F(CudaOpsTest, EmbedIsExactForF32AndBf16Tables) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    const int vocab = 300, cols = 96, n = 17;
    auto table = RandomFloats(vocab * cols, 1);
    auto [wc, wg] = Weights(table, vocab, cols, dt);
    std::vector<int32_t> ids(n);
    for (int i = 0; i < n; ++i) ids[i] = (i * 37 + 5) % vocab;
    std::vector<float> want(n * cols);
    cpu_.Embed(ids.data(), n, wc, want.data());
    float* out = dev_->Zeros<float>(n * cols);
    gpu_->Embed(dev_->Put(ids), n, wg, out);
    EXPECT_EQ(dev_->Get(out, n * cols), want) << DTypeName(dt);
  }
}

TEST_F(CudaOpsTest, RmsNormRowsAndHeads) {
  struct Case {
    int rows, dim;
    DType dt;
  };
  for (Case c :
       {Case{7, 4096, DType::kF32}, Case{32, 64, DType::kF32}, Case{5, 2048, DType::kBF16}, Case{3, 100, DType::kF32},
        Case{2, 10000, DType::kF32}, Case{4, 6, DType::kF32}, Case{64, 4096, DType::kF32}}) {
    auto x = RandomFloats(c.rows * c.dim, 2, -3, 3);
    auto w = RandomFloats(c.dim, 3, 0.5f, 1.5f);
    auto [wc, wg] = Weights(w, 1, c.dim, c.dt);
    std::vector<float> want(x.size());
    cpu_.RmsNorm(x.data(), c.rows, c.dim, wc, 1e-5f, want.data());
    float* xd = dev_->Put(x);
    gpu_->RmsNorm(xd, c.rows, c.dim, wg, 1e-5f, xd);  // in place, as the engine's QK-norm does
    EXPECT_LE(MaxRelError(dev_->Get(xd, x.size()), want), 1e-6) << c.rows << "x" << c.dim;
  }
}

TEST_F(CudaOpsTest, GemmF32WithBiasAndAccumulate) {
  struct Case {
    int m, n, k;
    bool bias, acc;
  };
  for (Case c : {Case{1, 384, 1024, false, false}, Case{7, 256, 4096, true, false}, Case{64, 520, 96, false, true},
                 Case{33, 8, 64, true, true}}) {
    auto x = RandomFloats(c.m * c.k, 4);
    auto w = RandomFloats(c.n * c.k, 5);
    auto b = RandomFloats(c.n, 6);
    auto y0 = RandomFloats(c.m * c.n, 7);
    auto [wc, wg] = Weights(w, c.n, c.k, DType::kF32);
    auto [bc, bg] = Weights(b, 1, c.n, DType::kF32);
    std::vector<float> want = y0;
    cpu_.Gemm(x.data(), c.m, wc, c.bias ? &bc : nullptr, want.data(), c.acc);
    float* yd = dev_->Put(y0);
    gpu_->Gemm(dev_->Put(x), c.m, wg, c.bias ? &bg : nullptr, yd, c.acc);
    EXPECT_LE(MaxRelError(dev_->Get(yd, want.size()), want), 1e-5) << c.m << "x" << c.n << "x" << c.k;
  }
}

TEST_F(CudaOpsTest, GemmBf16Weights) {
  // m <= kGemvMaxRows (decode): the GEMV kernel keeps fp32 activations, so it matches the CPU up to
  // summation order (<= 1e-5). Larger m: cuBLAS meets bf16 weights with bf16-rounded activations
  // (fp32 accumulation): against the CPU fed the same rounded activations <= 1e-5, against the
  // CPU's fp32 activations NMSE ~ 1e-6 (bound 1e-4).
  // 64, 40, 33, 63: one LtGemm bucket, its algorithm planned at m = 64 and reused for the others
  // (then 9..16 and 300, 257: other buckets; 17 after them).
  for (int m : {1, 2, 3, 8, 16, 64, 40, 33, 63, 9, 300, 257, 17}) {
    const int n = 1000, k = 2048;
    auto x = RandomFloats(m * k, 8);
    auto w = RandomFloats(n * k, 9, -0.05f, 0.05f);
    auto y0 = RandomFloats(m * n, 10);
    auto [wc, wg] = Weights(w, n, k, DType::kBF16);
    std::vector<float> xr(x.size());
    for (size_t i = 0; i < x.size(); ++i) xr[i] = Bf16ToF32(F32ToBf16(x[i]));
    std::vector<float> want_rounded = y0, want = y0;
    cpu_.Gemm(xr.data(), m, wc, nullptr, want_rounded.data(), true);
    cpu_.Gemm(x.data(), m, wc, nullptr, want.data(), true);
    float* yd = dev_->Put(y0);
    gpu_->Gemm(dev_->Put(x), m, wg, nullptr, yd, true);
    auto got = dev_->Get(yd, m * n);
    if (m <= cuda::kGemvMaxRows) {
      EXPECT_LE(MaxRelError(got, want), 1e-5) << "gemv m=" << m;
    } else {
      EXPECT_LE(MaxRelError(got, want_rounded), 1e-5) << "cublas m=" << m;
      EXPECT_LE(Nmse(got, want), 1e-4) << "cublas m=" << m;
    }
  }
  // k not a multiple of 8: the cuBLAS path even at m = 1.
  auto x = RandomFloats(100, 11);
  auto w = RandomFloats(64 * 100, 12);
  auto [wc, wg] = Weights(w, 64, 100, DType::kBF16);
  std::vector<float> xr(x.size());
  for (size_t i = 0; i < x.size(); ++i) xr[i] = Bf16ToF32(F32ToBf16(x[i]));
  std::vector<float> want(64);
  cpu_.Gemm(xr.data(), 1, wc, nullptr, want.data(), false);
  float* yd = dev_->Zeros<float>(64);
  gpu_->Gemm(dev_->Put(x), 1, wg, nullptr, yd, false);
  EXPECT_LE(MaxRelError(dev_->Get(yd, 64), want), 1e-5);
}

TEST_F(CudaOpsTest, GemvEverySplitMatchesCpuAndRowsAreIndependentOfM) {
  // Every K split (warps per weight row), BF16 and F16 weights, against the CPU; and bitwise: a
  // row's result must not depend on the other activation rows of the call, since the expert cache
  // groups tokens however residency falls. n is not a multiple of the rows per block and k / 8 not
  // a multiple of 32, so the partial block and the ragged slices are exercised.
  const int n = 1000, k = 4120, M = cuda::kGemvMaxRows;
  auto x = RandomFloats(M * k, 30);
  auto w = RandomFloats(n * k, 31, -0.05f, 0.05f);
  auto y0 = RandomFloats(M * n, 32);
  float* xd = dev_->Put(x);
  for (DType dt : {DType::kBF16, DType::kF16}) {
    std::vector<uint16_t> packed(w.size());
    for (size_t i = 0; i < w.size(); ++i) packed[i] = dt == DType::kBF16 ? F32ToBf16(w[i]) : F32ToF16(w[i]);
    const Weight wc{dt, packed.data(), n, k};
    auto wg = gpu_->UploadWeight(dt, packed.data(), n, k);
    ASSERT_TRUE(wg.ok()) << wg.status().ToString();
    std::vector<float> want = y0;
    cpu_.Gemm(x.data(), M, wc, nullptr, want.data(), true);
    for (int split = 1; split <= cuda::kGemvMaxWarpsPerRow; split *= 2) {
      float* yd = dev_->Put(y0);
      ASSERT_EQ(cuda::launch_gemv(xd, M, wg->data, dt, n, k, yd, true, split, gpu_->stream()), cudaSuccess);
      const auto all = dev_->Get(yd, static_cast<size_t>(M) * n);
      EXPECT_LE(MaxRelError(all, want), 1e-5) << DTypeName(dt) << " split " << split;
      for (int r = 0; r < M; ++r) {
        const std::vector<float> row0(y0.begin() + r * n, y0.begin() + (r + 1) * n);
        float* y1 = dev_->Put(row0);
        ASSERT_EQ(
            cuda::launch_gemv(xd + static_cast<int64_t>(r) * k, 1, wg->data, dt, n, k, y1, true, split, gpu_->stream()),
            cudaSuccess);
        const std::vector<float> want_row(all.begin() + r * n, all.begin() + (r + 1) * n);
        EXPECT_EQ(dev_->Get(y1, n), want_row) << DTypeName(dt) << " split " << split << " row " << r;
      }
    }
  }
  EXPECT_EQ(cuda::launch_gemv(xd, 1, xd, DType::kBF16, n, k, nullptr, false, /*warps_per_row=*/3, gpu_->stream()),
            cudaErrorInvalidValue);
  // The backend's choice: few rows (GQA k/v projections, routers) split, many rows do not; never by m.
  EXPECT_GT(cuda::gemv_warps_per_row(1024, 4096, 132), 1);
  EXPECT_GT(cuda::gemv_warps_per_row(8, 4096, 132), 1);
  EXPECT_EQ(cuda::gemv_warps_per_row(14336, 4096, 132), 1);
  EXPECT_EQ(cuda::gemv_warps_per_row(1024, 64, 132), 1);  // too short a row to share
}

TEST_F(CudaOpsTest, RopeRotateHalf) {
  const int rows = 33, heads = 8, hd = 128;
  auto x = RandomFloats(rows * heads * hd, 10);
  std::vector<int32_t> pos(rows);
  for (int i = 0; i < rows; ++i) pos[i] = (i * 131) % 4096;
  std::vector<float> want = x;
  cpu_.Rope(want.data(), pos.data(), rows, heads, hd, 1e6f);
  float* xd = dev_->Put(x);
  gpu_->Rope(xd, dev_->Put(pos), rows, heads, hd, 1e6f);
  EXPECT_LE(MaxRelError(dev_->Get(xd, x.size()), want), 1e-5);
}

TEST_F(CudaOpsTest, RopeQKIsRopeOnEach) {
  // q and k in one launch: the bits of Rope on each (32 query, 8 key heads; head_dim 128 and 64).
  for (int hd : {128, 64}) {
    const int rows = 5, qh = 32, kh = 8;
    auto q = RandomFloats(rows * qh * hd, 11), k = RandomFloats(rows * kh * hd, 12);
    std::vector<int32_t> pos = {0, 1, 511, 4095, 77};
    int32_t* pd = dev_->Put(pos);
    float *q1 = dev_->Put(q), *k1 = dev_->Put(k), *q2 = dev_->Put(q), *k2 = dev_->Put(k);
    gpu_->Rope(q1, pd, rows, qh, hd, 1e6f);
    gpu_->Rope(k1, pd, rows, kh, hd, 1e6f);
    gpu_->RopeQK(q2, k2, pd, rows, qh, kh, hd, 1e6f);
    EXPECT_EQ(dev_->Get(q2, q.size()), dev_->Get(q1, q.size())) << hd;
    EXPECT_EQ(dev_->Get(k2, k.size()), dev_->Get(k1, k.size())) << hd;
    std::vector<float> want = k;
    cpu_.Rope(want.data(), pos.data(), rows, kh, hd, 1e6f);
    EXPECT_LE(MaxRelError(dev_->Get(k2, k.size()), want), 1e-5) << hd;
  }
}

struct AttnCase {
  int n_new, n_total, heads, kv_heads, hd;
};

class CudaAttentionTest : public CudaOpsTest, public ::testing::WithParamInterface<AttnCase> {};

TEST_P(CudaAttentionTest, MatchesCpu) {
  const AttnCase c = GetParam();
  auto q = RandomFloats(c.n_new * c.heads * c.hd, 11, -2, 2);
  auto k = RandomFloats(c.n_total * c.kv_heads * c.hd, 12, -2, 2);
  auto v = RandomFloats(c.n_total * c.kv_heads * c.hd, 13);
  std::vector<float> want(q.size());
  cpu_.Attention(q.data(), c.n_new, k.data(), v.data(), c.n_total, c.heads, c.kv_heads, c.hd, want.data());
  float* od = dev_->Zeros<float>(q.size());
  gpu_->Attention(dev_->Put(q), c.n_new, dev_->Put(k), dev_->Put(v), c.n_total, c.heads, c.kv_heads, c.hd, od);
  EXPECT_LE(MaxRelError(dev_->Get(od, q.size()), want), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaAttentionTest,
                         ::testing::Values(AttnCase{11, 11, 4, 2, 16},     // fixture-sized prefill
                                           AttnCase{130, 130, 4, 2, 32},   // several query/key tiles
                                           AttnCase{37, 37, 8, 8, 64},     // MHA
                                           AttnCase{1, 1, 4, 4, 16},       // first token
                                           AttnCase{1, 600, 32, 8, 128},   // decode, split keys
                                           AttnCase{3, 300, 8, 1, 128},    // chunk on a cache, MQA
                                           AttnCase{5, 2000, 16, 4, 64},   // long cache
                                           AttnCase{4, 100, 4, 2, 256},    // head_dim 256
                                           AttnCase{64, 64, 32, 8, 128}),  // prefill, Mixtral heads
                         [](const auto& info) {
                           const AttnCase& c = info.param;
                           std::string name = "n";  // piecewise: GCC 12's -Wrestrict false positive
                           for (const auto& [tag, v] : {std::pair<const char*, int>{"", c.n_new},
                                                        {"_t", c.n_total},
                                                        {"_h", c.heads},
                                                        {"_kv", c.kv_heads},
                                                        {"_d", c.hd}}) {
                             name += tag;
                             name += std::to_string(v);
                           }
                           return name;
                         });

TEST_F(CudaOpsTest, ElementwiseOps) {
  const int64_t n = 100003;
  auto a = RandomFloats(n, 14, -8, 8), b = RandomFloats(n, 15, -2, 2);
  {
    std::vector<float> want(n);
    cpu_.SiluMul(a.data(), b.data(), want.data(), n);
    float* ad = dev_->Put(a);
    gpu_->SiluMul(ad, dev_->Put(b), ad, n);  // out aliases gate, as the engine calls it
    EXPECT_LE(MaxRelError(dev_->Get(ad, n), want), 1e-6) << "SiluMul";
  }
  {
    std::vector<float> want = a;
    cpu_.Add(want.data(), b.data(), n);
    float* ad = dev_->Put(a);
    gpu_->Add(ad, dev_->Put(b), n);
    EXPECT_EQ(dev_->Get(ad, n), want) << "Add";
  }
  {
    std::vector<float> want = a;
    cpu_.Clamp(want.data(), n, 3.5f);
    float* ad = dev_->Put(a);
    gpu_->Clamp(ad, n, 3.5f);
    EXPECT_EQ(dev_->Get(ad, n), want) << "Clamp";
  }
  {
    const int rows = 37, dim = 300;
    auto src = RandomFloats(rows * dim, 16), dst = RandomFloats(rows * dim, 17), g = RandomFloats(rows, 18, -4, 4);
    std::vector<float> want = dst;
    cpu_.AddSigmoidGated(src.data(), g.data(), rows, dim, want.data());
    float* dd = dev_->Put(dst);
    gpu_->AddSigmoidGated(dev_->Put(src), dev_->Put(g), rows, dim, dd);
    EXPECT_LE(MaxRelError(dev_->Get(dd, want.size()), want), 1e-6) << "AddSigmoidGated";
  }
}

TEST_F(CudaOpsTest, RouterTopKMatchesIncludingTies) {
  struct Case {
    int rows, experts, k;
    bool renorm;
  };
  // Up to 2048 experts a warp takes a row; 3000 takes the one-thread-per-row kernel.
  for (Case c : {Case{100, 8, 2, true}, Case{64, 60, 4, false}, Case{50, 128, 8, true}, Case{9, 64, 8, false},
                 Case{67, 256, 8, true}, Case{3, 5, 5, true}, Case{6, 2048, 16, true}, Case{5, 3000, 4, true}}) {
    auto logits = RandomFloats(c.rows * c.experts, 19, -4, 4);
    // Planted ties: every third row repeats some values, so the lower id must win.
    for (int r = 0; r < c.rows; r += 3)
      for (int e = 1; e < c.experts; e += 2) logits[r * c.experts + e] = logits[r * c.experts + e - 1];
    std::vector<int32_t> want_ids(c.rows * c.k);
    std::vector<float> want_w(c.rows * c.k);
    cpu_.RouterTopK(logits.data(), c.rows, c.experts, c.k, c.renorm, want_ids.data(), want_w.data());
    int32_t* ids = dev_->Zeros<int32_t>(c.rows * c.k);
    float* w = dev_->Zeros<float>(c.rows * c.k);
    gpu_->RouterTopK(dev_->Put(logits), c.rows, c.experts, c.k, c.renorm, ids, w);
    EXPECT_EQ(dev_->Get(ids, want_ids.size()), want_ids) << c.experts << " experts, k " << c.k;
    EXPECT_LE(MaxRelError(dev_->Get(w, want_w.size()), want_w), 1e-6);
  }
}

TEST_F(CudaOpsTest, GateUpSiluIsBitwiseTheGemmsAndSiluMul) {
  // Decode rows (m <= kGemvMaxRows): the fused kernel equals Gemm(gate), Gemm(up), SiluMul bit for
  // bit, for weights whose split is 1 (many rows) and more (few rows, long k); past the GEMV's
  // rows, and for fp32 weights, it declines.
  struct Case {
    int64_t n, k;
  };
  for (Case c : {Case{1000, 2048}, Case{96, 4096}}) {
    auto wg = RandomFloats(c.n * c.k, 20, -0.05f, 0.05f);
    auto wu = RandomFloats(c.n * c.k, 21, -0.05f, 0.05f);
    auto [gc, gg] = Weights(wg, c.n, c.k, DType::kBF16);
    auto [uc, ug] = Weights(wu, c.n, c.k, DType::kBF16);
    for (int m = 1; m <= cuda::kGemvMaxRows; ++m) {
      float* x = dev_->Put(RandomFloats(m * c.k, 22 + m));
      float* g = dev_->Zeros<float>(m * c.n);
      float* u = dev_->Zeros<float>(m * c.n);
      float* fused = dev_->Zeros<float>(m * c.n);
      gpu_->Gemm(x, m, gg, nullptr, g, false);
      gpu_->Gemm(x, m, ug, nullptr, u, false);
      gpu_->SiluMul(g, u, g, m * c.n);
      ASSERT_TRUE(gpu_->GateUpSilu(x, m, gg, ug, fused)) << "m=" << m;
      EXPECT_EQ(dev_->Get(fused, m * c.n), dev_->Get(g, m * c.n)) << "n=" << c.n << " k=" << c.k << " m=" << m;
    }
    float* x = dev_->Put(RandomFloats((cuda::kGemvMaxRows + 1) * c.k, 30));
    float* out = dev_->Zeros<float>((cuda::kGemvMaxRows + 1) * c.n);
    EXPECT_FALSE(gpu_->GateUpSilu(x, cuda::kGemvMaxRows + 1, gg, ug, out));
  }
  auto w = RandomFloats(64 * 128, 31);
  auto [fc, fg] = Weights(w, 64, 128, DType::kF32);
  float* x = dev_->Put(RandomFloats(128, 32));
  float* out = dev_->Zeros<float>(64);
  EXPECT_FALSE(gpu_->GateUpSilu(x, 1, fg, fg, out));
  EXPECT_TRUE(gpu_->status().ok()) << gpu_->status().ToString();
}

TEST_F(CudaOpsTest, MoeRoutedIsBitwiseTheHostRoutedLayer) {
  // A MoE layer of decode with the routing left on the device equals, bit for bit, the host-routed
  // sequence on the same backend (per expert in increasing id: gather its rows, GateUpSilu, Gemm
  // down, ScatterAddRows; then Add into the residual), and the CPU backend's within fp32 rounding.
  // The down projection (1032 rows of 4096) runs split over several warps, the gate/up not; the
  // combine covers the 1032 columns in three chunks of 512, the last one partly filled.
  const int E = 8, K = 2, H = 1032, I = 4096;
  std::vector<Weight> cpu_w, gpu_w;  // [e * 3 + {gate, up, down}]
  std::vector<const void*> table(3 * E);
  for (int e = 0; e < E; ++e) {
    for (int p = 0; p < 3; ++p) {
      const int64_t rows = p < 2 ? I : H, cols = p < 2 ? H : I;
      auto [c, g] = Weights(RandomFloats(rows * cols, 100 + 3 * e + p, -0.05f, 0.05f), rows, cols, DType::kBF16);
      cpu_w.push_back(c);
      gpu_w.push_back(g);
      table[p * E + e] = g.data;
    }
  }
  const void* const* t = dev_->Put(table);
  const RoutedExpertTable experts{t, t + E, t + 2 * E, DType::kBF16, E, H, I};
  struct Case {
    std::vector<int32_t> ids;  // [T * K], as RouterTopK writes them (highest weight first)
  };
  // One token (ids out of order); two tokens sharing expert 5.
  for (const Case& c : {Case{{6, 2}}, Case{{3, 5, 5, 1}}}) {
    const int T = static_cast<int>(c.ids.size()) / K;
    const auto x = RandomFloats(T * H, 200 + T);
    const auto resid = RandomFloats(T * H, 300 + T);
    const auto wts = RandomFloats(T * K, 400 + T, 0.1f, 0.9f);
    float* xd = dev_->Put(x);
    // The host-routed sequence, on the GPU and on the CPU.
    std::vector<float> want_cpu = resid, out_cpu(T * H, 0.f);
    float* out_gpu = dev_->Zeros<float>(T * H);
    float* resid_host = dev_->Put(resid);
    for (int e = 0; e < E; ++e) {
      std::vector<int32_t> rows;
      std::vector<float> scale;
      for (int p = 0; p < T * K; ++p)
        if (c.ids[p] == e) rows.push_back(p / K), scale.push_back(wts[p]);
      const int m = static_cast<int>(rows.size());
      if (m == 0) continue;
      std::vector<float> xe(m * H), act(m * I), y(m * H), up(m * I);
      cpu_.GatherRows(x.data(), rows.data(), m, H, xe.data());
      cpu_.Gemm(xe.data(), m, cpu_w[3 * e], nullptr, act.data(), false);
      cpu_.Gemm(xe.data(), m, cpu_w[3 * e + 1], nullptr, up.data(), false);
      cpu_.SiluMul(act.data(), up.data(), act.data(), m * I);
      cpu_.Gemm(act.data(), m, cpu_w[3 * e + 2], nullptr, y.data(), false);
      cpu_.ScatterAddRows(y.data(), rows.data(), scale.data(), m, H, out_cpu.data());
      int32_t* rows_d = dev_->Put(rows);
      float* xe_d = dev_->Zeros<float>(m * H);
      float* act_d = dev_->Zeros<float>(m * I);
      float* y_d = dev_->Zeros<float>(m * H);
      gpu_->GatherRows(xd, rows_d, m, H, xe_d);
      ASSERT_TRUE(gpu_->GateUpSilu(xe_d, m, gpu_w[3 * e], gpu_w[3 * e + 1], act_d));
      gpu_->Gemm(act_d, m, gpu_w[3 * e + 2], nullptr, y_d, false);
      gpu_->ScatterAddRows(y_d, rows_d, dev_->Put(scale), m, H, out_gpu);
    }
    cpu_.Add(want_cpu.data(), out_cpu.data(), T * H);
    gpu_->Add(resid_host, out_gpu, T * H);
    float* resid_routed = dev_->Put(resid);
    ASSERT_TRUE(gpu_->MoeRouted(xd, T, K, dev_->Put(c.ids), dev_->Put(wts), experts, resid_routed)) << "T=" << T;
    const auto got = dev_->Get(resid_routed, T * H);
    EXPECT_EQ(got, dev_->Get(resid_host, T * H)) << "T=" << T << ": not bitwise the host-routed layer";
    EXPECT_LT(MaxRelError(got, want_cpu), 1e-5) << "T=" << T << " vs the cpu backend";
  }
  {
    // A -1 from the router (a row of NaN logits) reads no weight and adds nothing; the other slot
    // of the token still counts (the engine then reports the id, see FinishDeviceRouting).
    const std::vector<int32_t> ids = {-1, 3};
    const auto x = RandomFloats(H, 700);
    const auto resid = RandomFloats(H, 701);
    const std::vector<float> wts = {0.4f, 0.6f};
    std::vector<float> want = resid, act(I), up(I), y(H);
    cpu_.Gemm(x.data(), 1, cpu_w[3 * 3], nullptr, act.data(), false);
    cpu_.Gemm(x.data(), 1, cpu_w[3 * 3 + 1], nullptr, up.data(), false);
    cpu_.SiluMul(act.data(), up.data(), act.data(), I);
    cpu_.Gemm(act.data(), 1, cpu_w[3 * 3 + 2], nullptr, y.data(), false);
    for (int c = 0; c < H; ++c) want[c] += wts[1] * y[c];
    float* r = dev_->Put(resid);
    ASSERT_TRUE(gpu_->MoeRouted(dev_->Put(x), 1, K, dev_->Put(ids), dev_->Put(wts), experts, r));
    EXPECT_LT(MaxRelError(dev_->Get(r, H), want), 1e-5) << "an out-of-range id";
    gpu_->Synchronize();
    EXPECT_TRUE(gpu_->status().ok()) << gpu_->status().ToString();
  }
  // Past the tokens it serves it declines, having enqueued nothing.
  const int T = gpu_->MoeRoutedMaxTokens() + 1;
  float* xt = dev_->Put(RandomFloats(T * H, 500));
  float* rt = dev_->Zeros<float>(T * H);
  std::vector<int32_t> idst(T * K);
  for (int p = 0; p < T * K; ++p) idst[p] = p % E;
  EXPECT_FALSE(gpu_->MoeRouted(xt, T, K, dev_->Put(idst), dev_->Put(RandomFloats(T * K, 501)), experts, rt));
  EXPECT_EQ(dev_->Get(rt, T * H), std::vector<float>(T * H, 0.f));
}

TEST_F(CudaOpsTest, MoeGroupedMatchesTheCpuLayer) {
  // Past the GEMV's rows MoeRouted groups the pairs by expert on the device and runs tensor-core
  // products on x and the SwiGLU activation rounded to the weights' 16 bits. Reference: the CPU
  // backend per pair on the same rounded operands (fp32 sums in another order: <= 1e-4 normwise),
  // and within bf16 rounding (NMSE <= 1e-4) of the CPU on the exact ones. Cases: tokens filling
  // one, two and four n8 tiles and more than one chunk of an expert (every token on expert 0),
  // 128 experts with few tokens each, an out-of-range id, f16 weights, long rows (many steps of
  // each warp's k loop), and the same call twice giving the same bits. H spans two column chunks
  // of the combine, the second partly filled.
  struct Case {
    int E, K, T;
    DType dt;
    bool crowd;  // every token's first slot on expert 0 (> 32 tokens: several chunks)
    std::string name;
    int H = 544, I = 512;
    // Against the CPU on the rounded operands: the GPU's fp32 sums in another order can round an
    // activation to the neighbouring 16-bit value, which long rows make likelier (one ulp of bf16
    // in a term: the 1568-long rows measured 1.34e-4).
    double rounded_tol = 1e-4;
  };
  for (const Case& c :
       {Case{8, 2, 3, DType::kBF16, false, "8x2 T3"}, Case{8, 2, 16, DType::kBF16, false, "8x2 T16"},
        Case{8, 2, 64, DType::kBF16, true, "8x2 T64 crowded"}, Case{128, 8, 40, DType::kBF16, false, "128x8 T40"},
        Case{16, 4, 9, DType::kF16, false, "16x4 T9 f16"},
        Case{8, 2, 48, DType::kBF16, false, "8x2 T48 2080x1568", 2080, 1568, 3e-4}}) {
    const int H = c.H, I = c.I;
    SCOPED_TRACE(c.name);
    std::vector<std::vector<float>> host;  // [e * 3 + {gate, up, down}], as the device holds them
    std::vector<const void*> table(3 * c.E);
    std::vector<Weight> cpu_w;
    std::vector<std::vector<uint16_t>> f16;
    for (int e = 0; e < c.E; ++e)
      for (int p = 0; p < 3; ++p) {
        const int64_t rows = p < 2 ? I : H, cols = p < 2 ? H : I;
        auto f = RandomFloats(rows * cols, 1000 + 3 * e + p, -0.08f, 0.08f);
        if (c.dt == DType::kBF16) {
          auto [wc, wg] = Weights(f, rows, cols, DType::kBF16);
          table[p * c.E + e] = wg.data;
          host.push_back(RoundedToBf16(f));
        } else {
          std::vector<uint16_t> h(f.size());
          for (size_t i = 0; i < f.size(); ++i) {
            h[i] = F32ToF16(f[i]);
            f[i] = F16ToF32(h[i]);
          }
          auto g = gpu_->UploadWeight(DType::kF16, h.data(), rows, cols);
          ASSERT_TRUE(g.ok()) << g.status().ToString();
          table[p * c.E + e] = g->data;
          host.push_back(f);
        }
        cpu_w.push_back(Weight{DType::kF32, host.back().data(), rows, cols});
      }
    const void* const* t = dev_->Put(table);
    const RoutedExpertTable experts{t, t + c.E, t + 2 * c.E, c.dt, c.E, H, I};
    // Distinct experts per token, as top-k gives them; one id out of range in the larger cases.
    std::vector<int32_t> ids(c.T * c.K);
    std::mt19937 rng(77 + c.T);
    for (int tok = 0; tok < c.T; ++tok) {
      std::vector<int32_t> perm(c.E);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      if (c.crowd) std::swap(perm[0], *std::find(perm.begin(), perm.end(), 0));
      for (int j = 0; j < c.K; ++j) ids[tok * c.K + j] = perm[j];
    }
    if (c.T >= 16) ids[5] = -1;
    const auto x = RandomFloats(c.T * H, 2000 + c.T);
    const auto wts = RandomFloats(c.T * c.K, 3000 + c.T, 0.1f, 0.9f);
    const std::vector<float> round_x = c.dt == DType::kBF16 ? RoundedToBf16(x) : [&] {
      std::vector<float> r(x.size());
      for (size_t i = 0; i < x.size(); ++i) r[i] = F16ToF32(F32ToF16(x[i]));
      return r;
    }();
    // Per pair on the CPU, in increasing expert id per token: exact and rounded operands.
    std::vector<float> want(c.T * H, 0.f), want_rounded(c.T * H, 0.f);
    for (int tok = 0; tok < c.T; ++tok) {
      std::vector<int> order(c.K);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int a, int b) { return ids[tok * c.K + a] < ids[tok * c.K + b]; });
      for (int j : order) {
        const int e = ids[tok * c.K + j];
        if (e < 0) continue;
        for (bool rounded : {false, true}) {
          std::vector<float> g(I), u(I), y(H);
          const float* xr = (rounded ? round_x : x).data() + tok * H;
          cpu_.Gemm(xr, 1, cpu_w[3 * e], nullptr, g.data(), false);
          cpu_.Gemm(xr, 1, cpu_w[3 * e + 1], nullptr, u.data(), false);
          cpu_.SiluMul(g.data(), u.data(), g.data(), I);
          if (rounded)
            for (float& v : g) v = c.dt == DType::kBF16 ? Bf16ToF32(F32ToBf16(v)) : F16ToF32(F32ToF16(v));
          cpu_.Gemm(g.data(), 1, cpu_w[3 * e + 2], nullptr, y.data(), false);
          float* dst = (rounded ? want_rounded : want).data() + tok * H;
          for (int d = 0; d < H; ++d) dst[d] += wts[tok * c.K + j] * y[d];
        }
      }
    }
    float* xd = dev_->Put(x);
    int32_t* idd = dev_->Put(ids);
    float* wd = dev_->Put(wts);
    float* r1 = dev_->Zeros<float>(c.T * H);
    float* r2 = dev_->Zeros<float>(c.T * H);
    ASSERT_TRUE(gpu_->MoeRouted(xd, c.T, c.K, idd, wd, experts, r1));
    ASSERT_TRUE(gpu_->MoeRouted(xd, c.T, c.K, idd, wd, experts, r2));
    const auto got = dev_->Get(r1, c.T * H);
    EXPECT_LE(MaxRelError(got, want_rounded), c.rounded_tol);
    EXPECT_LE(Nmse(got, want), 1e-4);
    EXPECT_EQ(got, dev_->Get(r2, c.T * H)) << "not deterministic";
    gpu_->Synchronize();
    ASSERT_TRUE(gpu_->status().ok()) << gpu_->status().ToString();
  }
}

TEST_F(CudaOpsTest, ExpertMlpsMatchTheCpuExperts) {
  // Several experts' SwiGLU MLPs in one call, each on its own rows (0, 1 and 2 rows: the GEMV
  // path; 5 to 130: 16-bit GEMMs, small enough here for the grouped calls by default where bf16,
  // and one cuBLASLt GEMM each on side streams for fp16 and with grouped_experts 0). Reference: the CPU backend on the
  // operands rounded where the GPU rounds them (x, gate and up products, the activation, and on
  // the grouped path the down products: <= 1e-5 NMSE, fp32 sums in another order) and on the exact
  // ones (<= 1e-4). An expert's bits do not depend on the call: all at once, one per call, and on
  // a backend whose scratch holds one expert at a time (the experts in groups, one after another)
  // give the same bits; the GEMV experts give GateUpSilu's on either path.
  const int H = 256, F = 512;
  for (DType dt : {DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(DTypeName(dt));
    const std::vector<int64_t> rows = {37, 0, 1, 130, 2, 5, 64};
    const int E = static_cast<int>(rows.size());
    auto round = [&](float v) { return dt == DType::kBF16 ? Bf16ToF32(F32ToBf16(v)) : F16ToF32(F32ToF16(v)); };
    std::vector<std::vector<float>> host;  // [e * 3 + {gate, up, down}], as the device holds them
    std::vector<Weight> gw;
    for (int e = 0; e < E; ++e)
      for (int p = 0; p < 3; ++p) {
        const int64_t r = p < 2 ? F : H, c = p < 2 ? H : F;
        auto f = RandomFloats(r * c, 4000 + 3 * e + p, -0.08f, 0.08f);
        for (float& v : f) v = round(v);
        std::vector<uint16_t> bits(f.size());
        for (size_t i = 0; i < f.size(); ++i) bits[i] = dt == DType::kBF16 ? F32ToBf16(f[i]) : F32ToF16(f[i]);
        keep_.push_back(bits);
        auto g = gpu_->UploadWeight(dt, keep_.back().data(), r, c);
        ASSERT_TRUE(g.ok()) << g.status().ToString();
        gw.push_back(*g);
        host.push_back(std::move(f));
      }
    std::vector<Backend::ExpertMlpRows> ex;
    int64_t n = 0;
    for (int e = 0; e < E; ++e) {
      ex.push_back({&gw[3 * e], &gw[3 * e + 1], &gw[3 * e + 2], n, rows[e]});
      n += rows[e];
    }
    const auto x = RandomFloats(n * H, 4100, -2.f, 2.f);
    // want_rounded: the side streams' rounding; want_grouped: that and the down products in 16 bits.
    std::vector<float> want(n * H), want_rounded(n * H), want_grouped(n * H);
    for (int e = 0; e < E; ++e) {
      const bool gemv = rows[e] <= cuda::kGemvMaxRows;
      for (int64_t r = ex[e].begin; r < ex[e].begin + rows[e]; ++r)
        for (bool rounded : {false, true}) {
          const bool rd = rounded && !gemv;  // the GEMV keeps x and the products in fp32
          std::vector<float> xr(x.begin() + r * H, x.begin() + (r + 1) * H), g(F, 0.f), u(F, 0.f);
          if (rd)
            for (float& v : xr) v = round(v);
          for (int i = 0; i < F; ++i)
            for (int k = 0; k < H; ++k) {
              g[i] += host[3 * e][i * H + k] * xr[k];
              u[i] += host[3 * e + 1][i * H + k] * xr[k];
            }
          for (int i = 0; i < F; ++i) {
            if (rd) g[i] = round(g[i]), u[i] = round(u[i]);
            g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
            if (rd) g[i] = round(g[i]);
          }
          float* dst = (rounded ? want_rounded : want).data() + r * H;
          for (int d = 0; d < H; ++d) {
            double acc = 0;
            for (int i = 0; i < F; ++i) acc += double(host[3 * e + 2][d * F + i]) * g[i];
            dst[d] = static_cast<float>(acc);
            if (rounded) want_grouped[r * H + d] = gemv ? dst[d] : round(dst[d]);
          }
        }
    }
    float* xd = dev_->Put(x);
    gpu_->Synchronize();  // x and the weights, before another backend's stream reads them
    std::vector<float> got;
    for (int mode : {-1, 0}) {  // the default (grouped here), one cuBLASLt GEMM each
      SCOPED_TRACE(mode == 0 ? "one GEMM per expert" : "grouped");
      CudaBackendOptions mo;
      mo.grouped_experts = mode;
      std::unique_ptr<CudaBackend> own = mode == -1 ? nullptr : testing::MakeTestCudaBackend(mo);
      CudaBackend* b = mode == -1 ? gpu_.get() : own.get();
      ASSERT_NE(b, nullptr);
      DeviceArrays d(b);
      float* all = d.Zeros<float>(n * H);
      float* one = d.Zeros<float>(n * H);
      ASSERT_TRUE(b->ExpertMlps(xd, nullptr, ex.data(), E, all));
      for (int e = 0; e < E; ++e) ASSERT_TRUE(b->ExpertMlps(xd, nullptr, &ex[e], 1, one));
      const auto y = d.Get(all, n * H);
      // bf16 only: the grouped path's down products are bf16 values (it ran, no fallback served).
      const bool grouped = mode != 0 && dt == DType::kBF16;
      EXPECT_LE(Nmse(y, grouped ? want_grouped : want_rounded), 1e-5);
      if (grouped) {
        for (int e = 0; e < E; ++e)
          for (int64_t i = ex[e].begin * H; rows[e] > cuda::kGemvMaxRows && i < (ex[e].begin + rows[e]) * H; ++i)
            ASSERT_EQ(y[i], Bf16ToF32(F32ToBf16(y[i]))) << "expert " << e << " value " << i;
      }
      EXPECT_LE(Nmse(y, want), 1e-4);
      EXPECT_EQ(y, d.Get(one, n * H)) << "an expert's result depends on the call";
      {
        // x's bf16 twin in place of the rounding pass: the same bits (fp16 experts round x
        // themselves whatever they are given).
        std::vector<uint16_t> twin(x.size());
        for (size_t i = 0; i < x.size(); ++i) twin[i] = F32ToBf16(x[i]);
        const uint16_t* x16 = d.Put(twin);
        float* from_twin = d.Zeros<float>(n * H);
        ASSERT_TRUE(b->ExpertMlps(xd, x16, ex.data(), E, from_twin));
        EXPECT_EQ(d.Get(from_twin, n * H), y) << "the twin changed the result";
        // A twin of other rows: bf16 experts read it (their results change), fp16 ones do not.
        const uint16_t* other = d.Put(ToBf16(RandomFloats(x.size(), 4101, -2.f, 2.f)));
        float* from_other = d.Zeros<float>(n * H);
        ASSERT_TRUE(b->ExpertMlps(xd, other, ex.data(), E, from_other));
        if (dt == DType::kBF16)
          EXPECT_NE(d.Get(from_other, n * H), y) << "the twin was not read";
        else
          EXPECT_EQ(d.Get(from_other, n * H), y) << "an fp16 expert read a bf16 twin";
      }
      // The GEMV experts: GateUpSilu and Gemm's bits.
      for (int e = 0; e < E; ++e) {
        if (rows[e] == 0 || rows[e] > cuda::kGemvMaxRows) continue;
        float* act = d.Zeros<float>(rows[e] * F);
        float* ye = d.Zeros<float>(rows[e] * H);
        ASSERT_TRUE(b->GateUpSilu(xd + ex[e].begin * H, rows[e], gw[3 * e], gw[3 * e + 1], act));
        b->Gemm(act, rows[e], gw[3 * e + 2], nullptr, ye, false);
        EXPECT_EQ(d.Get(ye, rows[e] * H),
                  std::vector<float>(y.begin() + ex[e].begin * H, y.begin() + (ex[e].begin + rows[e]) * H))
            << "expert " << e;
      }
      // A backend whose scratch holds one expert's products: the experts run in groups.
      b->Synchronize();
      ASSERT_TRUE(b->status().ok()) << b->status().ToString();
      CudaBackendOptions o = mo;
      o.expert_streams = 2;
      o.expert_mlp_scratch_bytes = 1;
      auto small = testing::MakeTestCudaBackend(o);
      ASSERT_NE(small, nullptr);
      {
        DeviceArrays d2(small.get());
        float* x2 = d2.Put(x);
        float* y2 = d2.Zeros<float>(n * H);
        ASSERT_TRUE(small->ExpertMlps(x2, nullptr, ex.data(), E, y2));
        EXPECT_EQ(d2.Get(y2, n * H), y) << "grouped by the scratch";
        small->Synchronize();
        ASSERT_TRUE(small->status().ok()) << small->status().ToString();
      }
      if (mode == -1) got = y;
    }
    float* all = dev_->Zeros<float>(n * H);
    ASSERT_TRUE(gpu_->ExpertMlps(xd, nullptr, ex.data(), E, all));
    // Declined (nothing enqueued): fp32 weights, mismatched shapes, no streams.
    auto [wc32, wg32] = Weights(RandomFloats(F * H, 4200), F, H, DType::kF32);
    Backend::ExpertMlpRows bad = ex[0];
    bad.gate = &wg32;
    EXPECT_FALSE(gpu_->ExpertMlps(xd, nullptr, &bad, 1, all));
    bad = ex[0];
    bad.down = &gw[0];  // [F, H] where [H, F] is wanted
    EXPECT_FALSE(gpu_->ExpertMlps(xd, nullptr, &bad, 1, all));
    EXPECT_EQ(dev_->Get(all, n * H), got);
  }
}

TEST_F(CudaOpsTest, CombineRowsIsTheScatterAddsInExpertOrder) {
  // The MoE combine in one launch against ScatterAddRows once per expert (ascending), both on the
  // GPU: the same bits; and the CPU backend's CombineRows within fp32 rounding (its sums may
  // contract differently). k = 1, 2, 8 of 16 experts; 300 tokens leave no expert empty, 3 do.
  const int E = 16, H = 4096 + 24;
  std::mt19937 rng(5);
  for (int k : {1, 2, 8})
    for (int T : {3, 300}) {
      SCOPED_TRACE("k=" + std::to_string(k) + " T=" + std::to_string(T));
      std::vector<int32_t> ids;
      std::vector<float> w;
      for (int t = 0; t < T; ++t) {
        std::vector<int32_t> all(E);
        std::iota(all.begin(), all.end(), 0);
        std::shuffle(all.begin(), all.end(), rng);
        for (int j = 0; j < k; ++j) ids.push_back(all[j]), w.push_back(0.1f + 0.05f * ((t + j) % 17));
      }
      std::vector<int32_t> offset(E + 1, 0);
      for (int32_t e : ids) ++offset[e + 1];
      for (int e = 0; e < E; ++e) offset[e + 1] += offset[e];
      std::vector<int32_t> cursor(offset.begin(), offset.end() - 1), perm(ids.size()), pos(ids.size()), filled(T, 0);
      std::vector<float> scale(ids.size());
      for (int t = 0; t < T; ++t)
        for (int j = 0; j < k; ++j) {
          const int32_t e = ids[t * k + j];
          perm[cursor[e]] = t;
          scale[cursor[e]++] = w[t * k + j];
        }
      for (size_t r = 0; r < perm.size(); ++r) pos[perm[r] * k + filled[perm[r]]++] = static_cast<int32_t>(r);
      const auto ye = RandomFloats(static_cast<int64_t>(ids.size()) * H, 800 + k * 10 + T);
      const auto base = RandomFloats(static_cast<int64_t>(T) * H, 900 + k * 10 + T);
      float* ye_d = dev_->Put(ye);
      float* scale_d = dev_->Put(scale);
      int32_t* perm_d = dev_->Put(perm);
      float* seq = dev_->Put(base);
      float* one = dev_->Put(base);
      for (int e = 0; e < E; ++e) {
        const int64_t begin = offset[e], cnt = offset[e + 1] - begin;
        if (cnt > 0) gpu_->ScatterAddRows(ye_d + begin * H, perm_d + begin, scale_d + begin, cnt, H, seq);
      }
      gpu_->CombineRows(ye_d, dev_->Put(pos), scale_d, T, k, H, one);
      const auto got = dev_->Get(one, static_cast<int64_t>(T) * H);
      EXPECT_EQ(got, dev_->Get(seq, static_cast<int64_t>(T) * H));
      std::vector<float> want = base;
      cpu_.CombineRows(ye.data(), pos.data(), scale.data(), T, k, H, want.data());
      EXPECT_LT(MaxRelError(got, want), 1e-5);
    }
}

TEST_F(CudaOpsTest, GemmGroupMatchesTheCpuGemms) {
  // q, k and v of a GQA layer in one launch at decode rows; past them, one Gemm each; biases added.
  const int64_t k = 2048, n[3] = {2048, 512, 512};
  std::vector<Weight> cw, gw, cb, gb;
  std::vector<std::vector<float>> bias_host;  // the CPU's f32 biases point into these
  for (int i = 0; i < 3; ++i) {
    auto [c, g] = Weights(RandomFloats(n[i] * k, 600 + i, -0.05f, 0.05f), n[i], k, DType::kBF16);
    cw.push_back(c);
    gw.push_back(g);
    bias_host.push_back(RandomFloats(n[i], 610 + i));
  }
  for (int i = 0; i < 3; ++i) {
    auto [bc, bg] = Weights(bias_host[i], 1, n[i], DType::kF32);
    cb.push_back(bc);
    gb.push_back(bg);
  }
  for (int m : {1, 2, 5}) {
    const auto x = RandomFloats(m * k, 620 + m);
    float* xd = dev_->Put(x);
    std::vector<std::vector<float>> want(3);
    float* ys[3];
    for (int i = 0; i < 3; ++i) {
      want[i].resize(m * n[i]);
      cpu_.Gemm(x.data(), m, cw[i], i == 1 ? nullptr : &cb[i], want[i].data(), false);
      ys[i] = dev_->Zeros<float>(m * n[i]);
    }
    const Weight* ws[] = {&gw[0], &gw[1], &gw[2]};
    const Weight* bs[] = {&gb[0], nullptr, &gb[2]};
    gpu_->GemmGroup(xd, nullptr, m, 3, ws, bs, ys);
    // Past the GEMV's rows the GEMMs meet the activations in bf16 (the bounds of GemmBf16 above).
    for (int i = 0; i < 3; ++i) {
      const auto got = dev_->Get(ys[i], m * n[i]);
      const std::string at = "m=" + std::to_string(m) + " weight " + std::to_string(i) + ": got " +
                             std::to_string(got[0]) + ", " + std::to_string(got[1]) + " want " +
                             std::to_string(want[i][0]) + ", " + std::to_string(want[i][1]);
      if (m <= cuda::kGemvMaxRows)
        EXPECT_LE(MaxRelError(got, want[i]), 1e-5) << at;
      else
        EXPECT_LE(Nmse(got, want[i]), 1e-4) << at;
    }
  }
}

TEST_F(CudaOpsTest, AddRmsNormIsAddThenRmsNorm) {
  // The residual add fused into the next norm: x and out (and the twin) bitwise what Add then
  // RmsNorm / RmsNormTwin write, on the register kernel (4096, 1024 and 100 wide) and the generic
  // one (102 wide; 4096 with x, or only the added rows, off 16-byte alignment).
  struct Case {
    int rows, dim, x_offset, add_offset;
    bool twin;
  };
  for (Case c : {Case{64, 4096, 0, 0, true}, Case{5, 1024, 0, 0, false}, Case{3, 100, 0, 0, true},
                 Case{3, 102, 0, 0, true}, Case{7, 4096, 1, 0, true}, Case{7, 4096, 0, 1, false}}) {
    SCOPED_TRACE(std::to_string(c.rows) + "x" + std::to_string(c.dim) + " offsets " + std::to_string(c.x_offset) + "/" +
                 std::to_string(c.add_offset));
    const size_t n = static_cast<size_t>(c.rows) * c.dim;
    auto x = RandomFloats(n + c.x_offset, 31, -3, 3);
    const auto add = RandomFloats(n + c.add_offset, 32, -3, 3);
    auto [wc, wg] = Weights(RandomFloats(c.dim, 33, 0.5f, 1.5f), 1, c.dim, DType::kBF16);
    float* x1 = dev_->Put(x) + c.x_offset;
    float* x2 = dev_->Put(x) + c.x_offset;
    const float* ad = dev_->Put(add) + c.add_offset;
    float *out1 = dev_->Zeros<float>(n), *out2 = dev_->Zeros<float>(n);
    uint16_t* t1 = c.twin ? dev_->Zeros<uint16_t>(n) : nullptr;
    uint16_t* t2 = c.twin ? dev_->Zeros<uint16_t>(n) : nullptr;
    gpu_->Add(x1, ad, static_cast<int64_t>(n));
    if (c.twin)
      gpu_->RmsNormTwin(x1, c.rows, c.dim, wg, 1e-5f, out1, t1);
    else
      gpu_->RmsNorm(x1, c.rows, c.dim, wg, 1e-5f, out1);
    gpu_->AddRmsNorm(x2, ad, c.rows, c.dim, wg, 1e-5f, out2, t2);
    const auto sums = dev_->Get(x1, n);
    EXPECT_EQ(dev_->Get(x2, n), sums);
    EXPECT_EQ(dev_->Get(out2, n), dev_->Get(out1, n));
    if (c.twin) {
      EXPECT_EQ(dev_->Get(t2, n), dev_->Get(t1, n));
    }
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(sums[i], x[c.x_offset + i] + add[c.add_offset + i]) << i;
  }
}

TEST_F(CudaOpsTest, Bf16TwinsAreTheRoundedRowsAndChangeNoBits) {
  // RmsNormTwin and GatherRowsTwin write RmsNorm's and GatherRows' bits and beside them the CPU's
  // bf16 rounding of each value (the register kernel, the generic one, a bf16 norm weight; float4
  // and scalar gathers; twins on and off 8-byte alignment); GEMMs given the twin give bitwise what
  // they give rounding x themselves: GemmGroup past the GEMV's rows (q, k, v and a router-like
  // weight of 8 rows alone) and the per-weight Gemm; they do read it, unless it is off 256 bytes.
  // Twins are asked for past the GEMV's rows over bf16 weights only.
  EXPECT_FALSE(gpu_->Bf16Twins(cuda::kGemvMaxRows, DType::kBF16));
  EXPECT_TRUE(gpu_->Bf16Twins(cuda::kGemvMaxRows + 1, DType::kBF16));
  EXPECT_FALSE(gpu_->Bf16Twins(2048, DType::kF16));
  struct NormCase {
    int rows, dim;
    DType dt;
  };
  for (NormCase c : {NormCase{64, 4096, DType::kF32}, NormCase{5, 2048, DType::kBF16}, NormCase{3, 100, DType::kF32},
                     NormCase{2, 10000, DType::kF32}}) {
    SCOPED_TRACE(std::to_string(c.rows) + "x" + std::to_string(c.dim));
    const auto x = RandomFloats(c.rows * c.dim, 21, -3, 3);
    auto [wc, wg] = Weights(RandomFloats(c.dim, 22, 0.5f, 1.5f), 1, c.dim, c.dt);
    float* xd = dev_->Put(x);
    float* plain = dev_->Zeros<float>(x.size());
    float* out = dev_->Zeros<float>(x.size());
    uint16_t* out16 = dev_->Zeros<uint16_t>(x.size());
    // A twin off its 8-byte alignment too (element stores instead of 8-byte ones; out unchanged).
    float* out_odd = dev_->Zeros<float>(x.size());
    uint16_t* odd16 = dev_->Zeros<uint16_t>(x.size() + 1) + 1;
    gpu_->RmsNorm(xd, c.rows, c.dim, wg, 1e-5f, plain);
    gpu_->RmsNormTwin(xd, c.rows, c.dim, wg, 1e-5f, out, out16);
    gpu_->RmsNormTwin(xd, c.rows, c.dim, wg, 1e-5f, out_odd, odd16);
    const auto want = dev_->Get(plain, x.size());
    EXPECT_EQ(dev_->Get(out, x.size()), want);
    EXPECT_EQ(dev_->Get(out16, x.size()), ToBf16(want));
    EXPECT_EQ(dev_->Get(out_odd, x.size()), want);
    EXPECT_EQ(dev_->Get(odd16, x.size()), ToBf16(want));
  }
  for (int dim : {4096 + 24, 6}) {
    SCOPED_TRACE("gather dim " + std::to_string(dim));
    const int n_src = 50;
    const auto src = RandomFloats(n_src * dim, 23, -4, 4);
    std::vector<int32_t> idx;
    for (int i = 0; i < 300; ++i) idx.push_back((i * 37 + i / 7) % n_src);
    float* sd = dev_->Put(src);
    int32_t* id = dev_->Put(idx);
    const size_t n = idx.size() * dim;
    float* plain = dev_->Zeros<float>(n);
    float* out = dev_->Zeros<float>(n);
    uint16_t* out16 = dev_->Zeros<uint16_t>(n);
    uint16_t* odd16 = dev_->Zeros<uint16_t>(n + 1) + 1;
    gpu_->GatherRows(sd, id, static_cast<int64_t>(idx.size()), dim, plain);
    gpu_->GatherRowsTwin(sd, id, static_cast<int64_t>(idx.size()), dim, out, out16);
    const auto want = dev_->Get(plain, n);
    EXPECT_EQ(dev_->Get(out, n), want);
    EXPECT_EQ(dev_->Get(out16, n), ToBf16(want));
    gpu_->GatherRowsTwin(sd, id, static_cast<int64_t>(idx.size()), dim, out, odd16);
    EXPECT_EQ(dev_->Get(odd16, n), ToBf16(want));
  }
  const int64_t k = 2048, n[4] = {2048, 512, 512, 8};
  std::vector<Weight> gw;
  for (int i = 0; i < 4; ++i)
    gw.push_back(Weights(RandomFloats(n[i] * k, 630 + i, -0.05f, 0.05f), n[i], k, DType::kBF16).second);
  auto [bc, bias] = Weights(RandomFloats(n[0], 640), 1, n[0], DType::kF32);
  for (int m : {cuda::kGemvMaxRows + 1, 64, 300}) {
    SCOPED_TRACE("m=" + std::to_string(m));
    const auto x = RandomFloats(m * k, 650 + m);
    float* xd = dev_->Put(x);
    const uint16_t* x16 = dev_->Put(ToBf16(x));
    float *own[4], *twin[4], *each[4];
    for (int i = 0; i < 4; ++i) {
      own[i] = dev_->Zeros<float>(m * n[i]);
      twin[i] = dev_->Zeros<float>(m * n[i]);
      each[i] = dev_->Zeros<float>(m * n[i]);
      gpu_->Gemm(xd, m, gw[i], i == 0 ? &bias : nullptr, each[i], false);
    }
    const Weight* ws[] = {&gw[0], &gw[1], &gw[2]};
    const Weight* bs[] = {&bias, nullptr, nullptr};
    gpu_->GemmGroup(xd, nullptr, m, 3, ws, bs, own);
    gpu_->GemmGroup(xd, x16, m, 3, ws, bs, twin);
    const Weight* router[] = {&gw[3]};
    const Weight* no_bias[] = {nullptr};
    gpu_->GemmGroup(xd, nullptr, m, 1, router, no_bias, own + 3);
    gpu_->GemmGroup(xd, x16, m, 1, router, no_bias, twin + 3);
    for (int i = 0; i < 4; ++i) {
      const auto want = dev_->Get(each[i], m * n[i]);
      EXPECT_EQ(dev_->Get(own[i], m * n[i]), want) << "weight " << i << ": GemmGroup is not Gemm";
      EXPECT_EQ(dev_->Get(twin[i], m * n[i]), want) << "weight " << i << ": the twin changed the result";
    }
    // A twin of other rows is read (the results change); one that does not start on 256 bytes
    // (cuBLASLt could plan another algorithm for it) is not: x is rounded as without a twin.
    std::vector<uint16_t> other = ToBf16(RandomFloats(m * k, 660 + m));
    const uint16_t* other16 = dev_->Put(other);
    other.insert(other.begin(), 8, uint16_t{0});
    const uint16_t* shifted16 = dev_->Put(other) + 8;
    float* read = dev_->Zeros<float>(m * n[0]);
    float* ignored = dev_->Zeros<float>(m * n[0]);
    gpu_->GemmGroup(xd, other16, m, 1, ws, bs, &read);
    gpu_->GemmGroup(xd, shifted16, m, 1, ws, bs, &ignored);
    const auto want0 = dev_->Get(each[0], m * n[0]);
    EXPECT_NE(dev_->Get(read, m * n[0]), want0) << "the twin was not read";
    EXPECT_EQ(dev_->Get(ignored, m * n[0]), want0) << "a twin off 256 bytes was read";
  }
  gpu_->Synchronize();
  ASSERT_TRUE(gpu_->status().ok()) << gpu_->status().ToString();
}

TEST_F(CudaOpsTest, CopyBatchCopiesEveryItem) {
  // 400 items: 4 KB aligned ones (16-byte path), odd sizes and offsets (byte path), empty ones,
  // and two over 64 KB (copy engine); the 340 small ones take three launches of at most 128.
  const size_t total = 4 << 20;
  std::vector<float> src = RandomFloats(total / sizeof(float), 90);
  auto* s = reinterpret_cast<std::byte*>(dev_->Put(src));
  auto* d = reinterpret_cast<std::byte*>(dev_->Zeros<float>(total / sizeof(float)));
  std::vector<Backend::CopyItem> items;
  std::vector<std::byte> want(total, std::byte{0});
  const auto* hs = reinterpret_cast<const std::byte*>(src.data());
  size_t off = 0;
  for (int i = 0; i < 400; ++i) {
    const size_t bytes = (i == 17 || i == 251) ? (96 << 10) : i % 7 == 0 ? 0 : i % 5 == 0 ? 4099 + i : 4096;
    const size_t src_off = (i % 3 == 0 ? off + 3 : off) % (total - bytes - 8);
    items.push_back({d + off, s + src_off, bytes});
    std::memcpy(want.data() + off, hs + src_off, bytes);
    off += bytes + (i % 5 == 0 ? 1 : 0);
  }
  ASSERT_LT(off, total);
  gpu_->CopyBatch(items.data(), static_cast<int>(items.size()));
  std::vector<std::byte> got(total);
  gpu_->CopyToHost(got.data(), d, total);
  EXPECT_TRUE(got == want);
  EXPECT_TRUE(gpu_->status().ok()) << gpu_->status().ToString();
}

TEST_F(CudaOpsTest, GatherAndWeightedScatterAdd) {
  const int rows = 50, dim = 4096, n = 20;
  auto src = RandomFloats(rows * dim, 20);
  std::vector<int32_t> idx(n);
  std::vector<int32_t> all(rows);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), std::mt19937(3));
  std::copy(all.begin(), all.begin() + n, idx.begin());  // distinct, as within one expert
  {
    std::vector<float> want(n * dim);
    cpu_.GatherRows(src.data(), idx.data(), n, dim, want.data());
    float* dd = dev_->Zeros<float>(n * dim);
    gpu_->GatherRows(dev_->Put(src), dev_->Put(idx), n, dim, dd);
    EXPECT_EQ(dev_->Get(dd, want.size()), want) << "GatherRows";
  }
  {
    auto part = RandomFloats(n * dim, 21);
    auto scale = RandomFloats(n, 22, 0, 1);
    std::vector<float> want = src;
    cpu_.ScatterAddRows(part.data(), idx.data(), scale.data(), n, dim, want.data());
    float* dd = dev_->Put(src);
    gpu_->ScatterAddRows(dev_->Put(part), dev_->Put(idx), dev_->Put(scale), n, dim, dd);
    EXPECT_LE(MaxRelError(dev_->Get(dd, want.size()), want), 1e-6) << "ScatterAddRows";
  }
}

// The backend's greedy argmax is runtime::ArgMax's: first index of the maximum, NaN never wins, a
// row without a number gives 0; rows of a 152k vocabulary and of odd widths.
TEST_F(CudaOpsTest, ArgMaxRowsIsTheHostArgMax) {
  for (int64_t cols : {int64_t{151936}, int64_t{4096}, int64_t{1001}, int64_t{3}}) {
    const int64_t rows = 9;
    std::vector<float> x = RandomFloats(static_cast<size_t>(rows * cols), 900 + cols, -30.f, 30.f);
    auto at = [&](int64_t r, int64_t c) -> float& { return x[static_cast<size_t>(r * cols + c)]; };
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    at(1, cols - 1) = 100.f;                   // the maximum last
    at(2, cols / 2) = at(2, cols - 1) = 99.f;  // a tie: the first
    at(3, 0) = nan;                            // NaN never wins
    at(3, cols / 3) = 98.f;
    for (int64_t c = 0; c < cols; ++c) at(4, c) = nan;   // no number: 0
    for (int64_t c = 0; c < cols; ++c) at(5, c) = -inf;  // all -inf: the first
    at(6, cols - 1) = inf;
    at(7, 0) = 97.f;  // the maximum first
    std::vector<int32_t> want(rows), cpu(rows);
    for (int64_t r = 0; r < rows; ++r)
      want[r] = ArgMax(std::span<const float>(x.data() + r * cols, static_cast<size_t>(cols)));
    cpu_.ArgMaxRows(x.data(), rows, cols, cpu.data());
    EXPECT_EQ(cpu, want) << "cpu backend, cols " << cols;
    int32_t* out = dev_->Zeros<int32_t>(rows);
    gpu_->ArgMaxRows(dev_->Put(x), rows, cols, out);
    EXPECT_EQ(dev_->Get(out, rows), want) << "cols " << cols;
  }
  EXPECT_TRUE(gpu_->status().ok()) << gpu_->status().ToString();
}

// Backend::SampleRows on the GPU draws the tokens runtime::SampleRow draws on the host, bit for
// bit: flat and peaked rows, ties, NaN and -inf, every kind of cut, many random draws.
TEST_F(CudaOpsTest, SampleRowsIsTheHostSampleRow) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  struct Cut {
    float temperature, top_p;
    int top_k;
  };
  const std::vector<Cut> cuts = {{1.f, 1.f, 0},   {0.7f, 0.9f, 0},  {1.f, 1.f, 1},       {0.8f, 0.95f, 40},
                                 {1.3f, 0.5f, 0}, {1.f, 1.f, 2000}, {0.5f, 0.99f, 3000}, {1e-3f, 1.f, 0},
                                 {0.f, 1.f, 0},   {2.f, 0.2f, 7}};
  for (int64_t cols : {int64_t{151936}, int64_t{32000}, int64_t{1001}, int64_t{3}}) {
    const int64_t kinds = 6, rows = kinds * static_cast<int64_t>(cuts.size());
    std::vector<float> x(static_cast<size_t>(rows * cols));
    for (int64_t k = 0; k < kinds; ++k) {
      // 0: flat (normal-ish, scale 2.5), 1: peaked (a few large), 2: many ties, 3: NaN and -inf
      // mixed in, 4: quantized to 1/8 (ties across the cut), 5: all equal.
      const std::vector<float> v = RandomFloats(static_cast<size_t>(cols), 1700 + 31 * k + cols, -4.f, 4.f);
      for (int64_t c = 0; c < cols; ++c) {
        float f = v[static_cast<size_t>(c)];
        if (k == 1) f = c % 97 == 5 ? 12.f + f : f - 8.f;
        if (k == 2) f = static_cast<float>(c % 5);
        if (k == 3 && c % 7 == 1) f = nan;
        if (k == 3 && c % 11 == 2) f = -inf;
        if (k == 4) f = std::round(f * 8.f) / 8.f;
        if (k == 5) f = 0.5f;
        for (size_t i = 0; i < cuts.size(); ++i) x[static_cast<size_t>((k * cuts.size() + i) * cols + c)] = f;
      }
    }
    std::vector<RowSampling> params(static_cast<size_t>(rows));
    std::mt19937_64 rng(cols);
    const float* x_dev = dev_->Put(x);
    std::vector<int32_t> want(static_cast<size_t>(rows)), cpu(static_cast<size_t>(rows));
    int64_t checked = 0;
    for (int draw = 0; draw < 12; ++draw) {
      for (int64_t r = 0; r < rows; ++r) {
        const Cut& cut = cuts[static_cast<size_t>(r) % cuts.size()];
        RowSampling& p = params[static_cast<size_t>(r)];
        p.inv_temperature = cut.temperature > 0.f ? 1.f / cut.temperature : 0.f;
        p.top_p = cut.top_p;
        p.top_k = cut.top_k;
        p.uniform = draw == 0 ? 0.0 : draw == 1 ? 0.9999999999 : std::generate_canonical<double, 53>(rng);
        want[static_cast<size_t>(r)] = SampleRow(x.data() + r * cols, cols, p);
      }
      cpu_.SampleRows(x.data(), rows, cols, params.data(), cpu.data());
      EXPECT_EQ(cpu, want) << "cpu backend, cols " << cols;
      const RowSampling* params_dev = dev_->Put(params);
      int32_t* out = dev_->Zeros<int32_t>(rows);
      gpu_->SampleRows(x_dev, rows, cols, params_dev, out);
      const std::vector<int32_t> got = dev_->Get(out, rows);
      for (int64_t r = 0; r < rows; ++r) {
        const Cut& cut = cuts[static_cast<size_t>(r) % cuts.size()];
        EXPECT_EQ(got[static_cast<size_t>(r)], want[static_cast<size_t>(r)])
            << "cols " << cols << " row kind " << r / static_cast<int64_t>(cuts.size()) << " T " << cut.temperature
            << " top_p " << cut.top_p << " top_k " << cut.top_k << " uniform "
            << params[static_cast<size_t>(r)].uniform;
        ++checked;
      }
    }
    EXPECT_EQ(checked, 12 * rows);
  }
  EXPECT_TRUE(gpu_->status().ok()) << gpu_->status().ToString();
}

}  // namespace
}  // namespace ef::runtime
