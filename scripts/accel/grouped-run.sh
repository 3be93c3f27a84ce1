#!/bin/bash
# On the accelerator machine: the grouped MoE tests, then ef_decode_bench with the routing on the
# device and on the host, side by side, for both shapes.
#
#   scripts/accel/grouped-run.sh [quick]     quick: the op test and the benches only
set -o pipefail
EF_BUILD_TESTS=ON source scripts/accel/build-full.sh gpu_tests ef_decode_bench > $OUT/build_out.txt 2>&1 || { tail -30 $OUT/build_out.txt; exit 1; }
B=build-gpu2/tests
timeout 120 $B/gpu_tests --gtest_filter='CudaOpsTest.Moe*' 2>&1 | grep -E "OK|FAILED|Failure|Expected|Which|actual|error|rel|Nmse|case|T[0-9]" | head -40
if [ "${1:-}" != quick ]; then
  EF_CUDA_BF16_WEIGHTS=1 timeout 200 $B/gpu_tests --gtest_filter='CudaReferenceBf16.*' 2>&1 | grep -E "OK|FAILED|Failure|agree|Expected|Which|fam|step|top-1" | head -30
fi
for sh in mixtral-8x7b qwen3-30b-a3b; do
  for hr in "" "--host-routing"; do
    echo "== $sh $hr"
    timeout 150 $B/ef_decode_bench --shape $sh --batches 1,4,16,32,64 --iters 20 $hr --json $OUT/bench_${sh}${hr}.json 2>&1 | grep -E "^decode|^prefill|error|Error"
  done
done
