#!/bin/bash
# On the accelerator machine (one GPU is enough): the GPU tests, then expert offloading of a
# Mixtral-8x7B-shaped checkpoint (LAYERS layers, random bf16 weights, the first LAYERS layers of the
# real Mixtral routing trace) at batch 1 with the expert loads in the checkpoint's precision, int8
# and int4 (cache.miss_precision), and per-rank expert caches under `mpirun -np 2` on the one GPU
# (MPI exchange) against one rank. Logs and JSON under $OUT (or ./out).
#
#   scripts/accel/precision-run.sh [LAYERS] [GEN] [BUDGETS]     (default 4 layers, 32 tokens, "25 50")
# Needs .deps/debs carried (bash ../shared/tools/accel-deps.sh .deps/debs here first).
set -uo pipefail
LAYERS=${1:-4}
GEN=${2:-32}
BUDGETS=${3:-25 50}
EF_BUILD_TESTS=ON source "$(dirname "$0")/build-full.sh" gpu_tests || exit 1
R=$OUT/precision
mkdir -p "$R"

t0=$(date +%s)
(cd "$BUILD" && timeout 300 ctest -L gpu --timeout 240 --output-on-failure 2>&1 | tail -30) | tee "$R/ctest_gpu.txt"
echo "gpu tests in $(($(date +%s) - t0)) s"

TRACE=tests/data/traces/mixtral8x7b_gsm8k_decode.jsonl
SLICED=$PWD/.deps/mixtral_first${LAYERS}.jsonl
python3 scripts/bench/slice_trace.py "$TRACE" "$SLICED" "$LAYERS" || exit 1
SYN=$PWD/.deps/synthetic
BIN=$BUILD/expertflow
t0=$(date +%s)
$BIN bench --backend cuda --synthetic mixtral-8x7b --synthetic-layers "$LAYERS" --synthetic-dir "$SYN" \
  -n 1 -c 1 --prompt-len 4 --gen-len 2 >"$R/warm.log" 2>&1 || { tail -20 "$R/warm.log"; exit 1; }
echo "checkpoint ready in $(($(date +%s) - t0)) s: $(du -sh "$SYN" | cut -f1)"

# Offloaded decode, batch 1: LRU on demand with each load precision, side by side.
printf "%-8s %-9s %10s %12s %10s %9s\n" budget precision "out_tok/s" "moved_MiB" hit_rate stall_ms | tee "$R/offload.txt"
for b in $BUDGETS; do
  slots=$((8 * b / 100))
  for p in native int8 int4; do
    j=$R/offload_b${b}_${p}.json
    timeout 240 $BIN bench --backend cuda --synthetic mixtral-8x7b --synthetic-layers "$LAYERS" --synthetic-dir "$SYN" \
      --routing-trace "$SLICED" -n 2 -c 1 --prompt-len 16 --gen-len "$GEN" \
      --cache-device-budget "$slots slots per layer" --cache-policy lru --prefetch-layers 0 --miss-precision "$p" --cpu-experts off \
      --json "$j" >"$R/offload_b${b}_${p}.log" 2>&1 || { tail -5 "$R/offload_b${b}_${p}.log"; continue; }
    python3 - "$j" "$b" "$p" <<'PY' | tee -a "$R/offload.txt"
import json, sys
j = json.load(open(sys.argv[1]))
r, c = j["results"], j["cache"]
print(f"{sys.argv[2] + '%':<8} {sys.argv[3]:<9} {r['output_tokens_per_s']:10.2f} {r['bytes_moved'] / 2**20:12.1f} "
      f"{r['hit_rate']:10.3f} {c['stall_ms']:9.1f}")
PY
  done
done

# Two ranks on the one GPU (MPI exchange), each with its own expert cache of 2 slots per MoE layer,
# computing experts away from their homes: logits against one rank with every expert resident.
CKPT=$(ls -d "$SYN"/mixtral-8x7b-L"$LAYERS"-* | head -1)
python3 -c 'import json; json.dump({"input_ids": [[1, 415, 2936, 9060, 285, 1142, 28705, 28740], [1, 22557, 28725, 910]]}, open("'"$R"'/ids.json", "w"))'
t0=$(date +%s)
timeout 200 $BIN score --backend cuda --model "$CKPT" --ids-file "$R/ids.json" --out "$R/score_one.json" \
  >"$R/score_one.log" 2>&1 || tail -5 "$R/score_one.log"
timeout 300 mpirun --allow-run-as-root --oversubscribe --bind-to none -x LD_LIBRARY_PATH -np 2 \
  $BIN score --backend cuda --device 0 --model "$CKPT" --ids-file "$R/ids.json" --exchange mpi \
  --cache-device-budget "2 slots per layer" --cache-policy lru --prefetch-layers 0 --compute-placement round_robin \
  --out "$R/score_np2.json" --comm-stats "$R/score_np2_stats.json" >"$R/score_np2.log" 2>&1 || tail -20 "$R/score_np2.log"
python3 tests/comm/compare_score.py "$R/score_one.json" "$R/score_np2.json" 1e-3 2>&1 | tee "$R/score_compare.txt"
python3 - "$R/score_np2_stats.json" <<'PY' 2>&1 | tee -a "$R/score_compare.txt"
import json, sys
s = json.load(open(sys.argv[1]))
for r in s["ranks"]:
    c = r["expert_cache"]
    print(f"rank {r['rank']}: accesses {c['accesses']} hits {c['hits']} | host {c['host_loads']} loads "
          f"{c['host_bytes'] / 2**20:.0f} MiB, peer {c['peer_loads']} loads {c['peer_bytes'] / 2**20:.0f} MiB, "
          f"checkpoint {c['checkpoint_loads']} loads {c['checkpoint_bytes'] / 2**20:.0f} MiB; a2a sent {r['a2a_bytes_sent']}")
PY
echo "two ranks on one GPU in $(($(date +%s) - t0)) s"
