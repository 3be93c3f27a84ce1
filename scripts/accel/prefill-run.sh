#!/bin/bash
# On the accelerator machine: prefill through Backend::ExpertMlps (experts on side streams, 16-bit
# products) against one expert at a time, side by side in one run; the op tests first.
#
#   scripts/accel/prefill-run.sh [tests|bench|all]     logs under $OUT (or ./out)
set -uo pipefail
MODE=${1:-all}
EF_BUILD_TESTS=ON source scripts/accel/build-full.sh gpu_tests ef_decode_bench >"${OUT:-out}/build_out.txt" 2>&1 ||
  { tail -30 "${OUT:-out}/build_out.txt"; exit 1; }
B=$BUILD/tests
if [ "$MODE" != bench ]; then
  timeout 200 "$B"/gpu_tests --gtest_filter='CudaOpsTest.*' --gtest_brief=1 2>&1 | tail -25
fi
[ "$MODE" = tests ] && exit 0
for sh in mixtral-8x7b qwen3-30b-a3b; do
  for st in 0 4 8; do
    echo "== $sh prefill, --expert-streams $st"
    timeout 150 "$B"/ef_decode_bench --shape "$sh" --batches 1 --iters 3 --prefill 2048 --prefill-iters 10 \
      --expert-streams "$st" --no-breakdown --profile --json "$OUT/prefill_${sh}_s$st.json" 2>&1 |
      grep -E "^prefill|profiled step|expert mlps|gather|scatter|^total|error|Error"
  done
done
