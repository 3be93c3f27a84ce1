// The process-wide switch of programmatic dependent launch (kernel_util.cuh, LaunchPdl).
#include <atomic>

#include "runtime/backend/cuda/cuda_kernels.h"

namespace ef::runtime::cuda {
namespace {
std::atomic<bool> g_pdl{true};
}  // namespace

void SetPdlEnabled(bool on) { g_pdl.store(on, std::memory_order_relaxed); }
bool PdlEnabled() { return g_pdl.load(std::memory_order_relaxed); }

}  // namespace ef::runtime::cuda
