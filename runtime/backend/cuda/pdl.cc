// The process-wide switches of the kernels: programmatic dependent launch (kernel_util.cuh,
// LaunchPdl), the GEMV's rows per warp (gemv.cu) and the grouped MoE kernel's weight pipeline
// (moe_grouped.cu).
#include <atomic>

#include "runtime/backend/cuda/cuda_kernels.h"

namespace ef::runtime::cuda {
namespace {
std::atomic<bool> g_pdl{true};
std::atomic<int> g_gemv_rows{kGemvRowsPerWarpDefault};
std::atomic<bool> g_grouped_pipeline{kMoeGroupedPipelinedDefault};
}  // namespace

void SetPdlEnabled(bool on) { g_pdl.store(on, std::memory_order_relaxed); }
bool PdlEnabled() { return g_pdl.load(std::memory_order_relaxed); }
void SetGemvRowsPerWarp(int rows) { g_gemv_rows.store(rows == 2 ? 2 : 1, std::memory_order_relaxed); }
int GemvRowsPerWarp() { return g_gemv_rows.load(std::memory_order_relaxed); }
void SetMoeGroupedPipelined(bool on) { g_grouped_pipeline.store(on, std::memory_order_relaxed); }
bool MoeGroupedPipelined() { return g_grouped_pipeline.load(std::memory_order_relaxed); }

}  // namespace ef::runtime::cuda
