#!/usr/bin/env bash
# cluster.placement_mode planned under `mpirun -np NP`: `expertflow score` gives the same logits
# (1e-5) as one process on the fixtures and tiny-code-moe, with the plan never busier than the
# static plan of the same rows; and `expertflow bench` with FLAME-MoE routing on the
# DeepSeek-V2-Lite shape (1/16 width, its dense layer 0 and 8 MoE layers, one per trace layer)
# keeps the busiest rank's rows within the bound (1.15 x the mean) per MoE layer step, with no
# more all-to-all bytes than the static placement.
#   mpi_planned.sh BIN NP DATA_DIR MODELS_DIR
BIN=$1 NP=$2 DATA=$3 MODELS=$4
source "$(dirname "$0")/common.sh"
models=("$DATA/mixtral" "$DATA/qwen2_moe" "$DATA/olmoe" "$MODELS/tiny-code-moe")
for m in "${models[@]}"; do
  name=$(basename "$m")
  make_ids "$m" "$WORK/$name.ids.json"
  "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/$name.ids.json" --out "$WORK/$name.one.json"
  "${MPIRUN[@]}" -np "$NP" "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/$name.ids.json" \
    --placement-mode planned --out "$WORK/$name.np.json" --comm-stats "$WORK/$name.stats.json" 2>"$WORK/$name.err" ||
    { cat "$WORK/$name.err" >&2; fail "$name: score with placement_mode planned under mpirun -np $NP failed"; }
  python3 "$HERE/compare_score.py" "$WORK/$name.one.json" "$WORK/$name.np.json" 1e-5 || fail "$name: planned -np $NP"
  python3 - "$WORK/$name.stats.json" <<'PY' || fail "$name: planned stats"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["placement_mode"] == "planned", s["placement_mode"]
p = s["planned"]
assert p["layer_steps"] > 0 and p["rows"] > 0, p
assert p["rows_max_over_mean"] <= p["static_rows_max_over_mean"] + 1e-9, p
print(f"rows max/mean {p['rows_max_over_mean']:.3f} (static plan {p['static_rows_max_over_mean']:.3f})")
PY
  echo "$name: planned score -np $NP matches one process"
done
[ "$NP" -gt 1 ] || { echo "PASS"; exit 0; }
# The bench: static, then planned, same workload.
bench=(bench --backend cpu --synthetic deepseek-v2-lite --synthetic-scale 16 --synthetic-layers 9
  --synthetic-dir "$WORK/synth" --routing-trace "$DATA/traces/flame_moe_290m_prefill.jsonl" --routing-key sequence
  -n 4 -c 2 --prompt-len 32 --gen-len 8)
for mode in static planned; do
  "${MPIRUN[@]}" -np "$NP" "$BIN" "${bench[@]}" --placement-mode "$mode" --json "$WORK/bench.$mode.json" \
    >"$WORK/bench.$mode.out" 2>&1 || { cat "$WORK/bench.$mode.out" >&2; fail "bench --placement-mode $mode failed"; }
done
python3 - "$WORK/bench.static.json" "$WORK/bench.planned.json" <<'PY' || fail "bench: planned placement"
import json, sys
st, pl = (json.load(open(p)) for p in sys.argv[1:3])
p = pl["comm"]["planned"]
assert p["rows_max_over_mean"] <= p["max_imbalance_bound"] + 1e-9, p
assert pl["comm"]["a2a_bytes"] <= st["comm"]["a2a_bytes"], (pl["comm"]["a2a_bytes"], st["comm"]["a2a_bytes"])
print(f"bench: rows max/mean {p['rows_max_over_mean']:.3f} <= {p['max_imbalance_bound']} "
      f"(static plan {p['static_rows_max_over_mean']:.3f}); a2a {pl['comm']['a2a_bytes']} <= {st['comm']['a2a_bytes']} B")
PY
echo "PASS"
