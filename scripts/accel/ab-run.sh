#!/bin/bash
# On the accelerator machine: the same `expertflow bench` workloads (synthetic Mixtral-8x7B shape,
# LAYERS layers, all experts resident) and ef_decode_bench under several settings of the CUDA
# backend's knobs, one after another in one run, for side-by-side numbers.
#
#   scripts/accel/ab-run.sh LAYERS "ENV A" "ENV B" ...    e.g. "EF_CUDA_PDL=0" "EF_CUDA_EXPERT_STREAMS=0"
# An empty string is the defaults; a setting that starts with "--" is passed to `expertflow bench`
# as flags instead (e.g. "--kv-block-size 0"). Logs under $OUT (or ./out).
set -uo pipefail
LAYERS=${1:-8}
shift
EF_BUILD_TESTS=ON source scripts/accel/build-full.sh ef_decode_bench expertflow >"${OUT:-out}/build_out.txt" 2>&1 ||
  { tail -30 "${OUT:-out}/build_out.txt"; exit 1; }
rm -f "$OUT/build_out.txt"
# name concurrency requests prompt gen
WORKLOADS=("c1 1 4 128 64" "c16 16 32 128 64" "c64 64 64 128 64" "ttft2k 1 4 2048 4")
for setting in "$@"; do
  tag=$(echo "${setting:-default}" | tr -c 'A-Za-z0-9_\n' '_')
  echo "=== ${setting:-defaults}"
  for w in "${WORKLOADS[@]}"; do
    read -r name c n p g <<<"$w"
    envs=$setting flags=""
    [[ $setting == --* ]] && envs="" flags=$setting
    env $envs timeout 200 "$BUILD"/expertflow bench $flags --backend cuda --synthetic mixtral-8x7b --synthetic-layers "$LAYERS" \
      --synthetic-dir "$PWD/.synthetic" -n "$n" -c "$c" --prompt-len "$p" --gen-len "$g" --max-batch 64 \
      >"$OUT/${tag}_$name.txt" 2>&1
    printf "%-8s %s\n" "$name" "$(grep -E '^ +[0-9]+ +[0-9]+ ' "$OUT/${tag}_$name.txt" | awk '{print "out_tok/s", $6, "ttft_p50", $8, "itl_p50", $10}')"
    grep -E "^# engine|^# cuda graphs" "$OUT/${tag}_$name.txt"
  done
  [[ $setting == --* ]] && continue  # flags of expertflow, not of the kernel bench
  env $setting timeout 120 "$BUILD"/tests/ef_decode_bench --batches 1,64 --iters 20 --prefill-iters 7 --no-breakdown \
    $(echo "$setting" | grep -q "EF_CUDA_PDL=0" && echo --no-pdl) \
    $(echo "$setting" | grep -q "EF_CUDA_EXPERT_STREAMS=0" && echo --expert-streams 0) 2>&1 | grep -E "^decode|^prefill|prefill steps"
done
