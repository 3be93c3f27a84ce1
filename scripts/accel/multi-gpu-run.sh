#!/bin/bash
# The multi-GPU rows of the composed system on one machine of G GPUs (nvidia-h200-x2, -x4 or -x8),
# one phase per call (each fits the 600 s limit of one call):
#
#   scripts/accel/multi-gpu-run.sh tests       build; ctest -L 'gpu|multi_gpu'; ef_a2a_bench
#                                              (the exchange against a raw NCCL all-to-all-v of the
#                                              same bytes); the two-namespace multinode test
#   scripts/accel/multi-gpu-run.sh ep SHAPE    expert parallel, every expert resident, SHAPE
#                                              mixtral-8x7b (32 layers) or deepseek-v3 (LAYERS,
#                                              default 8): output tokens/s at concurrency 1, 16
#                                              and 64 per rank, on 1 GPU and on G, and the
#                                              scaling efficiency
#   scripts/accel/multi-gpu-run.sh budgets     per-rank budgets of 25% and 50% of the experts,
#                                              static against planned placement: tokens/s, bytes
#                                              per tier, busiest rank's rows over the mean
#   scripts/accel/multi-gpu-run.sh summary     the tables of every phase run so far, as markdown
#
# G: GPUS (default: every GPU nvidia-smi lists). Weights are random bf16, generated in host memory
# (--synthetic-in-memory, DISTINCT layers generated, the others repeat them; every GPU still holds
# its experts of every layer). Under mpirun each rank serves its own requests (data-parallel
# attention) and computes its experts for every rank (expert parallelism); concurrency is per rank.
# Results: $OUT/multi_gpu/<phase>/*.json (bench records carry "ranks": N) and summary.md.
#
# BACKEND=cpu runs the same commands on CPU ranks with a small shape (SHAPE_CPU, default
# deepseek-v2-lite at 1/16 width), from ./build: a check of the script where no GPU is, not a
# measurement. Needs .deps/debs carried on the accelerator (build-full.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
PHASE=${1:-tests}
SHAPE=${2:-mixtral-8x7b}
OUT=${OUT:-$PWD/out}
R=$OUT/multi_gpu
mkdir -p "$R"
BACKEND=${BACKEND:-cuda}

if [[ $BACKEND == cuda ]]; then
  if [[ $PHASE != summary ]]; then
    EF_BUILD_TESTS=ON source scripts/accel/build-full.sh gpu_tests ef_a2a_bench >/dev/null || exit 1
  fi
  BUILD=${BUILD:-build-gpu2}
  G=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
  MPI=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE=0)
  SYN=(--synthetic "$SHAPE" --synthetic-in-memory --synthetic-distinct-layers "${DISTINCT:-2}")
  case $SHAPE in
    mixtral-8x7b) SYN+=(--synthetic-layers "${LAYERS:-32}") ;;
    *) SYN+=(--synthetic-layers "${LAYERS:-8}") ;;
  esac
  GEN=${GEN:-64}
  CONCS=${CONCS:-1 16 64}
  NAME=$SHAPE
else
  BUILD=${BUILD:-build}
  G=${GPUS:-2}
  MPI=(mpirun --allow-run-as-root --oversubscribe --bind-to none)
  SYN=(--synthetic "${SHAPE_CPU:-deepseek-v2-lite}" --synthetic-scale 16 --synthetic-layers "${LAYERS:-5}"
    --synthetic-dir "${TMPDIR:-/tmp}/ef_multi_gpu_synthetic")
  GEN=${GEN:-8}
  CONCS=${CONCS:-1 4}
  NAME=${SHAPE_CPU:-deepseek-v2-lite}-cpu
fi
BIN=$BUILD/expertflow
[[ -x $BIN || $PHASE == summary ]] || { echo "no $BIN: build first" >&2; exit 1; }
stamp() { echo "# $(hostname), $(date -u +%FT%TZ), git $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown), $G GPUs, backend $BACKEND"; }

# bench on N ranks into $1.json (log beside it); the rest: bench flags.
bench() {
  local out=$1 n=$2
  shift 2
  local t0=$SECONDS
  timeout "${BENCH_TIMEOUT:-280}" "${MPI[@]}" -np "$n" "$BIN" bench --backend "$BACKEND" "${SYN[@]}" "$@" \
    --json "$out.json" >"$out.log" 2>&1
  local rc=$?
  echo "$(basename "$out"): rc $rc in $((SECONDS - t0)) s" >&2
  [[ $rc == 0 ]] || tail -5 "$out.log" >&2
  return $rc
}

case $PHASE in
  tests)
    stamp | tee "$R/tests.txt"
    if [[ $BACKEND == cuda ]]; then
      (cd "$BUILD" && timeout 420 ctest -L 'gpu|multi_gpu' --timeout 240 --output-on-failure 2>&1 |
        grep -E "tests passed|Failed|FAILED|Skipped|Expected|actual" | head -40) | tee -a "$R/tests.txt"
      timeout 120 "${MPI[@]}" -np "$G" "$BUILD"/tests/ef_a2a_bench --json "$R/a2a_bench.json" 2>&1 |
        tee "$R/a2a_bench.txt"
      # Two nodes as network namespaces joined by veth (needs root; skips itself where it cannot).
      (cd "$BUILD" && timeout 300 ctest -R multinode --output-on-failure 2>&1 | tail -5) | tee -a "$R/tests.txt"
    else
      (cd "$BUILD" && ctest -R 'mpi_' --timeout 240 2>&1 | grep -E "tests passed|Failed") | tee -a "$R/tests.txt"
    fi
    ;;
  ep)
    d=$R/ep_$NAME
    mkdir -p "$d"
    stamp >"$d/stamp.txt"
    for c in $CONCS; do
      for n in 1 "$G"; do
        bench "$d/r${n}_c$c" "$n" -n $((2 * c)) -c "$c" --prompt-len "${PROMPT:-128}" --gen-len "$GEN"
      done
    done
    ;;
  budgets)
    d=$R/budgets
    mkdir -p "$d"
    stamp >"$d/stamp.txt"
    TRACE=tests/data/traces/mixtral8x7b_gsm8k_decode.jsonl
    ROUTE=()
    if [[ $BACKEND == cuda && $SHAPE == mixtral-8x7b ]]; then
      python3 scripts/bench/slice_trace.py "$TRACE" "$R/mixtral_trace.jsonl" "${LAYERS:-32}" >/dev/null &&
        ROUTE=(--routing-trace "$R/mixtral_trace.jsonl" --routing-key sequence)
    fi
    for b in 25 50; do
      for mode in static planned; do
        bench "$d/b${b}_$mode" "$G" -n 8 -c 4 --prompt-len 32 --gen-len "$GEN" "${ROUTE[@]}" \
          --cache-device-budget "$b%" --cache-policy lru --placement-mode "$mode" --compute-placement round_robin
      done
    done
    ;;
  summary) ;;
  *)
    echo "unknown phase '$PHASE' (tests, ep SHAPE, budgets, summary)" >&2
    exit 2
    ;;
esac

# The tables of every phase run so far.
python3 - "$R" <<'PY' | tee "$R/summary.md"
import glob, json, os, sys
r = sys.argv[1]
def load(p):
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None
for d in sorted(glob.glob(f"{r}/ep_*")):
    runs = {}
    for p in glob.glob(f"{d}/r*_c*.json"):
        j = load(p)
        if j:
            runs[(j["ranks"], j["workload"]["concurrency"])] = j
    if not runs:
        continue
    print(f"\n### Expert parallel, every expert resident: {os.path.basename(d)[3:]}\n")
    print("| GPUs | concurrency per rank | output tok/s | per GPU | scaling efficiency | TTFT p50 ms | ITL p50 ms | a2a B/token |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (n, c), j in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        res = j["results"]
        one = runs.get((1, c))
        eff = res["output_tokens_per_s"] / (n * one["results"]["output_tokens_per_s"]) if one else None
        print(f"| {n} | {c} | {res['output_tokens_per_s']:.1f} | {res['output_tokens_per_s'] / n:.1f} | "
              f"{'' if eff is None else f'{100 * eff:.0f}%'} | {res['ttft_ms_p50']:.1f} | {res['itl_ms_p50']:.2f} | "
              f"{res.get('a2a_bytes_per_token', 0):.0f} |")
b = sorted(glob.glob(f"{r}/budgets/b*_*.json"))
if b:
    print("\n### Per-rank expert budgets, static against planned placement\n")
    print("| budget | placement | ranks | output tok/s | hit rate | device hits | host MiB | peer MiB | checkpoint MiB | rows max/mean (run) | per layer step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in b:
        j = load(p)
        if not j:
            continue
        res, comm = j["results"], j.get("comm") or {}
        tiers = {"hits": 0, "host_bytes": 0, "peer_bytes": 0, "checkpoint_bytes": 0}
        for rank in comm.get("ranks", []):
            c = rank.get("expert_cache", {})
            for k in tiers:
                tiers[k] += c.get(k, 0)
        step = (comm.get("planned") or {}).get("rows_max_over_mean")
        name = os.path.basename(p)[:-5].split("_")
        mib = lambda v: f"{v / 2**20:.0f}"
        print(f"| {name[0][1:]}% | {name[1]} | {j['ranks']} | {res['output_tokens_per_s']:.1f} | {res['hit_rate']:.3f} | "
              f"{tiers['hits']} | {mib(tiers['host_bytes'])} | {mib(tiers['peer_bytes'])} | {mib(tiers['checkpoint_bytes'])} | "
              f"{comm.get('rows_computed_max_over_mean', 0):.3f} | {'' if step is None else f'{step:.3f}'} |")
a = load(f"{r}/a2a_bench.json")
if a:
    print(f"\n### Exchange against raw NCCL: see a2a_bench.txt ({len(a.get('records', []))} records)")
PY
