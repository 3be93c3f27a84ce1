#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, clang, ASan + UBSan, CPU only) in build-fuzz/ and runs
# each for N seconds (default 30), FUZZ_JOBS at a time (default: the number of cores). Fails when
# any target reports a crash, a leak, undefined behaviour, a timeout or an out-of-memory.
#
#   bash scripts/fuzz.sh 30                    # every target, 30 s each
#   FUZZ_TARGETS="tokenizer api_request" bash scripts/fuzz.sh 600
#   FUZZ_RUNS=1000000 bash scripts/fuzz.sh 600   # stop a target at 10^6 executions or 600 s
#
# Seeds come from tests/fuzz/corpus/<target>/ (read only); inputs libFuzzer finds go to
# build-fuzz/corpus/<target>/, crashing inputs to build-fuzz/artifacts/. A crash becomes a
# regression input: copy it into tests/fuzz/corpus/<target>/ with the fix.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
BUILD_DIR=${BUILD_DIR:-build-fuzz}
jobs=${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 2)}
all_targets="safetensors checkpoint_index model_config tokenizer routing_trace predictor_file cluster_config
             chat_template api_request"
targets=${FUZZ_TARGETS:-$all_targets}

if ! command -v clang++ >/dev/null; then
  echo "fuzz.sh: clang++ not found (scripts/install-deps.sh installs clang and libFuzzer)" >&2
  exit 1
fi
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
CC=clang CXX=clang++ cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEF_CUDA=OFF \
  -DEF_FUZZ=ON -DEF_BUILD_TESTS=OFF "${launcher[@]}" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc 2>/dev/null || echo 2)" --target fuzz_targets

# A dictionary per target where one helps; the rest share the JSON one.
dict_of() {
  case $1 in
    tokenizer | checkpoint_index) echo tests/fuzz/dict/json.dict ;;
    cluster_config) echo tests/fuzz/dict/yaml.dict ;;
    *) echo "tests/fuzz/dict/$1.dict" ;;
  esac
}

# Leaks, UB and invariant failures all stop the run with a non-zero status.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
mkdir -p "$BUILD_DIR/artifacts" "$BUILD_DIR/logs"
run_one() {
  local t=$1
  local rc=0
  mkdir -p "$BUILD_DIR/corpus/$t"
  "$BUILD_DIR/tests/fuzz/${t}_fuzzer" -max_total_time="$seconds" -runs="${FUZZ_RUNS:--1}" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -dict="$(dict_of "$t")" -artifact_prefix="$BUILD_DIR/artifacts/$t-" \
    "$BUILD_DIR/corpus/$t" "tests/fuzz/corpus/$t" >"$BUILD_DIR/logs/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$BUILD_DIR/logs/$t.rc"
}

status=0
running=0
for t in $targets; do
  rm -f "$BUILD_DIR/logs/$t.rc"
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done

printf '# fuzz.sh: %s s per target, git %s\n' "$seconds" "$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
printf '%-18s %12s %8s %8s %8s %8s  %s\n' target runs exec/s cov ft corpus result
wait
for t in $targets; do
  rc=$(cat "$BUILD_DIR/logs/$t.rc" 2>/dev/null || echo 1)
  log="$BUILD_DIR/logs/$t.log"
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
  ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
  corp=$(grep -oE 'corp: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
  result=ok
  if [ "$rc" -ne 0 ]; then
    result="FAILED (exit $rc; $log)"
    status=1
  fi
  printf '%-18s %12s %8s %8s %8s %8s  %s\n' "$t" "${runs:--}" "${eps:--}" "${cov:--}" "${ft:--}" "${corp:--}" "$result"
done
if [ "$status" -ne 0 ]; then
  for t in $targets; do
    log="$BUILD_DIR/logs/$t.log"
    if grep -qE 'ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)|runtime error:|fuzz invariant failed' "$log"; then
      echo "=== $t ($log) ==="
      grep -E -A30 'ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)|runtime error:|fuzz invariant failed' "$log" | head -40 | cut -c1-240
    fi
  done
  echo "fuzz.sh: a target failed; the crashing inputs are in $BUILD_DIR/artifacts/" >&2
fi
exit "$status"
