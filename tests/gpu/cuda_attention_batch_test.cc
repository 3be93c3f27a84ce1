// Backend::AttentionBatch on CUDA (one launch for all sequences) against the CPU reference, which
// loops over the per-sequence op: ragged mixes of prefill chunks and decode rows (general kernel),
// decode batches (the flash-decoding kernel: long single-sequence contexts split over many
// blocks, empty splits, GQA groups 1/4/8/16, head_dim 36/64/128/256), head_dim 18 (decode falls back
// to the general kernel), few sequences (key splits) and many (one block per sequence and head).
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/core/dtype.h"
#include "tests/gpu/gpu_test_util.h"

namespace ef::runtime {
namespace {

using testing::DeviceArrays;
using testing::MaxRelError;
using testing::RandomFloats;

struct BatchCase {
  std::string name;
  std::vector<int> n_new, n_total;  // per sequence
  int heads, kv_heads, hd;
};

class CudaAttentionBatchTest : public testing::CpuVsCudaTest<::testing::TestWithParam<BatchCase>> {};

TEST_P(CudaAttentionBatchTest, MatchesCpu) {
  const BatchCase& c = GetParam();
  const int S = static_cast<int>(c.n_new.size());
  const int64_t qd = static_cast<int64_t>(c.heads) * c.hd, kvd = static_cast<int64_t>(c.kv_heads) * c.hd;
  int64_t T = 0;
  for (int n : c.n_new) T += n;
  const auto q = RandomFloats(T * qd, 21, -2, 2);
  std::vector<std::vector<float>> k(S), v(S);
  std::vector<AttentionSeq> host(S), dev(S);
  float* qd_dev = dev_->Put(q);
  int64_t row = 0;
  for (int s = 0; s < S; ++s) {
    k[s] = RandomFloats(c.n_total[s] * kvd, 100 + s, -2, 2);
    v[s] = RandomFloats(c.n_total[s] * kvd, 200 + s);
    host[s] = AttentionSeq{k[s].data(), v[s].data(), row, c.n_new[s], c.n_total[s]};
    dev[s] = AttentionSeq{dev_->Put(k[s]), dev_->Put(v[s]), row, c.n_new[s], c.n_total[s]};
    row += c.n_new[s];
  }
  std::vector<float> want(q.size()), loop(q.size());
  cpu_.AttentionBatch(q.data(), host.data(), S, c.heads, c.kv_heads, c.hd, want.data());
  // The CPU batch op is the per-sequence op in a loop, bit for bit.
  for (const AttentionSeq& a : host)
    cpu_.Attention(q.data() + a.q_row * qd, a.n_new, static_cast<const float*>(a.k), static_cast<const float*>(a.v),
                   a.n_total, c.heads, c.kv_heads, c.hd, loop.data() + a.q_row * qd);
  EXPECT_EQ(want, loop);
  float* od = dev_->Zeros<float>(q.size());
  gpu_->AttentionBatch(qd_dev, dev.data(), S, c.heads, c.kv_heads, c.hd, od);
  EXPECT_LE(MaxRelError(dev_->Get(od, q.size()), want), 1e-5);
  // Descriptors are read at the call: a second call with other sequences reuses the device copy.
  std::vector<AttentionSeq> tail(dev.begin() + S / 2, dev.end());
  float* od2 = dev_->Zeros<float>(q.size());
  gpu_->AttentionBatch(qd_dev, tail.data(), static_cast<int>(tail.size()), c.heads, c.kv_heads, c.hd, od2);
  const auto got2 = dev_->Get(od2, q.size());
  const int64_t from = tail.empty() ? T : tail.front().q_row;
  std::vector<float> want2(q.size(), 0.f);
  std::copy(want.begin() + from * qd, want.end(), want2.begin() + from * qd);
  EXPECT_LE(MaxRelError(got2, want2), 1e-5);
}

// A bf16 KV cache (SetKvCacheDType): the keys and values appended by CopyBatchToBf16 are the CPU's
// rounding, and attention over them matches the CPU backend's bf16 attention: within 1e-5 on the
// fp32 kernels (decode, general), within 1e-2 on tensor cores (prefill chunks, bf16 Q and P).
TEST_P(CudaAttentionBatchTest, Bf16KvCacheMatchesCpu) {
  const BatchCase& c = GetParam();
  const int S = static_cast<int>(c.n_new.size());
  const int64_t qd = static_cast<int64_t>(c.heads) * c.hd, kvd = static_cast<int64_t>(c.kv_heads) * c.hd;
  int64_t T = 0;
  for (int n : c.n_new) T += n;
  const auto q = RandomFloats(T * qd, 23, -2, 2);
  std::vector<std::vector<uint16_t>> kb(S), vb(S);
  std::vector<AttentionSeq> host(S), dev(S);
  std::vector<Backend::CopyItem> appends;
  float* qd_dev = dev_->Put(q);
  int64_t row = 0;
  for (int s = 0; s < S; ++s) {
    const auto k = RandomFloats(c.n_total[s] * kvd, 300 + s, -2, 2), v = RandomFloats(c.n_total[s] * kvd, 400 + s);
    kb[s].resize(k.size());
    vb[s].resize(v.size());
    for (size_t i = 0; i < k.size(); ++i) kb[s][i] = F32ToBf16(k[i]), vb[s][i] = F32ToBf16(v[i]);
    uint16_t* kd = dev_->Zeros<uint16_t>(k.size());
    uint16_t* vdv = dev_->Zeros<uint16_t>(v.size());
    appends.push_back({kd, dev_->Put(k), k.size() * sizeof(float)});
    appends.push_back({vdv, dev_->Put(v), v.size() * sizeof(float)});
    host[s] = AttentionSeq{kb[s].data(), vb[s].data(), row, c.n_new[s], c.n_total[s]};
    dev[s] = AttentionSeq{kd, vdv, row, c.n_new[s], c.n_total[s]};
    row += c.n_new[s];
  }
  gpu_->CopyBatchToBf16(appends.data(), static_cast<int>(appends.size()));
  for (int s = 0; s < S; ++s) {
    ASSERT_EQ(dev_->Get(static_cast<const uint16_t*>(dev[s].k), kb[s].size()), kb[s]) << "keys of sequence " << s;
    ASSERT_EQ(dev_->Get(static_cast<const uint16_t*>(dev[s].v), vb[s].size()), vb[s]) << "values of sequence " << s;
  }
  ASSERT_TRUE(cpu_.SetKvCacheDType(DType::kBF16));
  ASSERT_TRUE(gpu_->SetKvCacheDType(DType::kBF16));
  std::vector<float> want(q.size());
  cpu_.AttentionBatch(q.data(), host.data(), S, c.heads, c.kv_heads, c.hd, want.data());
  for (bool tensor_cores : {false, true}) {
    gpu_->SetReducedPrecisionAttention(tensor_cores);
    float* od = dev_->Zeros<float>(q.size());
    gpu_->AttentionBatch(qd_dev, dev.data(), S, c.heads, c.kv_heads, c.hd, od);
    EXPECT_LE(MaxRelError(dev_->Get(od, q.size()), want), tensor_cores ? 1e-2 : 1e-5)
        << (tensor_cores ? "tensor cores" : "fp32 kernels");
  }
  gpu_->SetReducedPrecisionAttention(false);
  gpu_->SetKvCacheDType(DType::kF32);
}

std::vector<int> Repeat(int n, int value) { return std::vector<int>(n, value); }

std::vector<int> Ragged(int n, int base, int step) {
  std::vector<int> v(n);
  for (int i = 0; i < n; ++i) v[i] = base + (i * step) % 997;
  return v;
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaAttentionBatchTest,
    ::testing::Values(BatchCase{"single_decode_split", {1}, {600}, 32, 8, 128},
                      BatchCase{"mixed_prefill_decode", {7, 1, 1, 33, 1}, {7, 90, 1, 300, 513}, 8, 2, 64},
                      BatchCase{"decode3_ragged_mqa", {1, 1, 1}, {5, 700, 64}, 8, 1, 128},
                      BatchCase{"chunks_on_cache_mha", {3, 5, 2}, {30, 5, 1000}, 8, 8, 64},
                      BatchCase{"decode64_mixtral", Repeat(64, 1), Ragged(64, 1, 37), 32, 8, 128},
                      BatchCase{"decode16_ctx512", Repeat(16, 1), Repeat(16, 513), 32, 8, 128},
                      BatchCase{"prefill_pair_mixtral", {64, 17}, {64, 40}, 32, 8, 128},
                      BatchCase{"decode1_ctx8192_gqa4", {1}, {8192}, 32, 8, 128},
                      BatchCase{"decode1_ctx20000_gqa8", {1}, {20000}, 64, 8, 128},
                      BatchCase{"decode2_short_and_long_gqa16", {1, 1}, {1, 700}, 32, 2, 128},
                      BatchCase{"decode1_hd256_gqa8", {1}, {1000}, 16, 2, 256},
                      BatchCase{"decode4_mha_hd64", {1, 1, 1, 1}, {33, 1, 64, 129}, 8, 8, 64},
                      BatchCase{"decode1_hd18_general_kernel", {1}, {300}, 4, 2, 18},
                      // rows of a bf16 cache that do not cut at 8 values: 8-byte copies
                      BatchCase{"decode3_hd36_narrow_rows", {1, 1, 1}, {70, 1, 333}, 8, 2, 36}),
    [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace ef::runtime
