#!/bin/bash
# On the accelerator machine (one GPU): the sampling kernel's tests, then sampled decode end to end
# with the draws on the GPU (EF_CUDA_SAMPLE_ROWS=1) against the host (=0) and against greedy, side
# by side, twice (synthetic Mixtral-8x7B and Qwen3-30B-A3B shapes in host memory, every expert
# resident, T 0.8 / top_p 0.95, prompts 128, 64 generated).
#
#   scripts/accel/sampling-run.sh [LAYERS_MIXTRAL] [LAYERS_QWEN3]      logs under $OUT (or ./out)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
LM=${1:-8}
LQ=${2:-16}
EF_BUILD_TESTS=ON source scripts/accel/build-full.sh expertflow gpu_tests >"$OUT/build_out.txt" 2>&1 ||
  { tail -30 "$OUT/build_out.txt"; exit 1; }
(cd "$BUILD" && timeout 240 ctest -R "SampleRows|gpu_sample_rows|CudaGraph|ArgMaxRows" --timeout 200 \
  --output-on-failure >"$OUT/ctest_sampling.log" 2>&1)
echo "ctest (sampling) rc=$?"
grep -E "tests passed|tests failed|Failed|\*\*\*" "$OUT/ctest_sampling.log" | tail -8
run() {  # tag shape layers env conc requests flags...
  local tag=$1 shape=$2 layers=$3 envs=$4 c=$5 n=$6
  shift 6
  env $envs timeout 200 "$BUILD"/expertflow bench --backend cuda --synthetic "$shape" --synthetic-layers "$layers" \
    --synthetic-in-memory --synthetic-distinct-layers 2 --synthetic-dir "$PWD/.synthetic" -n "$n" -c "$c" \
    --prompt-len 128 --gen-len 64 --max-batch 64 "$@" --json "$OUT/$tag.json" >"$OUT/$tag.txt" 2>&1
  printf "%-34s rc=%d %s\n" "$tag" $? "$(grep -E '^ +[0-9]+ +[0-9]+ ' "$OUT/$tag.txt" | awk '{print "out_tok/s", $6, "ttft_p50", $8, "itl_p50", $10}')"
  grep -E "^# engine" "$OUT/$tag.txt"
}
for round in 1 2; do
  for spec in "mixtral-8x7b $LM" "qwen3-30b-a3b $LQ"; do
    read -r shape layers <<<"$spec"
    for c in 16 64; do
      n=$((c == 16 ? 32 : 64))
      run "r${round}_${shape}_c${c}_greedy" "$shape" "$layers" "" "$c" "$n"
      run "r${round}_${shape}_c${c}_host" "$shape" "$layers" "EF_CUDA_SAMPLE_ROWS=0" "$c" "$n" --temperature 0.8 --top-p 0.95
      run "r${round}_${shape}_c${c}_gpu" "$shape" "$layers" "EF_CUDA_SAMPLE_ROWS=1" "$c" "$n" --temperature 0.8 --top-p 0.95
    done
  done
done
# The logs and JSON as one archive under $OUT.
(cd "$OUT" && shopt -s nullglob && f=(r[12]_*) && [ ${#f[@]} -gt 0 ] && tar czf sampling.tgz "${f[@]}" && rm -f "${f[@]}")
