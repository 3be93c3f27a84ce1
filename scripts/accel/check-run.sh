#!/bin/bash
# On the accelerator machine (one GPU): the GPU tests, then where two ranks sharing the GPU with
# per-rank expert caches differ from one rank. Scores one Mixtral-8x7B-shaped checkpoint (LAYERS
# layers, random bf16 weights) five ways and prints every pair's largest logit difference:
#   cpu1   one rank, CPU backend (the reference)       cuda1  one rank, CUDA, every expert resident
#   cuda1c one rank, CUDA, 2 slots per layer           np2    two ranks, CUDA, no cache
#   np2c   two ranks, CUDA, 2 slots per layer each (the per-rank caches)
#
#   scripts/accel/check-run.sh [LAYERS]       (default 4)
set -uo pipefail
LAYERS=${1:-4}
EF_BUILD_TESTS=ON source "$(dirname "$0")/build-full.sh" gpu_tests || exit 1
R=$OUT/check
mkdir -p "$R"
t0=$(date +%s)
(cd "$BUILD" && timeout 300 ctest -L gpu --timeout 240 --output-on-failure 2>&1 | grep -vE "^ *[0-9]+/[0-9]+ Test.*Passed" | tail -40)
echo "gpu tests in $(($(date +%s) - t0)) s"

SYN=$PWD/.deps/synthetic
BIN=$BUILD/expertflow
$BIN bench --backend cuda --synthetic mixtral-8x7b --synthetic-layers "$LAYERS" --synthetic-dir "$SYN" \
  -n 1 -c 1 --prompt-len 4 --gen-len 2 >"$R/warm.log" 2>&1 || { tail -20 "$R/warm.log"; exit 1; }
CKPT=$(ls -d "$SYN"/mixtral-8x7b-L"$LAYERS"-* | head -1)
python3 -c 'import json; json.dump({"input_ids": [[1, 415, 2936, 9060, 285, 1142, 28705, 28740], [1, 22557, 28725, 910]]}, open("'"$R"'/ids.json", "w"))'
CACHE=(--cache-device-budget "2 slots per layer" --cache-policy lru --prefetch-layers 0 --cpu-experts off)
MPI=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x LD_LIBRARY_PATH -np 2)
run() {  # name, command...
  local n=$1; shift
  local t=$(date +%s)
  timeout 300 "$@" --ids-file "$R/ids.json" --out "$R/$n.json" >"$R/$n.log" 2>&1 || { echo "$n failed:"; tail -8 "$R/$n.log"; }
  echo "$n in $(($(date +%s) - t)) s"
}
run cpu1 $BIN score --backend cpu --model "$CKPT"
run cuda1 $BIN score --backend cuda --model "$CKPT"
run cuda1c $BIN score --backend cuda --model "$CKPT" "${CACHE[@]}"
run np2 "${MPI[@]}" $BIN score --backend cuda --device 0 --model "$CKPT" --exchange mpi --compute-placement round_robin
run np2c "${MPI[@]}" $BIN score --backend cuda --device 0 --model "$CKPT" --exchange mpi --compute-placement round_robin \
  "${CACHE[@]}" --comm-stats "$R/np2c_stats.json"
python3 - "$R" <<'PY'
import itertools, json, os, sys
d = sys.argv[1]
runs = {n: json.load(open(f"{d}/{n}.json")) for n in ["cpu1", "cuda1", "cuda1c", "np2", "np2c"] if os.path.exists(f"{d}/{n}.json")}
def diff(a, b):
    w = 0.0
    for x, y in zip(a["logits"], b["logits"]):
        for rx, ry in zip(x, y):
            w = max(w, max(abs(p - q) for p, q in zip(rx, ry)))
    return w
for a, b in itertools.combinations(runs, 2):
    same = runs[a]["router_topk"] == runs[b]["router_topk"]
    print(f"{a:>7} vs {b:<7} max|dlogit| {diff(runs[a], runs[b]):.6f}  router top-k {'equal' if same else 'DIFFERS'}")
PY
