#!/bin/bash
# On the accelerator machine (one GPU): `expertflow bench` end to end on a synthetic Mixtral-8x7B
# shape with every expert resident (concurrency 1, 16, 64; TTFT of 2k-token prompts), or the
# transformers baseline of the same workloads (scripts/bench/hf_accelerate_baseline.py, random
# weights of the shape, everything on the GPU). Optionally `ctest -L gpu` first.
#
#   scripts/accel/e2e-run.sh expertflow [LAYERS] [ctest]     logs and JSON under $OUT (or ./out)
#   scripts/accel/e2e-run.sh hf [LAYERS]
#
# LAYERS (default 8): the synthetic weights are generated in host memory (--synthetic-in-memory), of
# which DISTINCT (default 2) layers distinct; every layer is uploaded as its own (2.9 GB a layer).
# EXTRA: more `expertflow bench` flags (e.g. "--temperature 0.8 --top-p 0.95"); WORKLOADS_ONLY:
# names of the workloads to run (default all).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
WHO=${1:-expertflow}
LAYERS=${2:-8}
DISTINCT=${DISTINCT:-2}
EXTRA=${EXTRA:-}
WORKLOADS_ONLY=${WORKLOADS_ONLY:-}
# name concurrency requests prompt gen
WORKLOADS=("c1 1 4 128 64" "c16 16 32 128 64" "c64 64 64 128 64" "ttft2k 1 4 2048 4")
if [ "$WHO" = hf ]; then
  for w in "${WORKLOADS[@]}"; do
    read -r name c n p g <<<"$w"
    [ -n "$WORKLOADS_ONLY" ] && [[ " $WORKLOADS_ONLY " != *" $name "* ]] && continue
    echo "== hf $name"
    timeout 280 python3 scripts/bench/hf_accelerate_baseline.py --shape mixtral-8x7b --layers "$LAYERS" --budget-pct 100 \
      -n "$n" -c "$c" --prompt-len "$p" --gen-len "$g" --json "$OUT/hf_$name.json" 2>&1 | grep -vE "^\s*$|Warning|warn" | tail -4
  done
  exit 0
fi
EF_BUILD_TESTS=$([ "${3:-}" = ctest ] && echo ON || echo OFF) source scripts/accel/build-full.sh expertflow $([ "${3:-}" = ctest ] && echo gpu_tests) >"$OUT/build_out.txt" 2>&1 ||
  { tail -30 "$OUT/build_out.txt"; exit 1; }
if [ "${3:-}" = ctest ]; then
  t0=$(date +%s)
  (cd "$BUILD" && timeout 300 ctest -L gpu --timeout 240 --output-on-failure >"$OUT/ctest_gpu.log" 2>&1)
  echo "ctest rc=$? in $(($(date +%s) - t0)) s"
  grep -E "tests passed|tests failed|Failed|\*\*\*|Timeout|Skipped" "$OUT/ctest_gpu.log" | tail -12
fi
for w in "${WORKLOADS[@]}"; do
  read -r name c n p g <<<"$w"
  [ -n "$WORKLOADS_ONLY" ] && [[ " $WORKLOADS_ONLY " != *" $name "* ]] && continue
  echo "== expertflow $name"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout 200 "$BUILD"/expertflow bench --backend cuda --synthetic mixtral-8x7b --synthetic-layers "$LAYERS" \
    --synthetic-in-memory --synthetic-distinct-layers "$DISTINCT" --synthetic-dir "$PWD/.synthetic" \
    -n "$n" -c "$c" --prompt-len "$p" --gen-len "$g" --max-batch 64 $EXTRA \
    --json "$OUT/expertflow_$name.json" >"$OUT/expertflow_$name.txt" 2>&1
  echo "rc=$? in $(($(date +%s) - t0)) s"
  grep -vE "^\[|^#  " "$OUT/expertflow_$name.txt" | tail -3
  # One summary line per workload (the lines above all start with '#').
  python3 - "$OUT/expertflow_$name.json" "$name" <<'PY' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))["results"]
print("%s: out_tok/s %.1f ttft_p50_ms %.1f itl_p50_ms %.2f" % (sys.argv[2], r["output_tokens_per_s"], r["ttft_ms_p50"], r["itl_ms_p50"]))
PY
done
# The logs and JSON as one archive under $OUT.
(cd "$OUT" && shopt -s nullglob && f=(expertflow_* hf_*) && [ ${#f[@]} -gt 0 ] && tar czf e2e.tgz "${f[@]}" && rm -f "${f[@]}")
