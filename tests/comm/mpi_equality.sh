#!/usr/bin/env bash
# Under `mpirun -np NP`, `expertflow score` gives the same logits (1e-5) and router top-k as one
# process on every fixture and tiny-code-moe, and `generate` the same tokens. With NP > 1 it also
# runs a placement whose compute ranks differ from the home ranks, so experts are fetched from
# peers over UCX (bytes counted, asserted > 0); with NP = 4 that run uses ranks_per_node: 1, which
# must force UCX over TCP, and returns results summed per rank (cluster.combine summed).
#   mpi_equality.sh BIN NP DATA_DIR MODELS_DIR
BIN=$1 NP=$2 DATA=$3 MODELS=$4
source "$(dirname "$0")/common.sh"
read -ra models <<<"$(fixture_models "$DATA" "$MODELS")"
for m in "${models[@]}"; do
  name=$(basename "$m")
  make_ids "$m" "$WORK/$name.ids.json"
  "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/$name.ids.json" --out "$WORK/$name.one.json"
  "${MPIRUN[@]}" -np "$NP" "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/$name.ids.json" \
    --out "$WORK/$name.np.json" --comm-stats "$WORK/$name.stats.json" 2>"$WORK/$name.err" ||
    { cat "$WORK/$name.err" >&2; fail "$name: score under mpirun -np $NP failed"; }
  python3 "$HERE/compare_score.py" "$WORK/$name.one.json" "$WORK/$name.np.json" 1e-5 || fail "$name: -np $NP"
  echo "$name: score -np $NP matches one process"
  if [ "$NP" -gt 1 ]; then
    extra=()
    # At 4 ranks also the summed combine (results added per rank where computed).
    [ "$NP" -eq 4 ] && extra=(--ranks-per-node 1 --combine summed)
    "${MPIRUN[@]}" -np "$NP" "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/$name.ids.json" \
      --compute-placement round_robin "${extra[@]}" --out "$WORK/$name.ucx.json" \
      --comm-stats "$WORK/$name.ucx.stats.json" 2>"$WORK/$name.err" ||
      { cat "$WORK/$name.err" >&2; fail "$name: score with peer fetch failed"; }
    python3 "$HERE/compare_score.py" "$WORK/$name.one.json" "$WORK/$name.ucx.json" 1e-5 || fail "$name: peer fetch"
    python3 - "$WORK/$name.ucx.stats.json" "$NP" <<'PY' || fail "$name: ucx path not exercised as expected"
import json, sys
s, np = json.load(open(sys.argv[1])), int(sys.argv[2])
assert s["world_size"] == np, s["world_size"]
assert s["ucx_get_bytes"] > 0, "no bytes moved over ucx"
fetched = sum(r["experts_fetched"] for r in s["ranks"])
assert fetched > 0, "no expert fetched from a peer"
tls = {t for r in s["ranks"] for t in r.get("ucx_transports", {}).values()}
if np == 4:  # ranks_per_node: 1 -> tcp only
    assert all(r.get("ucx_tls") == "tcp,self" for r in s["ranks"]), [r.get("ucx_tls") for r in s["ranks"]]
    assert tls and all(t.startswith("tcp") for t in tls), tls
print(f"ucx: {s['ucx_get_bytes']} bytes, {fetched} experts fetched from peers, transports {sorted(tls)}")
PY
  fi
done
# generate: same tokens as one process (greedy and sampled).
m="$MODELS/tiny-code-moe"
for sampling in "--temperature 0" "--temperature 0.8 --top-p 0.9 --seed 7"; do
  # shellcheck disable=SC2086
  "$BIN" generate --backend cpu --model "$m" -p "def add(a, b):" -n 12 $sampling --show-ids 2>"$WORK/g1.ids" >"$WORK/g1.txt"
  # shellcheck disable=SC2086
  "${MPIRUN[@]}" -np "$NP" "$BIN" generate --backend cpu --model "$m" -p "def add(a, b):" -n 12 $sampling \
    --compute-placement round_robin --show-ids 2>"$WORK/gn.ids" >"$WORK/gn.txt" ||
    { cat "$WORK/gn.ids" >&2; fail "generate under mpirun -np $NP failed"; }
  grep "^new ids:" "$WORK/g1.ids" >"$WORK/a" && grep "^new ids:" "$WORK/gn.ids" >"$WORK/b" ||
    fail "generate printed no ids"
  cmp -s "$WORK/a" "$WORK/b" || { diff "$WORK/a" "$WORK/b" >&2; fail "generate -np $NP tokens differ ($sampling)"; }
  cmp -s "$WORK/g1.txt" "$WORK/gn.txt" || fail "generate -np $NP text differs ($sampling)"
done
echo "generate: -np $NP gives the same tokens"
echo "PASS"
