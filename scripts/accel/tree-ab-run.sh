#!/bin/bash
# Side by side on the accelerator machine: ef_decode_bench built from this tree and from an older
# one, alternating in one run (machines of one kind differ by 5-15%: compare within a run).
#
#   scripts/accel/tree-ab-run.sh prepare REV     here: REV's files into build-old-src/ (carry it)
#   scripts/accel/tree-ab-run.sh run [ROUNDS] [BENCH ARGS...]   there: builds both, then ROUNDS
#       rounds of the VARIANTS (default: old, new); logs and JSON under $OUT (or ./out)
# GPU_TESTS: a gtest filter run first on the new tree (default: none).
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = prepare ]; then
  # Sources only: the model and the test data stay behind (the benchmark makes its own weights).
  rm -rf build-old-src && mkdir build-old-src && git archive "${2:?REV}" | tar -x -C build-old-src --exclude=models \
    --exclude=tests/data --exclude=docs
  echo "build-old-src: $(git rev-parse --short=12 "$2")"
  exit 0
fi
[ "${1:-}" = run ] || { echo "usage: $0 prepare REV | run [ROUNDS] [BENCH ARGS...]" >&2; exit 2; }
shift
ROUNDS=${1:-2}
shift || true
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
[ -d build-old-src ] || { echo "build-old-src/ missing: run '$0 prepare REV' here and carry it" >&2; exit 1; }
ln -sfn ../.deps build-old-src/.deps
(OUT=$OUT/old EF_BUILD_TESTS=ON source build-old-src/scripts/accel/build-full.sh ef_decode_bench >"$OUT/build_old.txt" 2>&1) ||
  { tail -30 "$OUT/build_old.txt"; exit 1; }
EF_BUILD_TESTS=ON source scripts/accel/build-full.sh ef_decode_bench $([ -n "${GPU_TESTS:-}" ] && echo gpu_tests) \
  >"$OUT/build_new.txt" 2>&1 || { tail -30 "$OUT/build_new.txt"; exit 1; }
OLD=build-old-src/$BUILD/tests/ef_decode_bench
NEW=$BUILD/tests/ef_decode_bench
if [ -n "${GPU_TESTS:-}" ]; then
  timeout 300 "$BUILD"/tests/gpu_tests --gtest_filter="$GPU_TESTS" >"$OUT/gpu_tests.txt" 2>&1
  echo "gpu tests rc=$?: $(grep -cE '^\[       OK' "$OUT/gpu_tests.txt") ok"
  grep -E "FAILED|Failure|Expected|Which|actual|PASSED|SKIPPED" "$OUT/gpu_tests.txt" | head -30
fi
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--batches 1,16,64 --iters 20 --prefill 0)
# VARIANTS: old or new, each optionally with bench flags after a colon, commas between flags.
VARIANTS=${VARIANTS:-old new}
for r in $(seq 1 "$ROUNDS"); do
  for v in $VARIANTS; do
    tree=${v%%:*} flags=()
    [[ $v == *:* ]] && IFS=, read -r -a flags <<<"${v#*:}"
    bin=$NEW
    [ "$tree" = old ] && bin=$OLD
    tag=$(echo "$v" | tr -c 'A-Za-z0-9_\n' '_')
    timeout 200 "$bin" --no-breakdown "${ARGS[@]}" "${flags[@]}" --json "$OUT/${tag}_r$r.json" >"$OUT/${tag}_r$r.txt" 2>&1
    echo "== round $r $v (rc=$?)"
    grep -E "^decode|^prefill" "$OUT/${tag}_r$r.txt"
  done
done
# BREAKDOWN=1: one more run of each tree with the per-op breakdown (its attention rows).
if [ -n "${BREAKDOWN:-}" ]; then
  for tree in old new; do
    bin=$NEW
    [ "$tree" = old ] && bin=$OLD
    timeout 200 "$bin" --batches 64 --iters 3 --prefill 0 >"$OUT/breakdown_$tree.txt" 2>&1
    echo "== breakdown $tree (rc=$?)"
    grep -E "attention decode|AttentionBatch" "$OUT/breakdown_$tree.txt"
  done
fi
