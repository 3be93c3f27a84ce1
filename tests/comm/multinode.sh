#!/usr/bin/env bash
# Two nodes on one machine (scripts/cluster/netns.sh: network namespaces joined by veth pairs, MPI
# and UCX over TCP), 2 ranks each. Checks:
#   - `score` on every transformers fixture and tiny-code-moe equals one process (1e-5);
#   - a placement that computes experts away from their home rank moves bytes over UCX between
#     the nodes (tcp on eth0);
#   - `serve` on node 1 answers a completion equal to single-process `generate`;
#   - bad input, each an error naming the node/rank/key within seconds, never a hang: a hostfile
#     naming a node that does not exist or whose link is down; cluster.ranks_per_node that is not
#     how mpirun placed the ranks; UCX on a device the other node cannot reach; node 2's link going
#     down between the MPI and the UCX wire-up;
#   - node loss: every process of node 2 killed, or node 2's link taken down with a request in
#     flight: the request gets an error, every rank exits within 30 s and the lost ranks/node are
#     named.
# Exits 77 (ctest's skip) where network namespaces cannot be created (not root, no CAP_NET_ADMIN,
# a container without them), saying why.
#   multinode.sh BIN DATA_DIR MODELS_DIR
BIN=$1 DATA=$2 MODELS=$3
source "$(dirname "$0")/common.sh"
ROOT=$(cd "$HERE/../.." && pwd)
NETNS=$ROOT/scripts/cluster/netns.sh
# Our own node names, so a cluster a user brought up (efn1, efn2) is left alone.
export EF_NETNS_PREFIX=eft$$n
if ! why=$("$NETNS" check 2>&1); then
  echo "SKIP: network namespaces unavailable here: $why"
  exit 77
fi
trap '"$NETNS" down; rm -rf "$WORK"' EXIT
"$NETNS" up 2 >/dev/null
N1=${EF_NETNS_PREFIX}1 N2=${EF_NETNS_PREFIX}2
export EF_NETNS_RANKS_PER_NODE=2
XRUN=("$NETNS" mpirun -np 4 --bind-to none)
BIN=$(readlink -f "$BIN")

# score: 4 ranks on 2 nodes = one process.
for m in "$DATA/mixtral" "$DATA/mixtral_sharded" "$DATA/qwen2_moe" "$DATA/qwen3_moe" "$DATA/olmoe" "$DATA/deepseek_v2" \
  "$DATA/deepseek_v3" "$DATA/gpt_oss" "$MODELS/tiny-code-moe"; do
  name=$(basename "$m")
  m=$(readlink -f "$m")
  make_ids "$m" "$WORK/$name.ids.json"
  "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/$name.ids.json" --out "$WORK/$name.one.json" 2>/dev/null
  timeout 120 "${XRUN[@]}" "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/$name.ids.json" \
    --out "$WORK/$name.np.json" 2>"$WORK/$name.err" || { cat "$WORK/$name.err" >&2; fail "$name: score on 2 nodes"; }
  python3 "$HERE/compare_score.py" "$WORK/$name.one.json" "$WORK/$name.np.json" 1e-5 >/dev/null ||
    fail "$name: 2 nodes x 2 ranks differ from one process"
done
echo "score: 2 nodes x 2 ranks equal one process on 9 models"

# Peer fetch between the nodes: round-robin compute placement, experts fetched from home ranks.
m=$(readlink -f "$DATA/mixtral")
timeout 120 "${XRUN[@]}" "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/mixtral.ids.json" \
  --compute-placement round_robin --out "$WORK/rr.json" --comm-stats "$WORK/rr.stats.json" 2>"$WORK/rr.err" ||
  { cat "$WORK/rr.err" >&2; fail "peer fetch run failed"; }
python3 "$HERE/compare_score.py" "$WORK/mixtral.one.json" "$WORK/rr.json" 1e-5 >/dev/null || fail "peer fetch: differs"
python3 - "$WORK/rr.stats.json" <<'PY' || fail "peer fetch: no bytes over UCX between the nodes"
import json, sys
s = json.load(open(sys.argv[1]))
# Ranks 0, 1 are on node 1 and 2, 3 on node 2: bytes a rank of one node got from the other.
cross = 0
for me, r in enumerate(s["ranks"]):
    for peer, t in r.get("ucx_transports", {}).items():
        assert t.startswith("tcp/eth0"), (me, peer, t)
assert s["ucx_get_bytes"] > 0, s["ucx_get_bytes"]
print(f"peer fetch: {s['ucx_get_bytes']} bytes over UCX (tcp/eth0), "
      f"{sum(r['experts_fetched'] for r in s['ranks'])} experts fetched")
PY

# Bad input: each run must fail (not time out) within `bound` seconds, with `pattern` in its output.
bad_run() {  # label, bound, pattern, command...
  local label=$1 bound=$2 pattern=$3 rc=0 t0
  shift 3
  t0=$(date +%s)
  timeout 90 "$@" >"$WORK/bad.out" 2>&1 || rc=$?
  local took=$(($(date +%s) - t0))
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || { cat "$WORK/bad.out" >&2; fail "$label: exit $rc after $took s"; }
  [ "$took" -le "$bound" ] || { cat "$WORK/bad.out" >&2; fail "$label: took $took s (bound $bound s)"; }
  grep -Eq "$pattern" "$WORK/bad.out" || { cat "$WORK/bad.out" >&2; fail "$label: no /$pattern/"; }
  echo "$label: exit $rc after $took s: $(grep -Em1 "$pattern" "$WORK/bad.out" | cut -c1-220)"
}
SCORE=("$BIN" score --backend cpu --model "$m" --ids-file "$WORK/mixtral.ids.json" --out "$WORK/bad.json")
# A hostfile naming a node that does not exist.
printf '%s slots=2\n' "$N1" "$N2" "${EF_NETNS_PREFIX}3" >"$WORK/hosts.missing"
bad_run "hostfile: missing node" 20 "no node '${EF_NETNS_PREFIX}3'" \
  "$NETNS" mpirun --hostfile "$WORK/hosts.missing" -np 6 --bind-to none "${SCORE[@]}"
# A hostfile node whose link is down: refused when its daemon would start (netns.sh's rsh agent),
# where mpirun alone would wait forever for a daemon that cannot call back.
ip -n "$N2" link set eth0 down
bad_run "hostfile: node 2's link down" 20 "node '$N2' does not answer: its link is down" "${XRUN[@]}" "${SCORE[@]}"
ip -n "$N2" link set eth0 up
# cluster.ranks_per_node that is not how mpirun placed the ranks: every rank names the nodes' ranks.
bad_run "ranks_per_node 4 on 2 x 2" 20 \
  "cluster.ranks_per_node \(--ranks-per-node\): 4 ranks per node .* node $N1 has ranks 0, 1; node $N2 has ranks 2, 3; set ranks_per_node to 2 or auto" \
  "${XRUN[@]}" "${SCORE[@]}" --ranks-per-node 4
bad_run "ranks_per_node 2, ranks mapped by node" 20 "node $N1 has ranks 0, 2; node $N2 has ranks 1, 3" \
  "${XRUN[@]}" --map-by node "${SCORE[@]}" --ranks-per-node 2
# UCX on a device the other node cannot reach: the unreachable peer and the settings are named.
bad_run "UCX_NET_DEVICES=lo" 20 "rank [0-3] on node $N1 cannot reach rank [23] on node $N2 over ucx: .*UCX_NET_DEVICES=lo" \
  env UCX_NET_DEVICES=lo "${XRUN[@]}" "${SCORE[@]}" --compute-placement round_robin --timeout 5
# Node 2's link down after the MPI wire-up, before UCX's (every rank pauses 3 s between the two):
# node 1's ranks name node 2 within the 5 s timeout (no blocking TCP connect in ucp_ep_create).
: >"$WORK/bad.out"
t0=$(date +%s)
EF_DEBUG_UCX_WIREUP_PAUSE_S=3 timeout 90 "${XRUN[@]}" -x EF_DEBUG_UCX_WIREUP_PAUSE_S "${SCORE[@]}" \
  --compute-placement round_robin --timeout 5 >"$WORK/bad.out" 2>&1 &
job=$!
for _ in $(seq 1 300); do grep -q "pausing before ucx wire-up" "$WORK/bad.out" && break; sleep 0.1; done
"$NETNS" link "$N2" down
rc=0
wait "$job" || rc=$?
"$NETNS" link "$N2" up
took=$(($(date +%s) - t0))
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$took" -le 45 ] || { cat "$WORK/bad.out" >&2; fail "link down before ucx wire-up: exit $rc after $took s"; }
grep -Eq "^error: .*ranks? [23].* within 5 s .*on node $N2" "$WORK/bad.out" ||
  { cat "$WORK/bad.out" >&2; fail "link down before ucx wire-up: node 2 not named"; }
echo "link down before ucx wire-up: exit $rc after $took s: $(grep -Em1 "^error: .*on node $N2" "$WORK/bad.out")"
while [ -n "$(ip netns pids "$N1")$(ip netns pids "$N2")" ] && [ $(($(date +%s) - t0)) -le 60 ]; do sleep 0.2; done

# serve across the nodes: rank 0 listens on node 1.
start_serve() {  # extra serve args...
  : >"$WORK/serve.out"
  "${XRUN[@]}" "$BIN" serve --backend cpu --model "$(readlink -f "$MODELS/tiny-code-moe")" --port 0 "$@" \
    >"$WORK/serve.out" 2>&1 &
  job=$!
  port=""
  for _ in $(seq 1 600); do
    port=$(sed -n 's/^listening on [0-9.]*:\([0-9]*\)$/\1/p' "$WORK/serve.out" | head -1)
    [ -n "$port" ] && return 0
    kill -0 "$job" 2>/dev/null || { cat "$WORK/serve.out" >&2; fail "serve exited before listening"; }
    sleep 0.1
  done
  kill -9 "$job"
  fail "serve did not listen within 60 s"
}
complete() {  # prompt, tokens [, curl args] -> body (with " HTTP <code>" appended)
  "$NETNS" exec "$N1" curl -s -m 60 -w ' HTTP %{http_code}' -X POST "http://127.0.0.1:$port/v1/completions" \
    -d "{\"model\": \"tiny-code-moe\", \"prompt\": \"$1\", \"max_tokens\": $2, \"temperature\": 0}" || true
}
# Processes still running on the nodes (ranks, daemons, mpirun: all were started inside them).
node_pids() { ip netns pids "$N1"; ip netns pids "$N2"; }
# Waits for the job and every process on the nodes; prints the seconds since $1.
wait_all_exit() {  # start_epoch, label
  local t0=$1 label=$2
  while [ -n "$(node_pids)" ] && [ $(($(date +%s) - t0)) -le 45 ]; do sleep 0.1; done
  local left
  left=$(node_pids | wc -l)
  if [ "$left" -gt 0 ]; then
    for p in $(node_pids); do kill -9 "$p" 2>/dev/null || true; done
    cat "$WORK/serve.out" >&2
    fail "$label: $left processes still running after $(($(date +%s) - t0)) s"
  fi
  wait "$job" 2>/dev/null || true
  echo $(($(date +%s) - t0))
}

start_serve --timeout 5
want=$("$BIN" generate --backend cpu --model "$MODELS/tiny-code-moe" -p "def main(" -n 12 2>/dev/null)
got=$(complete "def main(" 12)
text=$(python3 -c 'import json,sys; b=sys.argv[1].rsplit(" HTTP ",1)[0]; print(json.loads(b)["choices"][0]["text"], end="")' "$got")
[ "def main($text" = "$want" ] || { kill -9 "$job"; fail "serve on 2 nodes: '$text' vs generate '$want'"; }
echo "serve: 2 nodes x 2 ranks answer as generate"

# Node loss 1: every process of node 2 killed.
t0=$(date +%s)
for p in $(ip netns pids "$N2"); do kill -9 "$p" 2>/dev/null || true; done
took=$(wait_all_exit "$t0" "node 2 killed")
[ "$took" -le 30 ] || fail "node 2 killed: the job took $took s to end"
grep -Eq "$N2|rank [23]|ranks 2, 3" "$WORK/serve.out" || { cat "$WORK/serve.out" >&2; fail "node 2 killed: not named"; }
echo "node 2 killed: every rank gone after $took s: $(grep -Em1 "$N2|rank [23]" "$WORK/serve.out")"

# Node loss 2: node 2's link down with a request in flight; mpirun cannot reach node 2's daemon, so
# the ranks' own deadlines (5 s here) must end them.
start_serve --timeout 5
complete "def main(" 400 >"$WORK/inflight" &
curl_job=$!
sleep 0.5
t0=$(date +%s)
"$NETNS" link "$N2" down
took=$(wait_all_exit "$t0" "node 2 partitioned")
wait "$curl_job" || true
"$NETNS" link "$N2" up
[ "$took" -le 30 ] || fail "node 2 partitioned: the job took $took s to end"
grep -q "HTTP 5" "$WORK/inflight" || { cat "$WORK/inflight" >&2; fail "partition: the in-flight request got no 5xx"; }
grep -Eq "ranks 2, 3 .*on node $N2|rank [23] .*on node $N2" "$WORK/serve.out" ||
  { cat "$WORK/serve.out" >&2; fail "partition: the lost node was not named"; }
echo "node 2 partitioned: in-flight request got $(grep -o 'HTTP [0-9]*' "$WORK/inflight"); every rank gone after" \
  "$took s: $(grep -Em1 "on node $N2" "$WORK/serve.out")"
echo "PASS"
