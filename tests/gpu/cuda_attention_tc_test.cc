// Tensor-core prefill attention (CudaBackend::AttentionBatch with reduced-precision attention on)
// against the CPU backend's fp32 AttentionBatch on the same inputs: single-sequence prefills of
// 1..2048 tokens, ragged batches whose chunks continue cached contexts (n_new < n_total), more
// sequences than travel inline, GQA groups 1/4/8, head_dim 64/128, and large scores (q x 4, the
// online softmax rescales often). Every case also checks that rows outside the query chunks keep
// a sentinel, that with the switch off the backend gives exactly what the fp32 kernel gives, and
// that chunks the tensor-core kernel does not take (shorter than kAttentionPrefillTcMinRows, also
// when batched with longer ones) stay on the fp32 kernel with the switch on.
//
// Decode on tensor cores (DecodeMatchesCpu): decode batches over a bf16 cache with the switch on,
// against the CPU backend's bf16-cache attention, within the same bound; GQA groups 1/4/6/8/16,
// head_dim 64/128, contexts of 1 to 20000 keys (split over many blocks or not), paged caches
// (bitwise the contiguous layout, also through the step path the engine records in CUDA graphs:
// UploadStepSeqs, AttentionStep on the pools, eager and recorded then replayed), more sequences
// than travel inline; decode rows batched with a short chunk are bitwise the decode-only batch's.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <ostream>
#include <string>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/core/dtype.h"
#include "tests/gpu/gpu_test_util.h"

namespace ef::runtime {
namespace {

using testing::RandomFloats;

constexpr float kSentinel = -1234.5f;
constexpr int kGapRows = 3;  // rows before every chunk (and after the last) that no sequence owns

struct TcCase {
  std::string name;
  std::vector<int> n_new, n_total;  // per sequence
  int heads, kv_heads, hd;
  float q_scale = 1.f;  // q uniform in [-q_scale, q_scale)
};
void PrintTo(const TcCase& c, std::ostream* os) { *os << c.name; }

// ||got - want||_2 / ||want||_2 over the given rows of [rows, width] arrays.
double NormwiseRelError(const std::vector<float>& got, const std::vector<float>& want, const std::vector<bool>& owned,
                        int64_t width) {
  double num = 0, den = 0;
  for (size_t r = 0; r < owned.size(); ++r) {
    if (!owned[r]) continue;
    for (int64_t j = 0; j < width; ++j) {
      const double w = want[r * width + j], d = got[r * width + j] - w;
      num += d * d;
      den += w * w;
    }
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

double MaxAbsError(const std::vector<float>& got, const std::vector<float>& want) {
  double e = 0;
  for (size_t i = 0; i < want.size(); ++i) e = std::max(e, std::abs(double(got[i]) - want[i]));
  return e;
}

// Largest 2-norm of the head_dim-long slices of x (every row and head).
double MaxSliceNorm(const std::vector<float>& x, int hd) {
  double m = 0;
  for (size_t i = 0; i < x.size(); i += hd) {
    double s = 0;
    for (int d = 0; d < hd; ++d) s += double(x[i + d]) * x[i + d];
    m = std::max(m, std::sqrt(s));
  }
  return m;
}

// A worst-case bound on |got - want| from the bf16 roundings (unit roundoff u = 2^-9) of Q, K, P
// and V, with the accumulations exact. Q and K: |s' - s| <= (2u + u^2) sum_d |q_d k_d| scale <=
// Delta = 2.01 u scale max||q|| max||k|| (Cauchy-Schwarz), so each softmax weight moves by a factor
// within e^{+-2 Delta}; rounding P and normalising by the sum of the rounded P moves it by a factor
// within (1 + u) / (1 - u) more: rho = e^{2 Delta} (1 + u) / (1 - u) and |w'' - w| <= (rho - 1) w.
// V: |v' - v| <= u |v|. Hence |o' - o| <= max|v| (rho - 1 + u), plus a little for fp32 sums.
double BoundFromBf16(double max_q_norm, double max_k_norm, double max_v, int hd) {
  const double u = std::ldexp(1.0, -9);
  const double delta = 2.01 * u * max_q_norm * max_k_norm / std::sqrt(static_cast<double>(hd));
  const double rho = std::exp(2 * delta) * (1 + u) / (1 - u);
  return max_v * (rho - 1 + u) + 1e-5;
}

// out[rows, width] = kSentinel, then the backend's AttentionBatch with reduced-precision attention
// on or off (off again after the call).
std::vector<float> RunAttentionBatch(CudaBackend* gpu, testing::DeviceArrays* dev, const float* q,
                                     const std::vector<AttentionSeq>& seqs, int heads, int kv_heads, int hd,
                                     int64_t rows, bool reduced) {
  const int64_t width = static_cast<int64_t>(heads) * hd;
  float* out = dev->Put(std::vector<float>(rows * width, kSentinel));
  gpu->SetReducedPrecisionAttention(reduced);
  gpu->AttentionBatch(q, seqs.data(), static_cast<int>(seqs.size()), heads, kv_heads, hd, out);
  gpu->SetReducedPrecisionAttention(false);
  return dev->Get(out, rows * width);
}

class CudaAttentionTcTest : public testing::CpuVsCudaTest<::testing::TestWithParam<TcCase>> {
 protected:
  // out[rows, width] = kSentinel, then the fp32 kernel called directly (plan + launch), bypassing
  // the backend's switch.
  std::vector<float> Fp32Kernel(const float* q, const std::vector<AttentionSeq>& seqs, const TcCase& c, int64_t rows,
                                int64_t width) {
    std::vector<cuda::AttentionSeqDesc> desc;
    for (const AttentionSeq& a : seqs)
      desc.push_back(cuda::AttentionSeqDesc{a.k, a.v, a.q_row, a.n_new, a.n_total, nullptr, 0});
    int num_sms = 0;
    EXPECT_EQ(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, gpu_->device()), cudaSuccess);
    const int S = static_cast<int>(desc.size());
    const cuda::AttentionBatchPlan plan =
        cuda::plan_attention_batch(desc.data(), S, c.heads, c.kv_heads, c.hd, num_sms);
    float* ws = dev_->Zeros<float>(plan.workspace_floats);
    unsigned* counters = dev_->Zeros<unsigned>(static_cast<size_t>(plan.num_counters));  // zeroed
    const cuda::AttentionSeqDesc* desc_dev = S > cuda::kAttentionInlineSeqs ? dev_->Put(desc) : nullptr;
    float* out = dev_->Put(std::vector<float>(rows * width, kSentinel));
    EXPECT_EQ(cuda::launch_attention_batch(q, desc.data(), desc_dev, S, plan, c.heads, c.kv_heads, c.hd, out, ws,
                                           counters, gpu_->stream()),
              cudaSuccess);
    return dev_->Get(out, rows * width);
  }

  std::vector<float> RunBackend(const float* q, const std::vector<AttentionSeq>& seqs, const TcCase& c, int64_t rows,
                                bool reduced) {
    return RunAttentionBatch(gpu_.get(), dev_.get(), q, seqs, c.heads, c.kv_heads, c.hd, rows, reduced);
  }
};

TEST_P(CudaAttentionTcTest, MatchesCpu) {
  const TcCase& c = GetParam();
  const int S = static_cast<int>(c.n_new.size());
  const int64_t width = static_cast<int64_t>(c.heads) * c.hd, kvd = static_cast<int64_t>(c.kv_heads) * c.hd;
  // Chunks at q_row with kGapRows unowned rows before each and after the last.
  int64_t rows = 0;
  std::vector<int64_t> q_row(S);
  for (int s = 0; s < S; ++s) {
    q_row[s] = rows + kGapRows;
    rows = q_row[s] + c.n_new[s];
  }
  rows += kGapRows;
  std::vector<bool> owned(rows, false);
  for (int s = 0; s < S; ++s) std::fill(owned.begin() + q_row[s], owned.begin() + q_row[s] + c.n_new[s], true);

  const auto q = RandomFloats(rows * width, 7, -c.q_scale, c.q_scale);
  std::vector<std::vector<float>> k(S), v(S);
  std::vector<AttentionSeq> host(S), dev(S);
  const float* q_dev = dev_->Put(q);
  double max_k_norm = 0, max_q_norm = 0, max_v = 0;
  for (int s = 0; s < S; ++s) {
    k[s] = RandomFloats(c.n_total[s] * kvd, 300 + s);
    v[s] = RandomFloats(c.n_total[s] * kvd, 400 + s);
    host[s] = AttentionSeq{k[s].data(), v[s].data(), q_row[s], c.n_new[s], c.n_total[s]};
    dev[s] = AttentionSeq{dev_->Put(k[s]), dev_->Put(v[s]), q_row[s], c.n_new[s], c.n_total[s]};
    max_k_norm = std::max(max_k_norm, MaxSliceNorm(k[s], c.hd));
    for (float x : v[s]) max_v = std::max(max_v, double(std::abs(x)));
  }
  for (int s = 0; s < S; ++s) {
    const std::vector<float> qs(q.begin() + q_row[s] * width, q.begin() + (q_row[s] + c.n_new[s]) * width);
    max_q_norm = std::max(max_q_norm, MaxSliceNorm(qs, c.hd));
  }

  std::vector<float> want(rows * width, kSentinel);
  cpu_.AttentionBatch(q.data(), host.data(), S, c.heads, c.kv_heads, c.hd, want.data());

  const std::vector<float> fp32 = Fp32Kernel(q_dev, dev, c, rows, width);
  const std::vector<float> off = RunBackend(q_dev, dev, c, rows, /*reduced=*/false);
  const std::vector<float> on = RunBackend(q_dev, dev, c, rows, /*reduced=*/true);

  // Off: the fp32 kernel, bit for bit (and it matches the CPU as its own test requires; over the
  // owned rows, as the sentinels elsewhere would set MaxRelError's scale).
  EXPECT_EQ(off, fp32);
  const auto owned_rows = [&](const std::vector<float>& x) {
    std::vector<float> o;
    for (int64_t r = 0; r < rows; ++r)
      if (owned[r]) o.insert(o.end(), x.begin() + r * width, x.begin() + (r + 1) * width);
    return o;
  };
  EXPECT_LE(testing::MaxRelError(owned_rows(off), owned_rows(want)), 1e-5);

  const int max_n_new = *std::max_element(c.n_new.begin(), c.n_new.end());
  const bool tensor_cores = max_n_new >= cuda::kAttentionPrefillTcMinRows && (c.hd == 64 || c.hd == 128);
  if (!tensor_cores) {
    EXPECT_EQ(on, fp32) << "chunks below kAttentionPrefillTcMinRows keep the fp32 kernel";
    return;
  }
  EXPECT_NE(on, fp32) << "the tensor-core kernel did not run";
  // Rows outside the chunks are untouched.
  for (int64_t r = 0; r < rows; ++r) {
    if (owned[r]) continue;
    for (int64_t j = 0; j < width; ++j) ASSERT_EQ(on[r * width + j], kSentinel) << "row " << r << " col " << j;
  }
  for (float x : on) ASSERT_TRUE(std::isfinite(x));
  // Sequences with short chunks in the batch took the fp32 kernel (per-sequence dispatch): their
  // rows match the CPU to fp32 rounding, far tighter than bf16 staging would.
  for (int s = 0; s < S; ++s) {
    if (c.n_new[s] >= cuda::kAttentionPrefillTcMinRows) continue;
    const std::vector<float> got_s(on.begin() + q_row[s] * width, on.begin() + (q_row[s] + c.n_new[s]) * width);
    const std::vector<float> want_s(want.begin() + q_row[s] * width, want.begin() + (q_row[s] + c.n_new[s]) * width);
    EXPECT_LE(testing::MaxRelError(got_s, want_s), 1e-5)
        << c.name << " sequence " << s << " (" << c.n_new[s] << " rows): not on the fp32 kernel";
  }
  const double rel = NormwiseRelError(on, want, owned, width);
  const double abs_err = MaxAbsError(on, want);
  const double bound = BoundFromBf16(max_q_norm, max_k_norm, max_v, c.hd);
  std::printf("[ %s ] normwise rel %.2e, max abs %.2e (bound %.2e)\n", c.name.c_str(), rel, abs_err, bound);
  EXPECT_LE(rel, 1e-2);
  EXPECT_LE(abs_err, bound);
}

std::vector<int> Ramp(int n, int base, int step) {
  std::vector<int> v(n);
  for (int i = 0; i < n; ++i) v[i] = base + i * step;
  return v;
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaAttentionTcTest,
    ::testing::Values(
        // Single-sequence prefill, Mixtral's attention shape (32 heads, 8 KV heads, head_dim 128).
        TcCase{"prefill1", {1}, {1}, 32, 8, 128}, TcCase{"prefill15", {15}, {15}, 32, 8, 128},
        TcCase{"prefill16", {16}, {16}, 32, 8, 128}, TcCase{"prefill17", {17}, {17}, 32, 8, 128},
        TcCase{"prefill64", {64}, {64}, 32, 8, 128}, TcCase{"prefill65", {65}, {65}, 32, 8, 128},
        TcCase{"prefill200", {200}, {200}, 32, 8, 128}, TcCase{"prefill2048", {2048}, {2048}, 32, 8, 128},
        // Head dim 64 and the GQA groups 1, 4, 8.
        TcCase{"prefill200_hd64_mha", {200}, {200}, 8, 8, 64}, TcCase{"prefill300_hd64_gqa8", {300}, {300}, 16, 2, 64},
        TcCase{"prefill129_hd128_gqa8", {129}, {129}, 32, 4, 128}, TcCase{"prefill77_hd128_mha", {77}, {77}, 4, 4, 128},
        // Ragged batches; chunks continuing cached contexts (n_new < n_total), single rows mixed in.
        TcCase{"ragged3_continuing_gqa4", {37, 1, 200}, {37, 513, 1200}, 32, 8, 128},
        TcCase{"ragged4_continuing_mha_hd64", {16, 130, 5, 64}, {1016, 130, 300, 64}, 8, 8, 64},
        TcCase{"ragged5_continuing_gqa8_hd64", {129, 17, 1, 256, 40}, {129, 700, 9, 300, 2000}, 16, 2, 64},
        TcCase{"ragged5_continuing_gqa8_hd128", {64, 100, 33, 2, 128}, {64, 612, 33, 2, 129}, 64, 8, 128},
        TcCase{"short_chunks_only", {7, 15, 1}, {7, 100, 50}, 32, 8, 128},
        // More sequences than travel in the launch parameters (descriptors from a device copy).
        TcCase{"ragged20_device_descriptors", Ramp(20, 16, 5), Ramp(20, 40, 17), 32, 8, 128},
        // Large scores: the running max moves often and the weights concentrate.
        TcCase{"prefill500_q_x4", {500}, {500}, 32, 8, 128, 4.f},
        TcCase{"ragged3_continuing_q_x4_hd64", {90, 300, 16}, {400, 300, 1000}, 16, 4, 64, 4.f}),
    [](const auto& info) { return info.param.name; });

struct DecodeCase {
  std::string name;
  std::vector<int> n_total;  // per sequence, one new row each
  int heads, kv_heads, hd;
  int block_size = 0;  // > 0: the cache paged in blocks of this many keys, the blocks shuffled
  float q_scale = 1.f;
};
void PrintTo(const DecodeCase& c, std::ostream* os) { *os << c.name; }

class CudaAttentionDecodeTcTest : public testing::CpuVsCudaTest<::testing::TestWithParam<DecodeCase>> {
 protected:
  void TearDown() override {
    if (gpu_) {
      gpu_->SetReducedPrecisionAttention(false);
      gpu_->SetKvCacheDType(DType::kF32);
    }
    testing::CpuVsCudaTest<::testing::TestWithParam<DecodeCase>>::TearDown();
  }
  std::vector<float> Run(const float* q, const std::vector<AttentionSeq>& seqs, const DecodeCase& c, int64_t rows,
                         bool reduced) {
    return RunAttentionBatch(gpu_.get(), dev_.get(), q, seqs, c.heads, c.kv_heads, c.hd, rows, reduced);
  }
};

TEST_P(CudaAttentionDecodeTcTest, DecodeMatchesCpu) {
  const DecodeCase& c = GetParam();
  const int S = static_cast<int>(c.n_total.size());
  const int64_t width = static_cast<int64_t>(c.heads) * c.hd, kvd = static_cast<int64_t>(c.kv_heads) * c.hd;
  ASSERT_TRUE(cpu_.SetKvCacheDType(DType::kBF16));
  ASSERT_TRUE(gpu_->SetKvCacheDType(DType::kBF16));
  // Rows 0..S-1: the decode rows; rows S..S+4: a 5-row chunk over a 40-key context (sequence S).
  const int64_t rows = S + 5;
  const auto q = RandomFloats(rows * width, 11, -c.q_scale, c.q_scale);
  const float* q_dev = dev_->Put(q);
  std::vector<int> totals = c.n_total;
  totals.push_back(40);
  // Contiguous: one bf16 array per sequence. Paged: one pool, each sequence's blocks in a shuffled
  // order (block i of sequence s at pool block perm[next++]).
  std::vector<std::vector<uint16_t>> kb(S + 1), vb(S + 1);
  std::vector<AttentionSeq> host(S + 1), dev(S + 1), paged_dev(S + 1);
  double max_k_norm = 0, max_v = 0, max_q_norm = 0;
  for (int s = 0; s <= S; ++s) {
    const auto k = RandomFloats(totals[s] * kvd, 500 + s, -2, 2), v = RandomFloats(totals[s] * kvd, 600 + s);
    kb[s].resize(k.size());
    vb[s].resize(v.size());
    for (size_t i = 0; i < k.size(); ++i) kb[s][i] = F32ToBf16(k[i]), vb[s][i] = F32ToBf16(v[i]);
    std::vector<float> kr(k.size());
    for (size_t i = 0; i < k.size(); ++i) kr[i] = Bf16ToF32(kb[s][i]), max_v = std::max(max_v, double(std::abs(v[i])));
    max_k_norm = std::max(max_k_norm, MaxSliceNorm(kr, c.hd));
    const int64_t q_row = s < S ? s : S, n_new = s < S ? 1 : 5;
    host[s] = AttentionSeq{kb[s].data(), vb[s].data(), q_row, static_cast<int>(n_new), totals[s]};
    dev[s] = AttentionSeq{dev_->Put(kb[s]), dev_->Put(vb[s]), q_row, static_cast<int>(n_new), totals[s]};
  }
  for (int64_t r = 0; r < S; ++r)
    max_q_norm = std::max(max_q_norm,
                          MaxSliceNorm(std::vector<float>(q.begin() + r * width, q.begin() + (r + 1) * width), c.hd));
  std::vector<std::vector<int32_t>> tables(S + 1);
  std::vector<uint16_t> kpool, vpool;
  uint16_t *kpool_dev = nullptr, *vpool_dev = nullptr;
  if (c.block_size > 0) {
    int num_blocks = 0;
    for (int s = 0; s <= S; ++s) num_blocks += (totals[s] + c.block_size - 1) / c.block_size;
    std::vector<int32_t> perm(num_blocks);
    for (int i = 0; i < num_blocks; ++i) perm[i] = static_cast<int32_t>((i * 7919LL) % num_blocks);
    if (num_blocks % 7919 == 0) std::iota(perm.begin(), perm.end(), 0);
    kpool.assign(static_cast<size_t>(num_blocks) * c.block_size * kvd, 0);
    vpool.assign(kpool.size(), 0);
    int next = 0;
    for (int s = 0; s <= S; ++s) {
      for (int i = 0; i < (totals[s] + c.block_size - 1) / c.block_size; ++i) tables[s].push_back(perm[next++]);
      for (int t = 0; t < totals[s]; ++t) {
        const int64_t row = static_cast<int64_t>(tables[s][t / c.block_size]) * c.block_size + t % c.block_size;
        std::copy_n(kb[s].begin() + t * kvd, kvd, kpool.begin() + row * kvd);
        std::copy_n(vb[s].begin() + t * kvd, kvd, vpool.begin() + row * kvd);
      }
    }
    kpool_dev = dev_->Put(kpool);
    vpool_dev = dev_->Put(vpool);
    for (int s = 0; s <= S; ++s) {
      paged_dev[s] = AttentionSeq{kpool_dev,   vpool_dev, host[s].q_row, host[s].n_new, totals[s], dev_->Put(tables[s]),
                                  c.block_size};
    }
  }
  const std::vector<AttentionSeq> decode_dev(dev.begin(), dev.begin() + S);
  std::vector<float> want(rows * width, kSentinel);
  cpu_.AttentionBatch(q.data(), host.data(), S, c.heads, c.kv_heads, c.hd, want.data());
  const std::vector<float> on = Run(q_dev, decode_dev, c, rows, true);
  const std::vector<float> off = Run(q_dev, decode_dev, c, rows, false);
  ASSERT_TRUE(gpu_->status().ok()) << gpu_->status().ToString();
  const std::vector<bool> owned = [&] {
    std::vector<bool> o(rows, false);
    std::fill(o.begin(), o.begin() + S, true);
    return o;
  }();
  for (int64_t i = S * width; i < rows * width; ++i) ASSERT_EQ(on[i], kSentinel) << "a row outside the batch";
  for (int64_t i = 0; i < S * width; ++i) ASSERT_TRUE(std::isfinite(on[i])) << "element " << i;
  // The fp32 decode kernel still matches the CPU to fp32 rounding (over the decode rows: the
  // sentinel rows would set MaxRelError's scale); the tensor cores differ from it.
  EXPECT_LE(testing::MaxRelError(std::vector<float>(off.begin(), off.begin() + S * width),
                                 std::vector<float>(want.begin(), want.begin() + S * width)),
            1e-5);
  if (*std::max_element(c.n_total.begin(), c.n_total.end()) >= 16) {
    EXPECT_NE(on, off) << "the tensor cores did not run";
  }
  const double rel = NormwiseRelError(on, want, owned, width);
  const double abs_err = MaxAbsError(std::vector<float>(on.begin(), on.begin() + S * width),
                                     std::vector<float>(want.begin(), want.begin() + S * width));
  const double bound = BoundFromBf16(max_q_norm, max_k_norm, max_v, c.hd);
  std::printf("[ %s ] normwise rel %.2e, max abs %.2e (bound %.2e)\n", c.name.c_str(), rel, abs_err, bound);
  EXPECT_LE(rel, 1e-2);
  EXPECT_LE(abs_err, bound);
  // Batched with a 5-row chunk (fp32 kernels), the decode rows are bitwise the same.
  const std::vector<float> mixed = Run(q_dev, dev, c, rows, true);
  EXPECT_TRUE(std::equal(on.begin(), on.begin() + S * width, mixed.begin())) << "decode rows depend on the batch";
  if (c.block_size > 0) {
    const std::vector<AttentionSeq> decode_paged(paged_dev.begin(), paged_dev.begin() + S);
    EXPECT_EQ(Run(q_dev, decode_paged, c, rows, true), on) << "paged is not bitwise the contiguous layout";
    // The step path the engine records in CUDA graphs (UploadStepSeqs once, AttentionStep on the
    // layer's pools): the same bits.
    std::vector<AttentionSeq> step(S);
    for (int s = 0; s < S; ++s)
      step[s] = AttentionSeq{nullptr, nullptr, s, 1, totals[s], paged_dev[s].blocks, c.block_size};
    gpu_->SetReducedPrecisionAttention(true);
    const auto plan = gpu_->UploadStepSeqs(step.data(), S, c.heads, c.kv_heads, c.hd);
    ASSERT_TRUE(plan.ok()) << plan.status().ToString();
    float* out = dev_->Put(std::vector<float>(rows * width, kSentinel));
    gpu_->AttentionStep(q_dev, kpool_dev, vpool_dev, out);
    EXPECT_EQ(dev_->Get(out, rows * width), on) << "the step path is not bitwise the batch op";
    // Recorded as a graph (its scratch is sized by the eager step above) and replayed: the same.
    float* replayed = dev_->Put(std::vector<float>(rows * width, kSentinel));
    ASSERT_TRUE(gpu_->BeginGraph().ok());
    gpu_->AttentionStep(q_dev, kpool_dev, vpool_dev, replayed);
    const auto graph = gpu_->EndGraph();
    ASSERT_TRUE(graph.ok()) << graph.status().ToString();
    ASSERT_TRUE(gpu_->LaunchGraph(*graph).ok());
    gpu_->SetReducedPrecisionAttention(false);
    EXPECT_EQ(dev_->Get(replayed, rows * width), on) << "the replayed step is not bitwise the batch op";
    gpu_->DropGraphs();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaAttentionDecodeTcTest,
    ::testing::Values(DecodeCase{"mixtral_b1_ctx513", {513}, 32, 8, 128}, DecodeCase{"b1_ctx1", {1}, 32, 8, 128},
                      DecodeCase{"qwen3_b64_ragged_gqa8", Ramp(64, 1, 37), 32, 4, 128},
                      DecodeCase{"gqa16_hd64", {1, 700, 17}, 32, 2, 64},
                      DecodeCase{"gqa6_ctx257", {257, 3}, 48, 8, 128},
                      DecodeCase{"mha_hd64_short", {1, 15, 16, 17, 64, 65}, 8, 8, 64},
                      DecodeCase{"ctx20000_split", {20000}, 64, 8, 128},
                      DecodeCase{"paged16_b16", std::vector<int>(16, 300), 32, 8, 128, 16},
                      DecodeCase{"paged32_b20_device_descriptors", Ramp(20, 1, 53), 32, 4, 128, 32},
                      DecodeCase{"q_x4", {900, 33}, 32, 8, 128, 0, 4.f}),
    [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace ef::runtime
