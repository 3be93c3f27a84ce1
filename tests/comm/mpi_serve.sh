#!/usr/bin/env bash
# `expertflow serve` under mpirun: rank 0 listens and runs the requests, rank 1 computes its share of
# every MoE layer's experts. Checks: greedy text equals single-process `generate`; idle periods
# longer than the peer timeout do not end the job (rank 0 keeps rank 1 alive); /metrics answers and
# shows rank 0's all-to-all bytes live (present, > 0, growing with the next request); SIGTERM to
# the ranks drains and every rank exits 0, with the all-to-all bytes reported.
# With BACKEND cuda (2 GPUs, NCCL exchange; exits 77, ctest's skip, with fewer GPUs) the reference
# is single-process `generate` on one GPU.
# Further arguments go to serve (e.g. a per-rank expert cache: --cache-device-budget "2 slots per
# layer"; the text must not change).
#   mpi_serve.sh BIN MODELS_DIR [BACKEND [SERVE ARGS...]]
BIN=$1 MODELS=$2 BACKEND=${3:-cpu}
shift 3 2>/dev/null || shift $#
source "$(dirname "$0")/common.sh"
if [ "$BACKEND" = cuda ]; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${gpus:-0}" -ge 2 ] || { echo "SKIP: 2 GPUs needed, ${gpus:-0} found"; exit 77; }
fi
m="$MODELS/tiny-code-moe"
# The background job opens serve.out itself, possibly after the first poll below reads it.
: >"$WORK/serve.out"
"${MPIRUN[@]}" -np 2 "$BIN" serve --backend "$BACKEND" --model "$m" --port 0 --timeout 2 "$@" >"$WORK/serve.out" 2>&1 &
job=$!
port=""
for _ in $(seq 1 600); do
  port=$(sed -n 's/^listening on [0-9.]*:\([0-9]*\)$/\1/p' "$WORK/serve.out" | head -1)
  [ -n "$port" ] && break
  kill -0 "$job" 2>/dev/null || { cat "$WORK/serve.out" >&2; fail "serve exited before listening"; }
  sleep 0.1
done
[ -n "$port" ] || { kill -9 "$job"; cat "$WORK/serve.out" >&2; fail "serve did not listen within 60 s"; }
complete() {  # prompt, tokens -> text
  curl -sf -X POST "http://127.0.0.1:$port/v1/completions" \
    -d "{\"model\": \"tiny-code-moe\", \"prompt\": \"$1\", \"max_tokens\": $2, \"temperature\": 0}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"], end="")'
}
metric() {  # exact series (name and labels) -> its value on /metrics, "" when absent
  curl -sf "http://127.0.0.1:$port/metrics" | awk -v s="$1" '$1 == s { print $2 }'
}
want=$("$BIN" generate --backend "$BACKEND" --model "$m" -p "def main(" -n 12 2>/dev/null)
got="def main($(complete "def main(" 12)"
[ "$got" = "$want" ] || { kill -9 "$job"; fail "2-rank serve text differs from generate: '$got' vs '$want'"; }
sent1=$(metric 'expertflow_a2a_bytes_total{direction="sent"}')
recv1=$(metric 'expertflow_a2a_bytes_total{direction="received"}')
[ -n "$sent1" ] && [ "$sent1" -gt 0 ] && [ -n "$recv1" ] && [ "$recv1" -gt 0 ] ||
  { kill -9 "$job"; fail "/metrics all-to-all bytes after a request: sent '$sent1', received '$recv1' (want > 0)"; }
[ "$(metric expertflow_cluster_ranks)" = 2 ] || { kill -9 "$job"; fail "/metrics expertflow_cluster_ranks is not 2"; }
[ "$(metric expertflow_a2a_exchanges_total)" -gt 0 ] 2>/dev/null ||
  { kill -9 "$job"; fail "/metrics expertflow_a2a_exchanges_total is not > 0"; }
[ -n "$(metric expertflow_peer_fetch_bytes_total)" ] || { kill -9 "$job"; fail "/metrics lacks the peer fetch bytes"; }
# Idle for longer than the 2 s peer timeout: rank 1 must still be there for the next request.
sleep 5
kill -0 "$job" 2>/dev/null || { cat "$WORK/serve.out" >&2; fail "the job ended while idle"; }
got2="def main($(complete "def main(" 12)"
[ "$got2" = "$want" ] || { kill -9 "$job"; cat "$WORK/serve.out" >&2; fail "after an idle period: '$got2'"; }
sent2=$(metric 'expertflow_a2a_bytes_total{direction="sent"}')
[ -n "$sent2" ] && [ "$sent2" -gt "$sent1" ] ||
  { kill -9 "$job"; fail "/metrics all-to-all sent bytes did not grow with a request: $sent1 -> '$sent2'"; }
echo "/metrics: rank 0 all-to-all sent $sent1 -> $sent2 bytes, received $recv1 bytes after the first request"
# The per-layer series add up to the totals (one scrape, so both come from the same moment).
body=$(curl -sf "http://127.0.0.1:$port/metrics")
for dir in sent received; do
  total=$(awk -v s="expertflow_a2a_bytes_total{direction=\"$dir\"}" '$1 == s { print $2 }' <<<"$body")
  layers=$(awk -v d="direction=\"$dir\"}" 'index($1, "expertflow_a2a_layer_bytes_total{") == 1 && index($1, d) {
    n++; s += $2 } END { print n + 0, s + 0 }' <<<"$body")
  [ "$layers" = "8 $total" ] ||
    { kill -9 "$job"; fail "/metrics per-layer $dir bytes (series, sum) '$layers' do not add up to the total $total"; }
done
echo "/metrics: the 8 per-layer all-to-all series add up to the totals"
# metric() reads the whole body (awk): `curl | grep -q` under pipefail failed whenever grep quit
# before curl had written everything (curl exits 23 on the broken pipe).
gen=$(metric expertflow_generated_tokens_total)
[ "$gen" = 24 ] || { kill -9 "$job"; fail "/metrics counts '$gen' generated tokens, not 24"; }
# SIGTERM to the ranks (as a service manager would): rank 0 drains and stops rank 1.
for stat in /proc/[0-9]*/stat; do
  read -r pid _ _ ppid _ <"$stat" 2>/dev/null || continue
  [ "$ppid" = "$job" ] && kill -TERM "$pid"
done
rc=0
wait "$job" || rc=$?
[ "$rc" = 0 ] || { cat "$WORK/serve.out" >&2; fail "mpirun exited $rc after SIGTERM"; }
grep -q "comm: 2 ranks, all-to-all [1-9][0-9]* bytes" "$WORK/serve.out" ||
  { cat "$WORK/serve.out" >&2; fail "no all-to-all bytes reported"; }
# With a per-rank expert cache, every rank reports its own cache's counters on the way out.
if [[ " $* " == *" --cache-device-budget "* ]]; then
  for r in 0 1; do
    grep -q "^rank $r: expert cache: " "$WORK/serve.out" ||
      { cat "$WORK/serve.out" >&2; fail "rank $r printed no expert cache counters"; }
  done
  echo "both ranks printed their expert cache counters"
fi
echo "PASS ($BACKEND): 2-rank serve = generate, survives idle periods, live all-to-all bytes on /metrics, drains on SIGTERM"
