#include "runtime/backend/cuda/pinned_memory.h"

#include <cuda_runtime_api.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "runtime/core/params.h"

EF_PARAM(PinnedHugePages, bool, "EF_PINNED_HUGE_PAGES", false,
         "CUDA expert cache: pin the host tier on transparent huge pages (cudaHostRegister of 2 MiB-page memory) "
         "instead of cudaHostAlloc's 4 KiB pages");

namespace ef::runtime::cuda {

namespace {

constexpr size_t kHugePage = size_t{2} << 20;

size_t RoundUp(size_t bytes) { return (bytes + kHugePage - 1) / kHugePage * kHugePage; }

}  // namespace

PinnedKind DefaultPinnedKind() { return params::PinnedHugePages() ? PinnedKind::kHugePages : PinnedKind::kDriver; }

size_t PinnedBytes(size_t bytes, PinnedKind kind) { return kind == PinnedKind::kHugePages ? RoundUp(bytes) : bytes; }

const char* PinnedKindName(PinnedKind kind) {
  return kind == PinnedKind::kHugePages ? "pinned, huge pages" : "pinned (cudaHostAlloc)";
}

StatusOr<void*> AllocatePinned(size_t bytes, PinnedKind kind) {
  if (bytes == 0) return InvalidArgument("pinned memory: 0 bytes");
  if (kind == PinnedKind::kDriver) {
    void* p = nullptr;
    const cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocDefault);
    if (err != cudaSuccess) {
      cudaGetLastError();  // not sticky: clear it for the next call
      return ResourceExhausted("cudaHostAlloc of " + std::to_string(bytes) + " bytes: " + cudaGetErrorString(err));
    }
    return p;
  }
  // Over-allocate by one huge page so the buffer can start on a 2 MiB boundary, then give the
  // unaligned head and tail back: the kernel backs only aligned 2 MiB ranges with huge pages.
  const size_t size = RoundUp(bytes);
  void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED)
    return ResourceExhausted("mmap of " + std::to_string(size) + " bytes: " + std::strerror(errno));
  const auto base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = (base + kHugePage - 1) / kHugePage * kHugePage;
  if (start > base) munmap(raw, start - base);
  if (start + size < base + size + kHugePage) munmap(reinterpret_cast<void*>(start + size), base + kHugePage - start);
  void* p = reinterpret_cast<void*>(start);
  // Before the first touch: cudaHostRegister faults the pages in, on huge pages where the kernel
  // has them. (madvise fails only where THP is compiled out; the memory then stays on 4 KiB pages.)
  // Not inherited by a child process: a fork would split the pinned huge pages to copy them.
  madvise(p, size, MADV_HUGEPAGE);
  madvise(p, size, MADV_DONTFORK);
  const cudaError_t err = cudaHostRegister(p, size, cudaHostRegisterDefault);
  if (err != cudaSuccess) {
    cudaGetLastError();
    munmap(p, size);
    return ResourceExhausted("cudaHostRegister of " + std::to_string(size) + " bytes: " + cudaGetErrorString(err));
  }
  return p;
}

void FreePinned(void* p, size_t bytes, PinnedKind kind) {
  if (!p) return;
  if (kind == PinnedKind::kDriver) {
    cudaFreeHost(p);
    return;
  }
  cudaHostUnregister(p);
  munmap(p, RoundUp(bytes));
}

std::string TransparentHugePages() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  if (!std::getline(f, line)) return "";
  // "always [madvise] never": the bracketed one is in force.
  const size_t a = line.find('['), b = line.find(']');
  return a != std::string::npos && b != std::string::npos && b > a ? line.substr(a + 1, b - a - 1) : line;
}

}  // namespace ef::runtime::cuda
