#!/bin/bash
# On the accelerator machine (one GPU): builds the GPU tests and ef_decode_bench, runs the GPU tests
# matching FILTER (gtest filter; "all" runs `ctest -L gpu`), then ef_decode_bench with --profile
# (device time per op kind of a prefill step) and the breakdown.
#
#   scripts/accel/decode-run.sh [FILTER] [BENCH ARGS...]      logs and JSON under $OUT (or ./out)
set -uo pipefail
FILTER=${1:-all}
shift || true
EF_BUILD_TESTS=ON source "$(dirname "$0")/build-full.sh" gpu_tests ef_decode_bench || exit 1
t0=$(date +%s)
if [ "$FILTER" = all ]; then
  (cd "$BUILD" && timeout 300 ctest -L gpu --timeout 240 --output-on-failure 2>&1 | grep -vE "^ *[0-9]+/[0-9]+ Test.*Passed" | tail -40)
elif [ "$FILTER" != none ]; then
  timeout 300 "$BUILD"/tests/gpu_tests --gtest_filter="$FILTER" 2>&1 | grep -E "^\[ low|OK|FAILED|Failure|error|Expected|Which|actual|PASSED|SKIPPED|test.cc" | head -60
fi
echo "gpu tests in $(($(date +%s) - t0)) s"
t0=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 200 "$BUILD"/tests/ef_decode_bench --profile --json "$OUT/decode_bench.json" "$@" 2>&1 |
  tee "$OUT/decode_bench.txt" | grep -vE "^  *[0-9]+ +[0-9]+ +[0-9]"
echo "decode bench rc=${PIPESTATUS[0]} in $(($(date +%s) - t0)) s"
