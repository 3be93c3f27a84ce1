#!/usr/bin/env bash
# Scheduler comparison with `expertflow bench`: the same requests under FIFO admission vs
# admission regrouping, and (under mpirun) requests assigned to ranks round robin vs by locality,
# for each rank count. Routing comes from a trace keyed by (request, position), so every run sees
# the same routing for the same requests. One JSON record and one log per run, then a table.
#
#   scripts/bench/sched.sh [options]
#     --build DIR        build directory holding expertflow (default build)
#     --out DIR          output directory (default bench-results/sched)
#     --trace T.jsonl    routing trace (required; FLAME-MoE's fits the default shape)
#     --shape S          synthetic shape (default deepseek-v2-lite)
#     --layers L         --synthetic-layers (default 9: layer 0 dense + 8 MoE layers)
#     --scale S          --synthetic-scale (default 1; 16 on CPU)
#     --backend B        cpu | cuda | auto (default auto)
#     --ranks "1 2 4"    rank counts; r > 1 runs under MPIRUN -np r
#     --window W         regrouping window in batches (default 4)
#     --mpirun "CMD"     launcher prefix (default "mpirun --allow-run-as-root --bind-to none --oversubscribe")
#     --extra "ARGS"     passed through to every bench run
# Workload per rank: 64 requests, concurrency 32, batch 8, prompt 16, gen 16.
set -euo pipefail
build=build out=bench-results/sched trace="" shape=deepseek-v2-lite layers=9 scale=1 backend=auto
ranks="1 2 4" window=4 extra="" mpirun="mpirun --allow-run-as-root --bind-to none --oversubscribe"
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --trace) trace=$2; shift 2 ;;
    --shape) shape=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --scale) scale=$2; shift 2 ;;
    --backend) backend=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --window) window=$2; shift 2 ;;
    --mpirun) mpirun=$2; shift 2 ;;
    --extra) extra=$2; shift 2 ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "sched.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$trace" ] || { echo "sched.sh: --trace is required" >&2; exit 2; }
[ -f "$trace" ] || { echo "sched.sh: trace $trace not found" >&2; exit 2; }
bin=$build/expertflow
[ -x "$bin" ] || { echo "sched.sh: $bin not found; build first" >&2; exit 2; }
mkdir -p "$out"

run() {  # name, ranks, args...
  local name=$1 r=$2
  shift 2
  local prefix=""
  [ "$r" -gt 1 ] && prefix="$mpirun -np $r"
  echo "== $name" >&2
  # shellcheck disable=SC2086
  if ! $prefix "$bin" bench --backend "$backend" --synthetic "$shape" --synthetic-layers "$layers" \
    --synthetic-scale "$scale" --routing-trace "$trace" --routing-key sequence -n 64 -c 32 --max-batch 8 \
    --prompt-len 16 --gen-len 16 --json "$out/$name.json" $extra "$@" >"$out/$name.txt" 2>&1; then
    echo "sched.sh: $name failed:" >&2
    tail -5 "$out/$name.txt" >&2
    return 1
  fi
}

for r in $ranks; do
  if [ "$r" -eq 1 ]; then
    run r1_fifo 1
    run r1_regroup 1 --regroup-window "$window"
  else
    run "r${r}_rr_fifo" "$r" --assign round_robin
    run "r${r}_rr_regroup" "$r" --assign round_robin --regroup-window "$window"
    run "r${r}_loc_fifo" "$r" --assign locality
    run "r${r}_loc_regroup" "$r" --assign locality --regroup-window "$window"
  fi
done

python3 - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| run | ranks | out tok/s | TTFT p50 ms | a2a bytes/token | distinct (layer, expert) per admitted batch, FIFO -> admitted |")
print("|---|---|---|---|---|---|")
for f in sorted(out.glob("*.json"), key=lambda p: (int(p.stem.split("_")[0][1:]), p.stem)):
    d = json.loads(f.read_text())
    r = d["results"]
    a = d.get("admission") or {}
    distinct = (f"{a['fcfs_distinct_per_round']:.1f} -> {a['regrouped_distinct_per_round']:.1f}"
                if a.get("rounds") else "-")
    print(f"| {f.stem} | {d['ranks']} | {r['output_tokens_per_s']:.1f} | {r['ttft_ms_p50']:.1f} | "
          f"{r['a2a_bytes_per_token']:.0f} | {distinct} |")
EOF
