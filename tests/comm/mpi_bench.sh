#!/usr/bin/env bash
# `expertflow bench` under mpirun: two real ranks serve their own requests (data-parallel
# attention) and exchange every MoE layer's tokens (expert parallelism). Checks that every
# request of both ranks completes, that hidden states really crossed ranks (all-to-all bytes
# counted), and that --assign locality, with the trace's routing as forecast, sends fewer bytes
# per token than round robin on the same requests; --assign-max-imbalance 1 splits them evenly.
#   mpi_bench.sh BIN MODELS_DIR TRACE
BIN=$1 MODELS=$2 TRACE=$3
source "$(dirname "$0")/common.sh"
[ -f "$TRACE" ] || fail "routing trace $TRACE not found (tests/data/traces)"
m="$MODELS/tiny-code-moe"
run() {  # assign, json, extra args...
  local assign=$1 out=$2
  shift 2
  "${MPIRUN[@]}" -np 2 "$BIN" bench --backend cpu --model "$m" --routing-trace "$TRACE" -n 6 -c 3 \
    --prompt-len 12 --gen-len 6 --assign "$assign" --json "$out" "$@" >"$out.out" 2>&1 ||
    { cat "$out.out" >&2; fail "bench --assign $assign $* exited non-zero"; }
}
run round_robin "$WORK/rr.json"
run locality "$WORK/loc.json"
run locality "$WORK/even.json" --assign-max-imbalance 1
python3 - "$WORK/rr.json" "$WORK/loc.json" "$WORK/even.json" <<'PY'
import json, sys
rr, loc, even = (json.load(open(p)) for p in sys.argv[1:4])
# A balance bound of 1: locality may not put more requests on one rank than the other.
assert [p["requests"] for p in even["per_rank"]] == [6, 6], even["per_rank"]
assert even["assign_max_imbalance"] == 1, even.get("assign_max_imbalance")
assert loc["assign_max_imbalance"] == 1.25 and rr["assign_max_imbalance"] is None
for name, j in (("round_robin", rr), ("locality", loc)):
    r = j["results"]
    assert j["ranks"] == 2, (name, j["ranks"])
    assert j["workload"]["num_requests"] == 12, name
    assert sum(p["requests"] for p in j["per_rank"]) == 12, (name, j["per_rank"])
    assert r["generated_tokens"] == 12 * 6, (name, r["generated_tokens"])
    assert r["a2a_bytes"] > 0, (name, "no hidden state crossed ranks")
    assert j["comm"]["world_size"] == 2, name
    print(f"{name}: per rank {[p['requests'] for p in j['per_rank']]} requests, "
          f"a2a {r['a2a_bytes_per_token']:.0f} B/token, {r['output_tokens_per_s']:.1f} tok/s")
assert [p["requests"] for p in rr["per_rank"]] == [6, 6], rr["per_rank"]
a, b = loc["results"]["a2a_bytes_per_token"], rr["results"]["a2a_bytes_per_token"]
assert a < b, f"locality sent {a:.0f} B/token, not fewer than round robin's {b:.0f}"
print(f"locality / round_robin a2a bytes per token: {a / b:.3f}")
PY
# A bad assignment name is refused before any rank starts work.
if "${MPIRUN[@]}" -np 2 "$BIN" bench --backend cpu --model "$m" --assign nearest -n 1 >"$WORK/bad.out" 2>&1; then
  fail "--assign nearest was accepted"
fi
grep -q "nearest" "$WORK/bad.out" || { cat "$WORK/bad.out" >&2; fail "the error does not name the bad value"; }
if "${MPIRUN[@]}" -np 2 "$BIN" bench --backend cpu --model "$m" --assign locality --assign-max-imbalance 0.5 \
  -n 1 >"$WORK/bad2.out" 2>&1; then
  fail "--assign-max-imbalance 0.5 was accepted"
fi
grep -q "assign-max-imbalance" "$WORK/bad2.out" || { cat "$WORK/bad2.out" >&2; fail "the error does not name the flag"; }
echo "PASS"
