#!/bin/bash
# On the accelerator machine (one GPU): the grouped decode experts' k loop through registers
# (EF_CUDA_GROUPED_STAGES=0) against the shared-memory stages (4, 6). Builds ef_decode_bench and
# the GPU tests, runs the grouped-layer tests (the staged loops must give the register path's
# bits), then decode with CUDA graphs at batches 16 and 64, each setting in turn, ROUNDS times, on
# the Mixtral-8x7B and Qwen3-30B-A3B shapes. Everything lands in $OUT/stages.tgz.
#
#   scripts/accel/stages-run.sh [ROUNDS]      (default 2)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
ROUNDS=${1:-2}
LOGS=$OUT/stages
mkdir -p "$LOGS"
EF_BUILD_TESTS=ON source scripts/accel/build-full.sh ef_decode_bench gpu_tests || exit 1
timeout 240 "$BUILD"/tests/gpu_tests \
  --gtest_filter='CudaOpsTest.MoeGrouped*:CudaBackendTest.GroupedStages*:CudaReferenceBf16.DeviceRouted*' \
  >"$LOGS/tests.txt" 2>&1
echo "grouped tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|differ" "$LOGS/tests.txt" | head -20
for r in $(seq "$ROUNDS"); do
  for st in 0 4 6; do
    for shape in mixtral-8x7b qwen3-30b-a3b; do
      f=$LOGS/${shape%%-*}_st${st}_$r
      EF_CUDA_GROUPED_STAGES=$st timeout 120 "$BUILD"/tests/ef_decode_bench --shape "$shape" --batches 16,64 --iters 20 \
        --prefill 0 --no-breakdown --graphs --json "$f.json" >"$f.txt" 2>&1
      grep -E "^decode " "$f.txt" | awk -v t="${shape%%-*} st$st r$r" '{printf "%-18s %s\n", t, $0}'
    done
  done
done
tar czf "$OUT/stages.tgz" -C "$OUT" stages && rm -rf "$LOGS"
