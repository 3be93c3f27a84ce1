#!/bin/bash
# temporary: e2e A/B of cuda graphs on small-layer models
set -uo pipefail
EF_BUILD_TESTS=ON source scripts/accel/build-full.sh expertflow >"$OUT/build_out.txt" 2>&1 || { tail -40 "$OUT/build_out.txt"; exit 1; }
rm -f "$OUT/build_out.txt"
for model in "--model models/tiny-code-moe" "--synthetic qwen3-30b-a3b --synthetic-layers 16 --synthetic-dir $PWD/.synthetic"; do
for rep in 1 2; do
for flags in "--cuda-graphs off" "--cuda-graphs on"; do
  echo "=== $model $flags"
  for w in "c1 1 4 128 64" "c16 16 32 128 64" "c64 64 64 128 64"; do
    read -r name c n p g <<<"$w"
    f="$OUT/$(echo "$model $flags $name" | tr -c 'A-Za-z0-9\n' '_' | cut -c1-80).txt"
    timeout 100 "$BUILD"/expertflow bench $flags $model --backend cuda -n "$n" -c "$c" --prompt-len "$p" --gen-len "$g" --max-batch 64 >"$f" 2>&1
    printf "%-6s %s\n" "$name" "$(grep -E '^ +[0-9]+ +[0-9]+ ' "$f" | awk '{print "out_tok/s", $6, "ttft_p50", $8, "itl_p50", $10}')"
    grep -E "^# engine|^# cuda graphs|rror" "$f" | head -5
    [[ $rep == 2 ]] && rm -f "$f"
  done
done
done
done
