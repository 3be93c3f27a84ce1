// CudaBackend itself: allocator accounting and budget errors, the staging ring under wrap-around,
// small uploads carried in kernel parameters, weight upload (native and bf16), the factory, and the synthetic-weight
// fill kernel.
#include <gtest/gtest.h>

#include "runtime/backend/cuda/cuda_kernels.h"
#include "tests/gpu/gpu_test_util.h"

namespace ef::runtime {
namespace {

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!testing::HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  }
};

TEST_F(CudaBackendTest, AllocationsAreZeroedAndAccounted) {
  auto b = testing::MakeTestCudaBackend();
  ASSERT_NE(b, nullptr);
  const size_t base = b->bytes_in_use();
  {
    auto buf = b->Allocate(1000);
    ASSERT_TRUE(buf.ok());
    EXPECT_GE(b->bytes_in_use(), base + 1000);
    std::vector<uint8_t> h(1000, 7);
    b->CopyToHost(h.data(), buf->data(), h.size());
    EXPECT_EQ(h, std::vector<uint8_t>(1000, 0));
  }
  EXPECT_EQ(b->bytes_in_use(), base);
  EXPECT_TRUE(b->status().ok());
}

TEST_F(CudaBackendTest, OverBudgetIsResourceExhaustedNamingBytesAndBudget) {
  CudaBackendOptions o;
  o.memory_budget = size_t{64} << 20;
  auto b = testing::MakeTestCudaBackend(o);
  ASSERT_NE(b, nullptr);
  auto ok = b->Allocate(size_t{32} << 20);
  ASSERT_TRUE(ok.ok());
  auto bad = b->Allocate(size_t{40} << 20);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(bad.status().message().find(std::to_string(size_t{40} << 20)), std::string::npos) << bad.status().message();
  EXPECT_NE(bad.status().message().find(std::to_string(size_t{64} << 20)), std::string::npos) << bad.status().message();
  auto w = b->UploadWeight(DType::kF32, std::vector<float>(size_t{10} << 20).data(), 10 << 10, 1 << 10);
  EXPECT_FALSE(w.ok());
}

TEST_F(CudaBackendTest, StagingRingWrapsWithoutCorruptingEarlierCopies) {
  CudaBackendOptions o;
  o.staging_bytes = size_t{1} << 20;  // tiny ring: copies below wrap it many times
  auto b = testing::MakeTestCudaBackend(o);
  ASSERT_NE(b, nullptr);
  const size_t n = (size_t{3} << 20) / sizeof(float) + 123;  // larger than the ring
  std::vector<Buffer> bufs;
  std::vector<std::vector<float>> want;
  for (int i = 0; i < 5; ++i) {
    std::vector<float> h = testing::RandomFloats(i == 2 ? n : 1000 + i, 100 + i);
    auto buf = b->Allocate(h.size() * sizeof(float));
    ASSERT_TRUE(buf.ok());
    b->CopyToDevice(buf->data(), h.data(), h.size() * sizeof(float));
    want.push_back(h);
    std::fill(h.begin(), h.end(), -1.f);  // the caller's memory is free once the call returns
    bufs.push_back(std::move(buf).value());
  }
  for (int i = 0; i < 5; ++i) {
    std::vector<float> got(want[i].size());
    b->CopyToHost(got.data(), bufs[i].data(), got.size() * sizeof(float));
    EXPECT_EQ(got, want[i]) << "copy " << i;
  }
  EXPECT_TRUE(b->status().ok());
}

TEST_F(CudaBackendTest, SmallCopiesAtEverySizeAndAlignment) {
  // Host->device copies up to kParamCopyMaxBytes travel in a kernel's parameters, larger ones
  // through the staging ring: sizes around the 16-byte, 256-byte and parameter-size boundaries, at
  // unaligned offsets, the host buffer overwritten as soon as the call returns, then copied on the
  // device from another offset.
  auto b = testing::MakeTestCudaBackend();
  ASSERT_NE(b, nullptr);
  const size_t kMax = cuda::kParamCopyMaxBytes;
  auto buf = b->Allocate(4 * kMax + 64);
  auto src = b->Allocate(4 * kMax + 64);
  ASSERT_TRUE(buf.ok() && src.ok());
  auto* dev = static_cast<uint8_t*>(buf->data());
  auto* dev_src = static_cast<uint8_t*>(src->data());
  uint8_t seed = 1;
  for (size_t bytes : {size_t{1}, size_t{15}, size_t{16}, size_t{17}, size_t{64}, size_t{255}, size_t{256}, size_t{257},
                       size_t{1000}, kMax - 1, kMax, kMax + 1, 3 * kMax}) {
    for (size_t off : {size_t{0}, size_t{3}, size_t{16}}) {
      std::vector<uint8_t> h(bytes);
      for (size_t i = 0; i < bytes; ++i) h[i] = static_cast<uint8_t>(seed + i * 7);
      const std::vector<uint8_t> want = h;
      std::vector<uint8_t> guard(bytes + 32, 0xEE);
      b->CopyToDevice(dev, guard.data(), guard.size());
      b->CopyToDevice(dev + off, h.data(), bytes);
      std::fill(h.begin(), h.end(), 0);  // the caller's memory is free once the call returns
      std::vector<uint8_t> got(bytes + 32);
      b->CopyToHost(got.data(), dev, got.size());
      EXPECT_EQ(std::vector<uint8_t>(got.begin() + off, got.begin() + off + bytes), want) << bytes << " @" << off;
      EXPECT_EQ(got[off + bytes], 0xEE) << "wrote past the end: " << bytes << " @" << off;
      if (off > 0) {
        EXPECT_EQ(got[off - 1], 0xEE) << "wrote before the start: " << bytes << " @" << off;
      }
      // Device to device, from an offset that differs from the destination's.
      b->CopyToDevice(dev_src + 5, want.data(), bytes);
      b->CopyOnDevice(dev + off, dev_src + 5, bytes);
      b->CopyToHost(got.data(), dev + off, bytes);
      EXPECT_EQ(std::vector<uint8_t>(got.begin(), got.begin() + bytes), want) << "on device " << bytes << " @" << off;
      ++seed;
    }
  }
  // A large copy each way and on the device.
  const size_t big = (size_t{3} << 20) + 4;
  auto a = b->Allocate(big), c = b->Allocate(big);
  ASSERT_TRUE(a.ok() && c.ok());
  std::vector<uint8_t> h(big);
  for (size_t i = 0; i < big; ++i) h[i] = static_cast<uint8_t>(i * 13 + 1);
  b->CopyToDevice(a->data(), h.data(), big);
  b->CopyOnDevice(c->data(), a->data(), big);
  std::vector<uint8_t> got(big);
  b->CopyToHost(got.data(), c->data(), big);
  EXPECT_EQ(got, h);
  EXPECT_TRUE(b->status().ok()) << b->status().ToString();
}

TEST_F(CudaBackendTest, UploadWeightKeepsF32ExactOrRoundsToBf16WhenAsked) {
  std::vector<float> w = testing::RandomFloats(64 * 48, 7);
  for (bool bf16 : {false, true}) {
    CudaBackendOptions o;
    o.bf16_weights = bf16;
    auto b = testing::MakeTestCudaBackend(o);
    ASSERT_NE(b, nullptr);
    const size_t before = b->bytes_in_use();
    auto dw = b->UploadWeight(DType::kF32, w.data(), 64, 48);
    ASSERT_TRUE(dw.ok()) << dw.status().ToString();
    EXPECT_EQ(dw->dtype, bf16 ? DType::kBF16 : DType::kF32);
    EXPECT_GE(b->bytes_in_use(), before + dw->nbytes());
    if (bf16) {
      std::vector<uint16_t> got(w.size());
      b->CopyToHost(got.data(), dw->data, got.size() * 2);
      for (size_t i = 0; i < w.size(); ++i) ASSERT_EQ(got[i], F32ToBf16(w[i])) << i;
    } else {
      std::vector<float> got(w.size());
      b->CopyToHost(got.data(), dw->data, got.size() * 4);
      EXPECT_EQ(got, w);
    }
    // 1-D vectors (norms, biases) stay F32 either way.
    auto v = b->UploadWeight(DType::kF32, w.data(), 1, 48);
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(v->dtype, DType::kF32);
    EXPECT_FALSE(b->UploadWeight(DType::kI32, w.data(), 1, 4).ok());
  }
}

TEST_F(CudaBackendTest, FactoryMakesACudaBackend) {
  auto b = MakeBackend("cuda", 0);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ((*b)->kind(), BackendKind::kCuda);
  EXPECT_EQ((*b)->name().rfind("cuda:0 (", 0), 0u) << (*b)->name();
  auto a = MakeBackend("auto", 0);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ((*a)->kind(), BackendKind::kCuda);
  EXPECT_FALSE(MakeBackend("cuda", 999).ok());
}

TEST_F(CudaBackendTest, FillRandomIsDeterministicAndInRange) {
  auto b = testing::MakeTestCudaBackend();
  ASSERT_NE(b, nullptr);
  const int64_t n = 1 << 20;
  auto w1 = b->AllocateWeight(DType::kBF16, 1024, 1024);
  auto w2 = b->AllocateWeight(DType::kBF16, 1024, 1024);
  ASSERT_TRUE(w1.ok() && w2.ok());
  ASSERT_EQ(cuda::launch_fill_random(const_cast<void*>(w1->data), DType::kBF16, n, 42, 0.5f, b->stream()), cudaSuccess);
  ASSERT_EQ(cuda::launch_fill_random(const_cast<void*>(w2->data), DType::kBF16, n, 42, 0.5f, b->stream()), cudaSuccess);
  std::vector<uint16_t> h1(n), h2(n);
  b->CopyToHost(h1.data(), w1->data, n * 2);
  b->CopyToHost(h2.data(), w2->data, n * 2);
  EXPECT_EQ(h1, h2);
  double sum = 0;
  for (uint16_t x : h1) {
    const float f = Bf16ToF32(x);
    ASSERT_LE(std::abs(f), 0.5f);
    sum += f;
  }
  EXPECT_LT(std::abs(sum / n), 0.01);
}

}  // namespace
}  // namespace ef::runtime
