#!/usr/bin/env bash
# A malformed or invalid YAML config under mpirun: every rank reports the key and line, every
# rank exits, mpirun exits non-zero. Then a per-rank expert cache budget below the model's top-k.
#   mpi_bad_config.sh BIN MODELS_DIR
BIN=$1 MODELS=$2
source "$(dirname "$0")/common.sh"
check() {  # yaml text, expected message pattern
  printf '%s\n' "$1" >"$WORK/bad.yaml"
  local rc=0
  timeout 60 "${MPIRUN[@]}" -np 2 "$BIN" generate --config "$WORK/bad.yaml" >"$WORK/out" 2>&1 || rc=$?
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || { cat "$WORK/out" >&2; fail "exit $rc for: $1"; }
  local n
  n=$(grep -Ec "^error: .*bad.yaml:$2" "$WORK/out" || true)
  [ "$n" -eq 2 ] || { cat "$WORK/out" >&2; fail "expected the error from both ranks, got $n: /$2/"; }
  echo "ok ($n ranks): $(grep -Em1 "^error:" "$WORK/out")"
}
check $'model:\n  path: models/tiny-code-moe\ncluster:\n  exchnge: mpi' "4: unknown key 'cluster.exchnge'"
check $'cluster:\n  replication: two' "2: cluster.replication: expected an integer"
check $'runtime: {backend: cpu}\ncluster:\n  timeout_s: -1' "3: cluster.timeout_s: expected a number in"
check $'cluster:\n  exchange: [mpi' "3: malformed YAML"

# --cache-device-budget below the top-k of a top-2 model: every rank names the key, the budget and
# the top-k, and exits non-zero before the ranks connect, within seconds.
m="$MODELS/tiny-code-moe"
make_ids "$m" "$WORK/ids.json"
rc=0
start=$(date +%s)
timeout 60 "${MPIRUN[@]}" -np 2 "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/ids.json" \
  --out "$WORK/o.json" --cache-device-budget "1 slots per layer" >"$WORK/out" 2>&1 || rc=$?
took=$(($(date +%s) - start))
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || { cat "$WORK/out" >&2; fail "budget below top-k: exit $rc"; }
[ "$took" -le 30 ] || fail "budget below top-k: took $took s"
pattern="^error: rank [01] \(cache.device_budget is per rank\): cache.device_budget of 1 slots per layer .*"
pattern+="fewer than the model's top-k \(2\); the smallest budget is 16 slots"
n=$(grep -Ec "$pattern" "$WORK/out" || true)
[ "$n" -eq 2 ] || { cat "$WORK/out" >&2; fail "budget below top-k: expected the error from both ranks, got $n"; }
echo "ok ($n ranks, exit $rc after $took s): $(grep -Em1 "$pattern" "$WORK/out")"
echo "PASS"
