#!/usr/bin/env bash
# A malformed or invalid YAML config under mpirun: every rank reports the key and line, every
# rank exits, mpirun exits non-zero.
#   mpi_bad_config.sh BIN
BIN=$1
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
echo "PASS"
