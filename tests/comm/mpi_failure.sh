#!/usr/bin/env bash
# Failure behaviour under mpirun: a rank that dies or stalls mid-run makes the others exit
# non-zero with a message naming it, within 30 s, never a hang (also with per-rank expert caches
# fetching experts from the ranks).
#   mpi_failure.sh BIN MODELS_DIR
BIN=$1 MODELS=$2
source "$(dirname "$0")/common.sh"
m="$MODELS/tiny-code-moe"
make_ids "$m" "$WORK/ids.json"

expect_failure() {  # label, pattern, command...
  local label=$1 pattern=$2
  shift 2
  local start end rc=0
  start=$(date +%s)
  timeout 60 "$@" >"$WORK/out" 2>&1 || rc=$?
  end=$(date +%s)
  # With --enable-recovery mpirun's own status does not reflect its ranks' (they MPI_Abort).
  [ "$rc" -ne 0 ] || [ -n "${RECOVERY:-}" ] || { cat "$WORK/out" >&2; fail "$label: exited 0"; }
  [ "$rc" -ne 124 ] || { cat "$WORK/out" >&2; fail "$label: hung (killed by timeout 60)"; }
  [ $((end - start)) -le 30 ] || fail "$label: took $((end - start)) s (> 30 s)"
  grep -Eq "$pattern" "$WORK/out" || { cat "$WORK/out" >&2; fail "$label: no message matching /$pattern/"; }
  echo "$label: exit $rc after $((end - start)) s: $(grep -Em1 "$pattern" "$WORK/out")"
}

# Rank 1 is killed (SIGKILL) on reaching layer 1's exchange of its first step. By default mpirun
# itself notices and ends the job, naming the rank.
expect_failure "rank killed" "process rank 1 .*signal 9" \
  "${MPIRUN[@]}" -np 3 -x EF_DEBUG_FAULT_RANK=1 -x EF_DEBUG_DIE_AT_LAYER=1 \
  "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/ids.json" --out "$WORK/o.json" --timeout 10
# With --enable-recovery mpirun lets the survivors run on: their own deadline must fire, and each
# names the dead rank before MPI_Abort ends the job.
RECOVERY=1 expect_failure "rank killed, survivors detect it" \
  "rank 1 did not complete the layer 1 token counts within 4 s \(seen from rank 0" \
  "${MPIRUN[@]}" --enable-recovery -np 3 -x EF_DEBUG_FAULT_RANK=1 -x EF_DEBUG_DIE_AT_LAYER=1 \
  "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/ids.json" --out "$WORK/o.json" --timeout 4

# The same with a per-rank expert cache of 2 slots per MoE layer and experts computed away from
# their homes: the ranks fetch experts from each other's host shards (UCX) in the layers before
# the kill and hold endpoints to rank 1 when it dies. First, without the kill: peer fetches do
# happen in this configuration.
CACHED=(--cache-device-budget "2 slots per layer" --compute-placement round_robin)
"${MPIRUN[@]}" -np 3 "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/ids.json" --out "$WORK/o.json" \
  "${CACHED[@]}" --comm-stats "$WORK/cached.stats.json" >"$WORK/out" 2>&1 ||
  { cat "$WORK/out" >&2; fail "score with per-rank caches failed"; }
python3 - "$WORK/cached.stats.json" <<'PY' || fail "per-rank caches: no expert was fetched from a peer"
import json, sys
ranks = json.load(open(sys.argv[1]))["ranks"]
peer = [r["expert_cache"]["peer_loads"] for r in ranks]
assert sum(peer) > 0, peer
print(f"per-rank caches: peer loads per rank {peer}")
PY
RECOVERY=1 expect_failure "rank killed while the ranks fetch experts from each other" \
  "rank 1 did not complete the layer 4 token counts within 4 s \(seen from rank [02]" \
  "${MPIRUN[@]}" --enable-recovery -np 3 -x EF_DEBUG_FAULT_RANK=1 -x EF_DEBUG_DIE_AT_LAYER=4 \
  "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/ids.json" --out "$WORK/o.json" --timeout 4 \
  "${CACHED[@]}"

# Rank 2 stops responding; the others give up after cluster.timeout_s and name it.
cat >"$WORK/stall.yaml" <<'YAML'
model: {path: PLACEHOLDER}
runtime: {backend: cpu}
cluster: {timeout_s: 3}
YAML
sed -i "s|PLACEHOLDER|$m|" "$WORK/stall.yaml"
expect_failure "rank stalled" "rank 2 did not complete .* within 3 s" \
  "${MPIRUN[@]}" -np 3 -x EF_DEBUG_FAULT_RANK=2 -x EF_DEBUG_STALL_AT_LAYER=2 \
  "$BIN" generate --config "$WORK/stall.yaml" -n 4

# A rank killed from outside (kill -9) while the others run: they must not hang.
"${MPIRUN[@]}" -np 2 -x EF_DEBUG_FAULT_RANK=1 -x EF_DEBUG_STALL_AT_LAYER=3 \
  "$BIN" generate --backend cpu --model "$m" -n 4 --timeout 20 >"$WORK/out" 2>&1 &
mpirun_pid=$!
start=$(date +%s)
victim=""
for _ in $(seq 1 100); do
  grep -q "stalling" "$WORK/out" 2>/dev/null && victim=$(pgrep -P "$mpirun_pid" | tail -1) && [ -n "$victim" ] && break
  sleep 0.1
done
[ -n "$victim" ] || fail "kill -9: could not find the stalled rank"
kill -9 "$victim"
rc=0
wait "$mpirun_pid" || rc=$?
end=$(date +%s)
[ "$rc" -ne 0 ] || fail "kill -9: exited 0"
[ $((end - start)) -le 30 ] || fail "kill -9: took $((end - start)) s"
grep -Eq "process rank 1 .*signal 9" "$WORK/out" || { cat "$WORK/out" >&2; fail "kill -9: no message naming rank 1"; }
echo "kill -9: exit $rc after $((end - start)) s: $(grep -Em1 "process rank 1" "$WORK/out")"
# Ranks started with different settings (here rank 1's --placement): every rank refuses to start,
# naming the key and both values, instead of computing on two placements.
expect_failure "ranks with different settings" \
  "rank 1 was started with other settings than rank 0: cluster.placement is round_robin there and contiguous" \
  "${MPIRUN[@]}" -np 1 "$BIN" generate --backend cpu --model "$m" -n 2 : \
  -np 1 "$BIN" generate --backend cpu --model "$m" -n 2 --placement round_robin
echo "PASS"
