// The process-wide switches of the kernels: programmatic dependent launch (kernel_util.cuh,
// LaunchPdl) and the GEMV's rows per warp (gemv.cu).
#include <atomic>

#include "runtime/backend/cuda/cuda_kernels.h"

namespace ef::runtime::cuda {
namespace {
std::atomic<bool> g_pdl{true};
std::atomic<int> g_gemv_rows{kGemvRowsPerWarpDefault};
}  // namespace

void SetPdlEnabled(bool on) { g_pdl.store(on, std::memory_order_relaxed); }
bool PdlEnabled() { return g_pdl.load(std::memory_order_relaxed); }
void SetGemvRowsPerWarp(int rows) { g_gemv_rows.store(rows == 2 ? 2 : 1, std::memory_order_relaxed); }
int GemvRowsPerWarp() { return g_gemv_rows.load(std::memory_order_relaxed); }

}  // namespace ef::runtime::cuda
