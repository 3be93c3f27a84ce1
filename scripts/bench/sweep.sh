#!/usr/bin/env bash
# Sweep of `expertflow bench` over cache budgets, policies and batch sizes; one JSON per run.
#
#   scripts/bench/sweep.sh [options]
#     --build DIR        build directory holding expertflow (default build)
#     --out DIR          output directory for the JSON records (default bench-results/sweep)
#     --shape S          synthetic shape (default mixtral-8x7b)
#     --layers L         --synthetic-layers (default 0: the shape's)
#     --scale S          --synthetic-scale (default 1; use 32-64 on CPU)
#     --trace T.jsonl    --routing-trace (its shape must match the model)
#     --backend B        cpu | cuda | auto (default auto)
#     --budgets "25 50 75 100"   cache budgets, percent of each layer's experts (100: no cache)
#     --policies "lru expertflow"
#     --batches "8"      concurrency values (closed loop, -c; -n = 4 x concurrency)
#     --ranks "1"        rank counts; > 1 is refused: `expertflow bench` runs on one rank
#                        (the distributed runtime serves generate/score; bench is not wired to it yet)
#     --prefetch D       --prefetch-layers for the cached runs (default 1; oracle forecast from the trace)
#     --prompt-len N --gen-len N   (default 32 / 32)
#     --extra "ARGS"     passed through to every bench run
# Records are named <shape>_r<ranks>_c<conc>_b<budget>_<policy>.json; the 100% budget runs once
# without a cache (policy "none"), which is the all-resident upper bound.
set -euo pipefail
build=build out=bench-results/sweep shape=mixtral-8x7b layers=0 scale=1 trace="" backend=auto
budgets="25 50 75 100" policies="lru expertflow" batches="8" ranks="1" prefetch=1 prompt=32 gen=32 extra=""
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --shape) shape=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --scale) scale=$2; shift 2 ;;
    --trace) trace=$2; shift 2 ;;
    --backend) backend=$2; shift 2 ;;
    --budgets) budgets=$2; shift 2 ;;
    --policies) policies=$2; shift 2 ;;
    --batches) batches=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --prefetch) prefetch=$2; shift 2 ;;
    --prompt-len) prompt=$2; shift 2 ;;
    --gen-len) gen=$2; shift 2 ;;
    --extra) extra=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "sweep.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
bin="$build/expertflow"
[ -x "$bin" ] || { echo "sweep.sh: $bin not found (build first)" >&2; exit 1; }
mkdir -p "$out"
# Experts per layer of the shape, from the bench's own JSON (one tiny run).
probe="$out/.probe.json"
"$bin" bench --backend "$backend" --synthetic "$shape" --synthetic-layers "$layers" --synthetic-scale "$scale" \
  -n 1 -c 1 --prompt-len 2 --gen-len 1 --json "$probe" >/dev/null
experts=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["model_shape"]["num_experts"])' "$probe")
topk=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["model_shape"]["top_k"])' "$probe")
rm -f "$probe"
trace_args=()
[ -n "$trace" ] && trace_args=(--routing-trace "$trace")
first=1
run() {  # name, args...
  local name=$1; shift
  echo "# sweep: $name" >&2
  # shellcheck disable=SC2086
  "$bin" bench --backend "$backend" --synthetic "$shape" --synthetic-layers "$layers" --synthetic-scale "$scale" \
    "${trace_args[@]}" --prompt-len "$prompt" --gen-len "$gen" $extra "$@" --json "$out/$name.json" |
    { if [ $first = 1 ]; then cat; else grep -v '^#' | tail -n 1; fi; }
  first=0
}
for r in $ranks; do
  if [ "$r" != 1 ]; then
    echo "sweep.sh: skipping ranks=$r: expertflow bench runs on one rank only" >&2
    continue
  fi
  for c in $batches; do
    n=$((c * 4))
    for b in $budgets; do
      slots=$(( (experts * b + 50) / 100 ))
      [ "$slots" -lt "$topk" ] && slots=$topk
      if [ "$slots" -ge "$experts" ]; then
        run "${shape}_r${r}_c${c}_b${b}_none" -n "$n" -c "$c"
        continue
      fi
      for p in $policies; do
        run "${shape}_r${r}_c${c}_b${b}_${p}" -n "$n" -c "$c" --cache-slots-per-layer "$slots" --cache-policy "$p" \
          --prefetch-layers "$prefetch"
      done
    done
  done
done
echo "# sweep: $(ls "$out"/*.json | wc -l) records in $out" >&2
