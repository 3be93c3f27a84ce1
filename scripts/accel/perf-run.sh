#!/bin/bash
# On a machine with >= 2 GPUs: build the full project (CUDA + MPI/UCX/NCCL comm, as nccl-check.sh
# does, against the carried packages of .deps/debs) with the GPU tests and benchmarks in
# build-perf-gpu, then run ef_decode_bench, ef_a2a_bench under mpirun -np NP and `ctest -L gpu`.
#
#   scripts/accel/perf-run.sh [NP]        logs and JSON under $OUT (or ./out)
#
# Each step has its own timeout so one slow step leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
NP=${1:-2}
BUILD=build-perf-gpu

# (1)-(3) Unpack the carried packages, build with the GPU tests and benchmarks (build-full.sh).
EF_BUILD_TESTS=ON source "$(dirname "$0")/build-full.sh" gpu_tests ef_decode_bench ef_a2a_bench || exit 1

# (4) Decode benchmark on GPU 0.
t0=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 150 $BUILD/tests/ef_decode_bench --json "$OUT/decode_bench.json" 2>&1 |
  tee "$OUT/decode_bench.txt"
echo "decode bench rc=${PIPESTATUS[0]} in $(($(date +%s) - t0)) s"

# (5) Exchange vs raw NCCL all-to-all.
t0=$(date +%s)
timeout 90 mpirun -np "$NP" -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH --oversubscribe \
  $BUILD/tests/ef_a2a_bench --json "$OUT/a2a_bench.json" 2>&1 | tee "$OUT/a2a_bench.txt"
echo "a2a bench rc=${PIPESTATUS[0]} in $(($(date +%s) - t0)) s"

# (6) GPU tests (ops vs CPU, CUDA backend, engine on CUDA vs fixtures).
t0=$(date +%s)
(cd $BUILD && timeout 200 ctest -L gpu --output-on-failure -j4 >"$OUT/ctest_gpu.log" 2>&1)
echo "ctest rc=$? in $(($(date +%s) - t0)) s"
grep -E "tests passed|tests failed|Failed|\*\*\*|Timeout" "$OUT/ctest_gpu.log" | tail -20
