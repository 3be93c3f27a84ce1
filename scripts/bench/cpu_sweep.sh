#!/usr/bin/env bash
# Concurrency sweep of `expertflow bench` on the CPU backend; one JSON per point under OUT_DIR.
#   scripts/bench/cpu_sweep.sh [BUILD_DIR] [OUT_DIR]
set -euo pipefail
build=${1:-build}
out=${2:-bench-results}
mkdir -p "$out"
for c in 1 2 4 8 16; do
  "$build/expertflow" bench --backend cpu -n $((c * 8)) -c "$c" --prompt-len 32 --gen-len 32 \
    --json "$out/cpu_c${c}.json" | { [ "$c" = 1 ] && cat || grep -v '^#' | tail -n 1; }
done
