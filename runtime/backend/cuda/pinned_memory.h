// Page-locked host memory, for buffers the GPU copies from at full PCIe rate and the host CPU also
// reads (the expert cache's host tier: cache.cpu_compute streams a missed expert from it).
//
// Two kinds:
// - kDriver: cudaHostAlloc. The driver backs it with 4 KiB pages.
// - kHugePages: anonymous memory on transparent huge pages (2 MiB, madvise), then registered with
//   the driver (cudaHostRegister). A host kernel that streams hundreds of MB walks 512x fewer
//   pages; the copy engine sees the same page-locked memory. Where the kernel gives no huge pages
//   (transparent_hugepage=never), the memory is still pinned, on 4 KiB pages.
// Which one the host tier takes: EF_PINNED_HUGE_PAGES. ef_host_expert_bench measures both against
// ordinary memory.
//
// Thread safety: the functions may be called from any thread.
#pragma once

#include <cstddef>
#include <string>

#include "runtime/core/status.h"

namespace ef::runtime::cuda {

enum class PinnedKind { kDriver, kHugePages };

// The kind EF_PINNED_HUGE_PAGES selects.
PinnedKind DefaultPinnedKind();
const char* PinnedKindName(PinnedKind kind);

// `bytes` of page-locked host memory (kHugePages: rounded up to whole huge pages). The error
// names the bytes and the driver's or the kernel's reason.
StatusOr<void*> AllocatePinned(size_t bytes, PinnedKind kind);
// What AllocatePinned(bytes, kind) pins: bytes, or (kHugePages) bytes rounded up to 2 MiB.
size_t PinnedBytes(size_t bytes, PinnedKind kind);
// Frees what AllocatePinned returned for the same bytes and kind.
void FreePinned(void* p, size_t bytes, PinnedKind kind);

// The kernel's transparent huge page setting ("always", "madvise", "never"; "" when unknown), for
// a benchmark's header.
std::string TransparentHugePages();

}  // namespace ef::runtime::cuda
