#!/bin/bash
# On the accelerator machine (one GPU): the issue-15 target table in one run. Builds expertflow and
# ef_decode_bench, runs the decode/prefill bench ROUNDS times alternating the fp32 and bf16 KV
# cache, then `expertflow bench` end to end on LAYERS layers of the Mixtral-8x7B shape for the
# workloads in WORKLOADS_ONLY (see e2e-run.sh). Everything lands in $OUT/targets.tgz.
#
#   scripts/accel/targets-run.sh [ROUNDS] [LAYERS]      (defaults 2, 32; LAYERS 0 skips end to end)
#   E2E_AGAIN="c64" EXTRA_AGAIN="--kv-cache-dtype fp32" SPLITS="4 3 0" QWEN=1 scripts/accel/targets-run.sh
#   CTEST=1 QWEN=1 scripts/accel/targets-run.sh 2 0     # the GPU tests, then the decode/prefill table
#   TWINS_AB=1 scripts/accel/targets-run.sh 1 0           # and the bf16 twins on/off side by side
# Each round also times decode as the engine runs it by default (--step: step ops; --graphs: and CUDA graphs).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
ROUNDS=${1:-2}
LAYERS=${2:-32}
export WORKLOADS_ONLY=${WORKLOADS_ONLY:-c64 ttft2k}
LOGS=$OUT/targets
mkdir -p "$LOGS"
EF_BUILD_TESTS=ON source scripts/accel/build-full.sh ef_decode_bench ${CTEST:+gpu_tests} || exit 1
# CTEST=1: the whole GPU suite first (~130 s on an H100), its log in the archive.
if [ -n "${CTEST:-}" ]; then
  t0=$(date +%s)
  (cd "$BUILD" && timeout 300 ctest -L gpu --timeout 240 --output-on-failure >"$LOGS/ctest_gpu.log" 2>&1)
  echo "ctest -L gpu rc=$? in $(($(date +%s) - t0)) s"
  grep -E "tests passed|tests failed|\(Failed\)|Timeout" "$LOGS/ctest_gpu.log" | tail -12
fi
# The GPU's clocks, power, temperature and throttle reasons every 0.5 s for the whole run, to tell
# a slower phase's clocks from its code (prefill after a long decode phase, issue 15).
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,temperature.memory,clocks_throttle_reasons.active \
  --format=csv -lms 500 >"$LOGS/smi.csv" 2>&1 &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT
stamp() { echo "# $(date +%H:%M:%S.%N | cut -c1-12) $*" >>"$LOGS/phases.txt"; }
summary() {  # the table rows of one bench output
  grep -E "^(decode|prefill) " "$1" | awk -v t="$2" '{printf "%-14s %s\n", t, $0}'
}
# Prefill alone in its own process first (the rows below prefill after the decode phases).
stamp prefill alone
timeout 120 "$BUILD"/tests/ef_decode_bench --batches "" --prefill 2048 --prefill-iters 7 --no-breakdown \
  --json "$LOGS/prefill_alone.json" >"$LOGS/prefill_alone.txt" 2>&1
summary "$LOGS/prefill_alone.txt" "prefill alone"
for r in $(seq "$ROUNDS"); do
  for kv in fp32 bf16; do
    flag=--kv-$kv
    stamp "decode kv $kv round $r"
    # shellcheck disable=SC2086
    timeout 240 "$BUILD"/tests/ef_decode_bench --batches 1,16,64 --iters 20 --prefill 2048 --prefill-iters 5 \
      --no-breakdown $flag --json "$LOGS/decode_${kv}_$r.json" >"$LOGS/decode_${kv}_$r.txt" 2>&1
    summary "$LOGS/decode_${kv}_$r.txt" "kv $kv r$r"
  done
  # The engine's default decode path: the step ops on a paged bf16 cache (--step), and each batch a
  # CUDA graph as well (--graphs).
  for m in step graphs; do
    stamp "decode $m round $r"
    timeout 240 "$BUILD"/tests/ef_decode_bench --batches 1,16,64 --iters 20 --prefill 0 --no-breakdown --$m \
      --json "$LOGS/decode_${m}_$r.json" >"$LOGS/decode_${m}_$r.txt" 2>&1
    summary "$LOGS/decode_${m}_$r.txt" "$m r$r"
    grep -E "^ef_decode_bench:|^# decode batch" "$LOGS/decode_${m}_$r.txt"
  done
done
# TWINS_AB=1: the bf16 twins on and off (--no-twins), alternating, twice: decode batches 16 and 64
# (the rows past the GEMV) and prefill 2048.
if [ -n "${TWINS_AB:-}" ]; then
  for r in 1 2; do
    for t in on off; do
      stamp "twins $t round $r"
      timeout 120 "$BUILD"/tests/ef_decode_bench --batches 16,64 --iters 20 --prefill 2048 --prefill-iters 7 \
        --no-breakdown $([ $t = off ] && echo --no-twins) >"$LOGS/twins_${t}_$r.txt" 2>&1
      summary "$LOGS/twins_${t}_$r.txt" "twins $t r$r"
    done
  done
fi
# SPLITS: decode attention's EF_CUDA_DECODE_BLOCKS_PER_SM values to compare (e.g. "4 3 0"), with
# the per-op breakdown (its AttentionBatch rows time the kernel alone).
for v in ${SPLITS:-}; do
  EF_CUDA_DECODE_BLOCKS_PER_SM=$v timeout 120 "$BUILD"/tests/ef_decode_bench --batches 1,16,64 --iters 10 --prefill 0 \
    >"$LOGS/splits_$v.txt" 2>&1
  grep -E "^decode |AttentionBatch x" "$LOGS/splits_$v.txt" | awk -v t="blocks/SM $v" '{printf "%-12s %s\n", t, $0}'
done
# QWEN=1: the Qwen3-30B-A3B-shaped row (decode batches 1 and 64, prefill 2048), the default KV cache,
# then its prefill with the grouped expert GEMMs off (EF_CUDA_GROUPED_EXPERTS=0) and on again.
if [ -n "${QWEN:-}" ]; then
  timeout 200 "$BUILD"/tests/ef_decode_bench --shape qwen3-30b-a3b --batches 1,64 --iters 20 --prefill 2048 \
    --prefill-iters 5 --no-breakdown --json "$LOGS/qwen3.json" >"$LOGS/qwen3.txt" 2>&1
  summary "$LOGS/qwen3.txt" "qwen3"
  timeout 120 "$BUILD"/tests/ef_decode_bench --shape qwen3-30b-a3b --batches 1,64 --iters 20 --prefill 0 \
    --no-breakdown --graphs --json "$LOGS/qwen3_graphs.json" >"$LOGS/qwen3_graphs.txt" 2>&1
  summary "$LOGS/qwen3_graphs.txt" "qwen3 graphs"
  grep -E "^ef_decode_bench:|^# decode batch" "$LOGS/qwen3_graphs.txt"
  for g in 0 -1; do
    EF_CUDA_GROUPED_EXPERTS=$g timeout 60 "$BUILD"/tests/ef_decode_bench --shape qwen3-30b-a3b --batches "" \
      --prefill 2048 --prefill-iters 7 --no-breakdown >"$LOGS/qwen3_grouped$g.txt" 2>&1
    summary "$LOGS/qwen3_grouped$g.txt" "qwen3 g$g"
  done
fi
quiet() { grep -vE "^build ok|^# host|^NVIDIA|^Cuda|^mpirun|^[0-9]+$|Mem:|total|/dev"; }
if [ "$LAYERS" -gt 0 ]; then
  OUT=$LOGS bash scripts/accel/e2e-run.sh expertflow "$LAYERS" 2>&1 | quiet
  # E2E_AGAIN: workloads run again with EXTRA_AGAIN's flags (e.g. the other KV cache dtype).
  if [ -n "${E2E_AGAIN:-}" ]; then
    mkdir -p "$LOGS/again"
    echo "== again ($EXTRA_AGAIN)"
    OUT=$LOGS/again WORKLOADS_ONLY=$E2E_AGAIN EXTRA=$EXTRA_AGAIN bash scripts/accel/e2e-run.sh expertflow "$LAYERS" 2>&1 | quiet
  fi
fi
kill $SMI 2>/dev/null
(cd "$OUT" && tar czf targets.tgz targets && rm -rf targets)
