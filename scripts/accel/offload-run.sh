#!/bin/bash
# On the accelerator machine, with GPU binaries built beforehand on a machine with the same CUDA
# (13.0) and carried: the GPU tests, then ef_offload_bench (lru / oracle / lookahead / path, copy
# queue on and off). Logs and JSON under $OUT (or ./out).
#
#   cmake -S . -B build-offload -G Ninja -DCMAKE_BUILD_TYPE=Release -DEF_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90
#   ninja -C build-offload gpu_tests ef_offload_bench
#   (run, carrying build-offload/tests/gpu_tests, build-offload/tests/ef_offload_bench and .deps/traces)
#   scripts/accel/offload-run.sh [SOURCE_DIR] [bench args...]
#
# The test binaries hold the absolute path of the test data of the checkout they were built in
# (SOURCE_DIR, default /work/main); when that path does not exist here it is linked to this copy.
# Each step has its own timeout so one slow step leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
SRC=${1:-/work/main}
shift || true
if [[ ! -e "$SRC/tests/data" ]]; then
  mkdir -p "$(dirname "$SRC")"
  ln -sfn "$PWD" "$SRC"
fi
BIN=${EF_BIN_DIR:-build-offload/tests}  # where the carried binaries are
{
  echo "# host $(hostname), $(date -u +%FT%TZ), git $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1
  free -g | head -2
} | tee "$OUT/env.txt"

# Every GPU test (ctest -L gpu runs the same binary twice: as is and with bf16 weights).
t0=$(date +%s)
timeout 240 "$BIN/gpu_tests" 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|tests ran" | tail -20
echo "gpu tests rc=${PIPESTATUS[0]} in $(($(date +%s) - t0)) s"
t0=$(date +%s)
EF_CUDA_BF16_WEIGHTS=1 timeout 120 "$BIN/gpu_tests" --gtest_filter='CudaReferenceBf16.*' 2>&1 |
  tee "$OUT/gpu_tests_bf16.log" | grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|tests ran" | tail -20
echo "gpu bf16 reference tests rc=${PIPESTATUS[0]} in $(($(date +%s) - t0)) s"

TRACE=.deps/traces/mixtral8x7b_gsm8k_decode.jsonl
t0=$(date +%s)
timeout 420 "$BIN/ef_offload_bench" --trace "$TRACE" --json "$OUT/offload_bench.json" "$@" 2>&1 |
  tee "$OUT/offload_bench.txt"
echo "offload bench rc=${PIPESTATUS[0]} in $(($(date +%s) - t0)) s"
