#!/bin/bash
# The offload + scaling sweep of `expertflow bench` on the accelerator machine (>= 2 GPUs), with the
# Hugging Face transformers + accelerate offloading baseline side by side. Results (JSON, tables,
# .dat tables) packed into $OUT/sweep.tgz; draw the PNGs with scripts/bench/plot.sh where gnuplot is.
#
#   scripts/accel/sweep-run.sh [LAYERS] [GEN] [BUDGETS]   (default 4 layers, 32 tokens, "25 50 100")
#   EF_SWEEP_PHASES="checks offload hf scaling sched" (the default: all) picks the phases to run.
#
# Model: Mixtral-8x7B shape (hidden 4096, 8 experts x FFN 14336, top-2, bf16 random weights) with
# LAYERS layers, routed by the first LAYERS layers of the real Mixtral routing trace (sliced here;
# the full 32-layer checkpoint is 93 GB). Decode workload: batch 1 (-c 1), 2 requests, prompt 16.
#   1 GPU: expert budgets BUDGETS % x {lru on demand, expertflow + frequency predictor (fitted on
#          the trace), expertflow + trace oracle}. (lookahead forecasts the model's own routers, which
#          trace routing overrides, so it has nothing to predict here.) HF accelerate at 25/50/100%
#          (its own budget split: non-expert weights + P% of the experts on the GPU, the rest in
#          CPU memory).
#   2 GPUs: `mpirun -np 2 expertflow bench` (expert-parallel, NCCL), all experts resident, -c 8 per
#          rank, requests assigned round robin vs by locality, beside the 1-GPU run of the same load.
#   Scheduler: a fine-grained shape (DeepSeek-V2-Lite, 64 experts top-6; 9 layers = 8 MoE layers)
#          routed by the FLAME-MoE trace (8 x 64, top-6), 1 and 2 GPUs, a queue (-c 32, batch 8):
#          FIFO vs admission regrouping (window 4), round robin vs locality; same requests.
set -uo pipefail
PHASES=" ${EF_SWEEP_PHASES:-checks offload hf scaling sched} "
phase() { [[ $PHASES == *" $1 "* ]]; }
LAYERS=${1:-4}
GEN=${2:-32}
BUDGETS=${3:-25 50 100}
# Everything is written under a work folder and packed into $OUT/sweep.tgz after each phase (one
# file comes back even if a later phase runs out of time).
FINAL=${OUT:-$PWD/out}
mkdir -p "$FINAL"
OUT=$(mktemp -d)
pack() { tar czf "$FINAL/sweep.tgz.tmp" -C "$OUT" . && mv "$FINAL/sweep.tgz.tmp" "$FINAL/sweep.tgz"; }
EF_BUILD_TESTS=ON source "$(dirname "$0")/build-full.sh" gpu_tests || { pack; exit 1; }
S=$OUT/sweep
mkdir -p "$S"
# The GPU tests first (label gpu; multi_gpu: NCCL expert parallelism equals one GPU, serve under
# mpirun on 2 GPUs), at the code the sweep measures; EF_CTEST_LABELS picks other labels.
if phase checks; then
  (cd build-gpu2 && timeout 400 ctest -L "${EF_CTEST_LABELS:-gpu|multi_gpu}" --timeout 300 --output-on-failure 2>&1 |
    tail -40) |
    tee "$S/ctest_gpu.txt"
fi
pack
# The routing trace (the repository's copy unless EF_TRACE names another).
TRACE=${EF_TRACE:-tests/data/traces/mixtral8x7b_gsm8k_decode.jsonl}
SLICED=$PWD/.deps/mixtral_first${LAYERS}.jsonl
python3 scripts/bench/slice_trace.py "$TRACE" "$SLICED" "$LAYERS" || exit 1
SYN=$PWD/.deps/synthetic
BIN=build-gpu2/expertflow
t0=$(date +%s)
# One untimed run writes the checkpoint (the sweep's runs reuse it).
$BIN bench --backend cuda --synthetic mixtral-8x7b --synthetic-layers "$LAYERS" --synthetic-dir "$SYN" \
  -n 1 -c 1 --prompt-len 4 --gen-len 2 >"$S/warm.log" 2>&1 || { tail -20 "$S/warm.log"; exit 1; }
echo "checkpoint ready in $(($(date +%s) - t0)) s: $(du -sh "$SYN" | cut -f1)"

if phase offload; then
  t0=$(date +%s)
  bash scripts/bench/sweep.sh --build build-gpu2 --out "$S/json" --shape mixtral-8x7b --layers "$LAYERS" \
    --trace "$SLICED" --backend cuda --budgets "$BUDGETS" --modes "lru expertflow+frequency expertflow+oracle" \
    --batches 1 --requests 2 --prompt-len 16 --gen-len "$GEN" --extra "--synthetic-dir $SYN" 2>&1 | tee "$S/offload.txt"
  echo "offload sweep in $(($(date +%s) - t0)) s"
  pack
fi

if phase hf; then
  t0=$(date +%s)
  CKPT=$(ls -d "$SYN"/mixtral-8x7b-L"$LAYERS"-* | head -1)
  for b in 25 50 100; do
    timeout 100 python3 scripts/bench/hf_accelerate_baseline.py --model-dir "$CKPT" --budget-pct "$b" -n 1 -c 1 \
      --prompt-len 16 --gen-len "$GEN" --json "$S/json/hf_b$b.json" 2>&1 | tail -3 | tee -a "$S/hf.txt"
  done
  echo "hf baseline in $(($(date +%s) - t0)) s"
  pack
fi

if phase scaling; then
  t0=$(date +%s)
  bash scripts/bench/sweep.sh --build build-gpu2 --out "$S/json" --shape mixtral-8x7b --layers "$LAYERS" \
    --trace "$SLICED" --backend cuda --budgets 100 --ranks "1 2" --batches 8 --prompt-len 16 --gen-len "$GEN" \
    --assign "round_robin locality" --mpirun "mpirun --allow-run-as-root --bind-to none -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH" \
    --extra "--synthetic-dir $SYN" 2>&1 | tee "$S/scaling.txt"
  echo "scaling sweep in $(($(date +%s) - t0)) s"
  pack
fi

t0=$(date +%s)
FLAME=$(dirname "$TRACE")/flame_moe_290m_prefill.jsonl
if phase sched && [[ -f $FLAME ]]; then
  mkdir -p "$S/sched"
  sched() {  # name, launcher prefix, args...
    local name=$1 prefix=$2
    shift 2
    # shellcheck disable=SC2086
    $prefix $BIN bench --backend cuda --synthetic deepseek-v2-lite --synthetic-layers 9 --synthetic-dir "$SYN" \
      --routing-trace "$FLAME" --routing-key sequence -n 64 -c 32 --max-batch 8 --prompt-len 16 --gen-len 16 \
      --json "$S/sched/$name.json" "$@" >"$S/sched/$name.txt" 2>&1 || { tail -5 "$S/sched/$name.txt"; return 0; }
    grep -E "^ +[0-9]+ +[0-9]+ |admission|all-to-all" "$S/sched/$name.txt" | sed "s/^/$name: /"
  }
  MPI2="mpirun --allow-run-as-root --bind-to none -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH -np 2"
  sched r1_fifo ""
  sched r1_regroup "" --regroup-window 4
  sched r2_rr_fifo "$MPI2" --assign round_robin
  sched r2_loc_fifo "$MPI2" --assign locality
  sched r2_loc_regroup "$MPI2" --assign locality --regroup-window 4
  echo "scheduler runs in $(($(date +%s) - t0)) s"
fi
python3 scripts/bench/json_to_dat.py "$S/json" "$S/dat" >/dev/null && cat "$S/dat/all.dat" "$S/dat/scaling.dat" 2>/dev/null
pack
