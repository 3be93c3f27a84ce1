// CudaBackend::Gemm on lossless packed bf16 weights (kPbf16) against the CPU backend on the same
// blocks: the decoding GEMV (gemv_pbf16.cu) for m <= kGemvMaxRows, the bf16 decode + cuBLAS path
// past it; and the decode itself, bit for bit the weight that was packed. Skips when no CUDA device
// is visible.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/backend/cuda/cuda_kernels.h"
#include "runtime/core/packed_bf16.h"
#include "runtime/engine/engine.h"
#include "tests/gpu/gpu_test_util.h"

namespace ef::runtime {
namespace {

using testing::RandomFloats;

class CudaPbf16Test : public testing::CpuVsCudaTest<> {
 protected:
  // A bf16 weight with values that need the format's escapes (zeros, subnormals, exceptions),
  // packed; the host view (kept alive by the fixture) and its device copy.
  struct Packed {
    std::vector<uint16_t> bf16;
    Weight host, device;
  };
  Packed Make(int64_t n, int64_t k, uint32_t seed) {
    Packed p;
    const std::vector<float> f = RandomFloats(n * k, seed, -0.05f, 0.05f);
    p.bf16.resize(f.size());
    for (size_t i = 0; i < f.size(); ++i) p.bf16[i] = F32ToBf16(f[i]);
    std::mt19937 rng(seed);
    for (int i = 0; i < 8; ++i) {  // exceptions in the first, last and random rows; a zero; a subnormal
      p.bf16[static_cast<size_t>(rng() % (n * k))] = 0x2000;
      p.bf16[static_cast<size_t>(rng() % (n * k))] = 0x0000;
      p.bf16[static_cast<size_t>(rng() % (n * k))] = 0x8005;
    }
    p.bf16[3] = 0xa100;
    p.bf16[static_cast<size_t>(n * k - 1)] = 0x1f80;
    keep_.emplace_back(WeightBytes(DType::kPbf16, n, k));
    auto bytes = PackBf16(p.bf16.data(), n, k, keep_.back().data(), keep_.back().size());
    EXPECT_TRUE(bytes.ok()) << bytes.status().ToString();
    p.host = Weight{DType::kPbf16, keep_.back().data(), n, k};
    auto g = gpu_->UploadWeight(DType::kPbf16, p.host.data, n, k);
    EXPECT_TRUE(g.ok()) << g.status().ToString();
    if (g.ok()) p.device = *g;
    return p;
  }
  std::vector<std::vector<std::byte>> keep_;
};

TEST_F(CudaPbf16Test, GemmMatchesCpu) {
  struct Case {
    int64_t n, k;
    bool bias, acc;
  };
  // 4165 x 4096 takes two decode tiles; 14336 x 4096 and 4096 x 14336 are Mixtral's experts.
  for (Case c : {Case{128, 128, false, false}, Case{1000, 640, true, false}, Case{1024, 4096, false, true},
                 Case{4096, 1408 + 128, true, true}, Case{4165, 4096, false, false}, Case{14336, 4096, false, false},
                 Case{4096, 14336, false, true}}) {
    Packed p = Make(c.n, c.k, static_cast<uint32_t>(50 + c.n));
    ASSERT_FALSE(p.device.empty());
    const std::vector<float> b = RandomFloats(c.n, 41);
    const Weight bc{DType::kF32, b.data(), 1, c.n};
    auto bg = gpu_->UploadWeight(DType::kF32, b.data(), 1, c.n);
    ASSERT_TRUE(bg.ok());
    // The values are bf16 exactly: the cuBLAS path's weights need no rounding.
    std::vector<float> values(p.bf16.size());
    for (size_t i = 0; i < values.size(); ++i) values[i] = Bf16ToF32(p.bf16[i]);
    const Weight wr{DType::kF32, values.data(), c.n, c.k};
    for (int64_t m : {1, 2, 3, 4, 16, 64}) {
      const std::string what = "m=" + std::to_string(m) + " n=" + std::to_string(c.n) + " k=" + std::to_string(c.k);
      testing::ExpectPackedGemmMatchesCpu(cpu_, *gpu_, *dev_, p.host, p.device, wr, c.bias ? &bc : nullptr,
                                          c.bias ? &*bg : nullptr, m, c.acc, cuda::kGemvMaxRows, what);
    }
  }
}

// The decode to bf16 returns every bit, over tiles that start and end anywhere.
TEST_F(CudaPbf16Test, DecodeReturnsEveryBit) {
  const int64_t n = 300, k = 384;
  Packed p = Make(n, k, 7);
  ASSERT_FALSE(p.device.empty());
  for (auto [begin, rows] : {std::pair<int64_t, int64_t>{0, n}, {1, 64}, {237, 63}}) {
    uint16_t* d = dev_->Put(std::vector<uint16_t>(static_cast<size_t>(rows * k), 0xffff));
    gpu_->Synchronize();
    ASSERT_EQ(cuda::launch_unpack_pbf16(p.device.data, n, k, begin, rows, d, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<uint16_t> got = dev_->Get(d, static_cast<size_t>(rows * k));
    ASSERT_EQ(0, std::memcmp(got.data(), p.bf16.data() + begin * k, got.size() * sizeof(uint16_t)))
        << "rows " << begin << ".." << begin + rows;
  }
}

// A trained checkpoint's experts (models/tiny-code-moe, bf16, widths 128 and 256), packed as the
// expert cache's tiers do: the device's GEMMs on the blocks compute what the CPU's do on bf16.
TEST_F(CudaPbf16Test, TrainedExpertsMatchCpu) {
  EngineOptions eo;
  eo.backend = "cpu";
  auto engine = Engine::Create(std::string(EF_TEST_DATA) + "/../../models/tiny-code-moe", eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const ModelConfig& c = (*engine)->config();
  for (int l : {0, c.num_layers - 1}) {
    const ExpertWeights& e = (*engine)->weights().host_expert(l, 0);
    for (const Weight* w : {&e.gate, &e.down}) {
      ASSERT_EQ(w->dtype, DType::kBF16);
      keep_.emplace_back(WeightBytes(DType::kPbf16, w->rows, w->cols));
      ASSERT_TRUE(
          PackBf16(static_cast<const uint16_t*>(w->data), w->rows, w->cols, keep_.back().data(), keep_.back().size())
              .ok());
      const Weight host{DType::kPbf16, keep_.back().data(), w->rows, w->cols};
      auto dev = gpu_->UploadWeight(DType::kPbf16, host.data, w->rows, w->cols);
      ASSERT_TRUE(dev.ok()) << dev.status().ToString();
      std::vector<float> values(static_cast<size_t>(w->rows * w->cols));
      for (size_t i = 0; i < values.size(); ++i) values[i] = Bf16ToF32(static_cast<const uint16_t*>(w->data)[i]);
      const Weight wr{DType::kF32, values.data(), w->rows, w->cols};
      for (int64_t m : {1, 2, 5})
        testing::ExpectPackedGemmMatchesCpu(cpu_, *gpu_, *dev_, host, *dev, wr, nullptr, nullptr, m, false,
                                            cuda::kGemvMaxRows,
                                            "layer " + std::to_string(l) + " m=" + std::to_string(m));
    }
  }
}

}  // namespace
}  // namespace ef::runtime
