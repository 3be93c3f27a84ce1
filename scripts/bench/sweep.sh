#!/usr/bin/env bash
# Sweep of `expertflow bench` over expert-cache budgets and modes, batch sizes and rank counts;
# one JSON record per run.
#
#   scripts/bench/sweep.sh [options]
#     --build DIR        build directory holding expertflow (default build)
#     --out DIR          output directory for the JSON records (default bench-results/sweep)
#     --shape S          synthetic shape (default mixtral-8x7b)
#     --layers L         --synthetic-layers (default 0: the shape's)
#     --scale S          --synthetic-scale (default 1; use 32-64 on CPU)
#     --trace T.jsonl    --routing-trace (its shape must match the model)
#     --backend B        cpu | cuda | auto (default auto)
#     --budgets "25 50 75 100"   GPU expert budgets, percent of each layer's experts (100: no cache)
#     --modes "lru expertflow+lookahead"   cache modes for budgets < 100:
#                          lru                  on demand, LRU (what Mixtral-offloading does)
#                          expertflow+P         expertflow policy, prefetch from predictor P
#                                               (lookahead | frequency | path | affinity | hybrid;
#                                               under --trace, lookahead forecasts the model's
#                                               own routers, which the trace overrides)
#                          expertflow+oracle    prefetch from the trace's true future routing
#     --batches "8"      concurrency values per rank (closed loop)
#     --requests N       requests per rank per run (default 4 x concurrency)
#     --ranks "1"        rank counts; r > 1 runs `MPIRUN -np r expertflow bench` (all experts
#                        resident, expert-parallel) once per --assign value
#     --assign "round_robin locality"   request -> rank assignments for r > 1
#     --mpirun "CMD"     launcher prefix (default "mpirun --allow-run-as-root --bind-to none")
#     --prefetch D       --prefetch-layers for the prefetching modes (default 1)
#     --prompt-len N --gen-len N   (default 32 / 32)
#     --extra "ARGS"     passed through to every bench run
# Records are named <shape>_r<ranks>_c<conc>_b<budget>_<mode>.json; the 100% budget runs without
# a cache (mode "none"), the all-resident upper bound; r > 1 records end in _<assign>.
set -euo pipefail
build=build out=bench-results/sweep shape=mixtral-8x7b layers=0 scale=1 trace="" backend=auto
budgets="25 50 75 100" modes="lru expertflow+lookahead" batches="8" ranks="1" prefetch=1 prompt=32 gen=32
extra="" requests=0 assigns="round_robin locality" mpirun="mpirun --allow-run-as-root --bind-to none"
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
    --modes|--policies) modes=$2; shift 2 ;;
    --batches) batches=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --assign) assigns=$2; shift 2 ;;
    --mpirun) mpirun=$2; shift 2 ;;
    --prefetch) prefetch=$2; shift 2 ;;
    --prompt-len) prompt=$2; shift 2 ;;
    --gen-len) gen=$2; shift 2 ;;
    --extra) extra=$2; shift 2 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "sweep.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
mode_args() {  # mode -> bench flags; an unknown mode -> nonzero status, nothing printed
  case "$1" in
    # The policies alone: cache.cpu_compute off (its own runs: scripts/accel/cpu-compute-run.sh).
    lru) echo "--cache-policy lru --prefetch-layers 0 --predictor none --cpu-experts off" ;;
    expertflow+oracle) echo "--cache-policy expertflow --prefetch-layers $prefetch --predictor none --oracle-prefetch --cpu-experts off" ;;
    expertflow+lookahead|expertflow+frequency|expertflow+path|expertflow+affinity|expertflow+hybrid)
      echo "--cache-policy expertflow --prefetch-layers $prefetch --predictor ${1#expertflow+} --cpu-experts off" ;;
    *) return 2 ;;
  esac
}
# Every mode is checked before anything runs: a mode that maps to no flags would otherwise run as
# the defaults under its own (wrong) label.
for m in $modes; do
  mode_args "$m" >/dev/null || {
    echo "sweep.sh: unknown mode '$m' in --modes (lru, expertflow+oracle, expertflow+P with P one of" \
      "lookahead frequency path affinity hybrid); nothing was run" >&2
    exit 2
  }
done
bin="$build/expertflow"
[ -x "$bin" ] || { echo "sweep.sh: $bin not found (build first)" >&2; exit 1; }
mkdir -p "$out"
# Experts per layer of the shape, from the bench's own JSON (one tiny run; --extra may name the
# checkpoint folder, so it goes here too).
probe="$out/.probe.json"
# shellcheck disable=SC2086
"$bin" bench --backend "$backend" --synthetic "$shape" --synthetic-layers "$layers" --synthetic-scale "$scale" \
  $extra -n 1 -c 1 --prompt-len 2 --gen-len 1 --json "$probe" >/dev/null
experts=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["model_shape"]["num_experts"])' "$probe")
topk=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["model_shape"]["top_k"])' "$probe")
rm -f "$probe"
trace_args=()
[ -n "$trace" ] && trace_args=(--routing-trace "$trace")
first=1
run() {  # launcher-prefix name args...: the prefix is "" or an mpirun command
  local prefix=$1 name=$2
  shift 2
  echo "# sweep: $name" >&2
  # shellcheck disable=SC2086
  $prefix "$bin" bench --backend "$backend" --synthetic "$shape" --synthetic-layers "$layers" \
    --synthetic-scale "$scale" "${trace_args[@]}" --prompt-len "$prompt" --gen-len "$gen" $extra "$@" \
    --json "$out/$name.json" |
    { if [ $first = 1 ]; then cat; else grep -v '^#' | tail -n 1; fi; }
  first=0
}
for r in $ranks; do
  for c in $batches; do
    n=$((c * 4))
    [ "$requests" -gt 0 ] && n=$requests
    if [ "$r" != 1 ]; then
      for a in $assigns; do
        run "$mpirun -np $r" "${shape}_r${r}_c${c}_b100_none_${a}" -n "$n" -c "$c" --assign "$a"
      done
      continue
    fi
    for b in $budgets; do
      slots=$(( (experts * b + 50) / 100 ))
      [ "$slots" -lt "$topk" ] && slots=$topk
      if [ "$slots" -ge "$experts" ]; then
        run "" "${shape}_r${r}_c${c}_b${b}_none" -n "$n" -c "$c"
        continue
      fi
      for m in $modes; do
        flags=$(mode_args "$m")  # checked above; an assignment stops the sweep under set -e if not
        # shellcheck disable=SC2086
        run "" "${shape}_r${r}_c${c}_b${b}_${m/+/-}" -n "$n" -c "$c" --cache-device-budget "$slots slots per layer" \
          $flags
      done
    done
  done
done
echo "# sweep: $(ls "$out"/*.json | wc -l) records in $out" >&2
