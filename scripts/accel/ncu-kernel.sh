#!/bin/bash
# On the accelerator machine: Nsight Compute's launch, occupancy, scheduler, warp-state and memory
# sections for one launch of the kernels matching REGEX in a decode step of ef_decode_bench (built
# by ncu-decode.sh or build-full.sh first). Clocks and caches are left alone.
#
#   scripts/accel/ncu-kernel.sh REGEX SHAPE BATCH      e.g. AttentionDecodeTc mixtral-8x7b 64
#   SKIP=41 scripts/accel/ncu-kernel.sh ...            the launch after the default 40th (e.g. the down GEMM after gate/up)
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build-gpu2}
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
timeout 200 "$NCU" --clock-control none --cache-control none -k "regex:$1" --launch-skip "${SKIP:-40}" --launch-count 1 \
  --section LaunchStats --section Occupancy --section SchedulerStats --section WarpStateStats \
  --section MemoryWorkloadAnalysis --section SpeedOfLight \
  "$BUILD"/tests/ef_decode_bench --shape "$2" --batches "$3" --iters 50 --prefill 0 --no-breakdown 2>&1 |
  grep -vE "^==PROF==|^decode|^#|^$" | grep -E "Duration|Throughput|Registers|Shared Memory|Block Limit|Occupancy|Waves|Warp Cycles|Eligible|Issued|No Eligible|Stall|DRAM|L1|L2|Active Warps|One or More|Dynamic|Driver" | head -60
