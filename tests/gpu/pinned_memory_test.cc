// Page-locked host memory of both kinds (runtime/backend/cuda/pinned_memory.h): the driver's and
// transparent huge pages registered with the driver. Both must be what the copy engine takes for
// asynchronous copies (the runtime reports them as host memory it knows), and survive a round trip
// through the device byte for byte; the huge-page kind starts on a 2 MiB boundary.
#include "runtime/backend/cuda/pinned_memory.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "tests/gpu/gpu_test_util.h"

namespace ef::runtime::cuda {
namespace {

class PinnedMemoryTest : public ::testing::TestWithParam<PinnedKind> {
 protected:
  void SetUp() override {
    if (!testing::HaveDevice()) GTEST_SKIP() << "no CUDA device visible";
  }
};

TEST_P(PinnedMemoryTest, RoundTripsThroughTheDeviceAsynchronously) {
  const PinnedKind kind = GetParam();
  const size_t bytes = (size_t{3} << 20) + 5;  // not a whole number of huge pages
  StatusOr<void*> src = AllocatePinned(bytes, kind);
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  StatusOr<void*> back = AllocatePinned(bytes, kind);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  if (kind == PinnedKind::kHugePages) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(*src) % (size_t{2} << 20), 0u);
  }
  for (void* p : {*src, *back}) {
    cudaPointerAttributes a{};
    ASSERT_EQ(cudaPointerGetAttributes(&a, p), cudaSuccess);
    EXPECT_EQ(a.type, cudaMemoryTypeHost) << PinnedKindName(kind) << ": not page-locked memory the runtime knows";
  }
  auto* s = static_cast<unsigned char*>(*src);
  for (size_t i = 0; i < bytes; ++i) s[i] = static_cast<unsigned char>(i * 131 + (i >> 12));
  std::memset(*back, 0, bytes);

  void* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, bytes), cudaSuccess);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  EXPECT_EQ(cudaMemcpyAsync(dev, *src, bytes, cudaMemcpyHostToDevice, stream), cudaSuccess);
  EXPECT_EQ(cudaMemcpyAsync(*back, dev, bytes, cudaMemcpyDeviceToHost, stream), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_EQ(std::memcmp(*src, *back, bytes), 0);
  cudaStreamDestroy(stream);
  cudaFree(dev);
  FreePinned(*src, bytes, kind);
  FreePinned(*back, bytes, kind);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST_P(PinnedMemoryTest, ZeroBytesIsAnError) {
  StatusOr<void*> p = AllocatePinned(0, GetParam());
  EXPECT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("0 bytes"), std::string::npos) << p.status().ToString();
}

INSTANTIATE_TEST_SUITE_P(Kinds, PinnedMemoryTest, ::testing::Values(PinnedKind::kDriver, PinnedKind::kHugePages),
                         [](const ::testing::TestParamInfo<PinnedKind>& i) {
                           return i.param == PinnedKind::kDriver ? std::string("Driver") : std::string("HugePages");
                         });

}  // namespace
}  // namespace ef::runtime::cuda
