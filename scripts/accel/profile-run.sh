#!/bin/bash
# On the accelerator machine: where a decode step's and a prefill step's device time goes.
# Runs ef_decode_bench under Nsight Systems when the machine has it (kernel by kernel: duration and
# the idle gap before each), else with its own --profile event marks; then, optionally, one
# `expertflow bench` workload end to end (its `# engine:` line splits a serving step's time).
#
#   scripts/accel/profile-run.sh [SHAPE] [e2e]        logs under $OUT (or ./out)
set -uo pipefail
SHAPE=${1:-mixtral-8x7b}
EF_BUILD_TESTS=ON source scripts/accel/build-full.sh ef_decode_bench expertflow >"${OUT:-out}/build_out.txt" 2>&1 ||
  { tail -30 "${OUT:-out}/build_out.txt"; exit 1; }
B=$BUILD/tests
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
echo "nsys: ${NSYS:-none}"
run_profiled() {  # name, bench args...
  local name=$1
  shift
  if [ -n "$NSYS" ]; then
    timeout 200 "$NSYS" profile --trace=cuda --sample=none --cpuctxsw=none -f true -o "$OUT/$name" \
      "$B"/ef_decode_bench --shape "$SHAPE" --no-breakdown "$@" >"$OUT/$name.txt" 2>&1
    grep -E "^decode|^prefill" "$OUT/$name.txt"
    timeout 120 "$NSYS" stats -q -r cuda_gpu_trace -f csv -o "$OUT/$name" "$OUT/$name.nsys-rep" >/dev/null 2>&1
    python3 scripts/accel/kernel_trace.py "$OUT/${name}_cuda_gpu_trace.csv" --window 90 | head -140
    rm -f "$OUT/$name.nsys-rep" "$OUT/$name.sqlite"
  else
    timeout 200 "$B"/ef_decode_bench --shape "$SHAPE" --no-breakdown --profile "$@" 2>&1 | tail -40
  fi
}
echo "== decode batch 1"
run_profiled dec1 --batches 1 --iters 5 --prefill 0
echo "== decode batch 64"
run_profiled dec64 --batches 64 --iters 5 --prefill 0
echo "== prefill 2048"
run_profiled pre2048 --batches 1 --iters 1 --prefill 2048
if [ "${2:-}" = e2e ]; then
  echo "== expertflow bench c64 (8 layers)"
  timeout 240 "$BUILD"/expertflow bench --backend cuda --synthetic "$SHAPE" --synthetic-layers 8 \
    --synthetic-dir "$PWD/.synthetic" -n 64 -c 64 --prompt-len 128 --gen-len 64 --max-batch 64 \
    --json "$OUT/expertflow_c64.json" >"$OUT/expertflow_c64.txt" 2>&1
  echo "rc=$?"
  grep -vE "^\[|^#  " "$OUT/expertflow_c64.txt" | tail -12
fi
