#!/usr/bin/env bash
# An expert cache on every rank under `mpirun -np NP`: `score` with a per-rank budget of top-k slots
# per MoE layer (2 for top-2 models) gives the logits (1e-5) and router top-k of one process without a cache, on every
# fixture and tiny-code-moe; `generate` gives the same tokens. The run computes experts away from
# their homes (--compute-placement round_robin) and bounds each rank's host shard to half of its
# home experts, so every tier serves loads: device hits, the rank's own host shard, peers' shards
# over UCX, the checkpoint mapping. With prefetch off each rank's accesses are exactly its hits
# plus its loads from the three tiers. With prefetch on, every rank prefetches from rank 0's forecast.
#   mpi_cache.sh BIN NP DATA_DIR MODELS_DIR
BIN=$1 NP=$2 DATA=$3 MODELS=$4
source "$(dirname "$0")/common.sh"
# Bytes of half of a rank's home experts (contiguous placement), each padded as the shard pads it.
half_shard_bytes() {
  python3 - "$1" "$NP" <<'PY'
import json, os, re, struct, sys
d, np_ = sys.argv[1], int(sys.argv[2])
files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
size = {"F32": 4, "F16": 2, "BF16": 2}
tensors = {}
for f in files:
    with open(os.path.join(d, f), "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        tensors.update(json.loads(fh.read(n)))
cfg = json.load(open(os.path.join(d, "config.json")))
experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
moe_layers = cfg["num_hidden_layers"] - cfg.get("first_k_dense_replace", 0)
# One expert's bytes: its own tensors (layers.L.*.experts.0.*), or a fused tensor's share (GPT-OSS
# stores [experts, ...] tensors with their biases).
per_expert = re.compile(r"layers\.(\d+)\..*experts\.0\.[^.]+\.weight$")
fused = re.compile(r"layers\.(\d+)\..*\.experts\.[a-z_]+$")
def nbytes(v):
    count = 1
    for s in v["shape"]:
        count *= s
    return count * size[v["dtype"]]
own = [(int(per_expert.search(k).group(1)), v) for k, v in tensors.items() if per_expert.search(k)]
if own:
    first = min(l for l, _ in own)
    expert_bytes = sum(nbytes(v) for l, v in own if l == first)
else:
    shared = [(int(fused.search(k).group(1)), v) for k, v in tensors.items() if fused.search(k)]
    first = min(l for l, _ in shared)
    expert_bytes = sum(nbytes(v) for l, v in shared if l == first) // experts
padded = (expert_bytes + 63) // 64 * 64
print(padded * max(1, moe_layers * experts // np_ // 2))
PY
}
# Per rank: accesses = hits + loads from the three tiers (prefetch is off); over all ranks every
# tier served loads, and hits happened where required (a short fixture may see no expert twice on
# one rank; a decode run must).
check_counters() {  # stats.json, what, need_hits (1: hits > 0 required)
  python3 - "$1" "$NP" "${3:-0}" <<'PY' || fail "$2: cache counters"
import json, sys
s, np_, need_hits = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3] == "1"
assert s["world_size"] == np_, s["world_size"]
tot = {k: 0 for k in ("accesses", "hits", "host_loads", "peer_loads", "checkpoint_loads")}
for r in s["ranks"]:
    c = r["expert_cache"]
    assert c["active"], f"rank {r['rank']}: cache inactive"
    loads = c["host_loads"] + c["peer_loads"] + c["checkpoint_loads"]
    assert c["accesses"] == c["hits"] + loads, f"rank {r['rank']}: {c}"
    assert c["misses"] == loads, f"rank {r['rank']}: {c}"
    for k in tot:
        tot[k] += c[k]
for k, v in tot.items():
    assert v > 0 or (k == "hits" and not need_hits), f"no {k} over all ranks: {tot}"
print(f"-np {np_}: " + ", ".join(f"{k} {v}" for k, v in tot.items()))
PY
}
# Per-rank caches of top-k slots per MoE layer, experts computed away from their homes, each rank's
# host shard bounded to half of its home experts.
CACHED=(--cache-policy lru --prefetch-layers 0 --compute-placement round_robin)
read -ra models <<<"$(fixture_models "$DATA" "$MODELS")"
for m in "${models[@]}"; do
  name=$(basename "$m")
  make_ids "$m" "$WORK/$name.ids.json"
  "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/$name.ids.json" --out "$WORK/$name.one.json"
  host=$(half_shard_bytes "$m")
  slots=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["num_experts_per_tok"])' "$m/config.json")
  "${MPIRUN[@]}" -np "$NP" "$BIN" score --backend cpu --model "$m" --ids-file "$WORK/$name.ids.json" \
    --cache-device-budget "$slots slots per layer" --cache-host-budget "$host" "${CACHED[@]}" \
    --out "$WORK/$name.np.json" --comm-stats "$WORK/$name.stats.json" 2>"$WORK/$name.err" ||
    { cat "$WORK/$name.err" >&2; fail "$name: score with per-rank caches failed"; }
  python3 "$HERE/compare_score.py" "$WORK/$name.one.json" "$WORK/$name.np.json" 1e-5 ||
    fail "$name: per-rank caches at -np $NP differ from one process"
  check_counters "$WORK/$name.stats.json" "$name"
  echo "$name: per-rank caches at -np $NP match one process"
done
# generate (decode steps revisit experts): the same tokens as one process without a cache.
m="$MODELS/tiny-code-moe"
"$BIN" generate --backend cpu --model "$m" -p "def add(a, b):" -n 12 --temperature 0 --show-ids 2>"$WORK/g1.ids" \
  >/dev/null
"${MPIRUN[@]}" -np "$NP" "$BIN" generate --backend cpu --model "$m" -p "def add(a, b):" -n 12 --temperature 0 \
  --cache-device-budget "2 slots per layer" --cache-host-budget "$(half_shard_bytes "$m")" "${CACHED[@]}" \
  --comm-stats "$WORK/gen.stats.json" --show-ids 2>"$WORK/gn.ids" >/dev/null ||
  { cat "$WORK/gn.ids" >&2; fail "generate with per-rank caches failed"; }
grep "^new ids:" "$WORK/g1.ids" >"$WORK/a" && grep "^new ids:" "$WORK/gn.ids" >"$WORK/b" || fail "generate printed no ids"
cmp -s "$WORK/a" "$WORK/b" || { diff "$WORK/a" "$WORK/b" >&2; fail "generate -np $NP with caches: tokens differ"; }
check_counters "$WORK/gen.stats.json" generate 1
echo "generate: -np $NP with per-rank caches gives the same tokens"
# With prefetch (the default policy and predictor, forecasts >= 0.2 prefetched): every token is
# rank 0's, yet every rank prefetches for the experts it computes, from rank 0's forecast carried
# with the token counts, and uses some of those prefetches; the tokens do not change. With two
# replicas of every expert a rank prefetches only experts whose rows come to it: a forecast filtered
# by what it computes for its own tokens would load replicas rank 0 computes itself (none used).
"$BIN" generate --backend cpu --model "$m" -p "def add(a, b):" -n 24 --temperature 0 --show-ids 2>"$WORK/p1.ids" >/dev/null
grep "^new ids:" "$WORK/p1.ids" >"$WORK/a" || fail "generate printed no ids"
for rep in 1 2; do
  "${MPIRUN[@]}" -np "$NP" "$BIN" generate --backend cpu --model "$m" -p "def add(a, b):" -n 24 --temperature 0 \
    --cache-device-budget "2 slots per layer" --prefetch-min-prob 0.2 --replication "$rep" \
    --comm-stats "$WORK/pf.stats.json" --show-ids 2>"$WORK/pf.ids" >/dev/null ||
    { cat "$WORK/pf.ids" >&2; fail "generate with prefetching per-rank caches (replication $rep) failed"; }
  grep "^new ids:" "$WORK/pf.ids" >"$WORK/b" || fail "generate printed no ids"
  cmp -s "$WORK/a" "$WORK/b" || { diff "$WORK/a" "$WORK/b" >&2; fail "generate -np $NP with prefetch: tokens differ"; }
  python3 - "$WORK/pf.stats.json" "$m/config.json" "$rep" <<'PY' || fail "generate with prefetch, replication $rep"
import json, sys
s, cfg, rep = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), int(sys.argv[3])
for r in s["ranks"]:
    c = r["expert_cache"]
    # A rank whose 2 slots hold every expert it computes for rank 0's tokens (its primary homes,
    # replicas or not) has nothing to prefetch once warm.
    if cfg["num_local_experts"] > 2 * s["world_size"] and r["rank"] == 1:
        assert c["prefetch_issued"] > 0 and c["prefetch_used"] > 0, f"rank 1 prefetched nothing useful: {c}"
        assert c["prefetch_used"] >= c["prefetch_wasted"], f"rank 1 wasted most prefetches: {c}"
    # Rank 0's own forecast stands on rank 0; the others are handed it.
    got = r["forecasts_received"]
    assert (got == 0) if r["rank"] == 0 else (got > 0), f"rank {r['rank']}: {got} forecasts received"
print(f"replication {rep}, prefetch issued/used/wasted per rank:",
      [(r["expert_cache"]["prefetch_issued"], r["expert_cache"]["prefetch_used"], r["expert_cache"]["prefetch_wasted"])
       for r in s["ranks"]])
PY
done
echo "PASS"
