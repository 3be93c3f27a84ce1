#!/bin/bash
# On the accelerator machine: every kernel of a few decode steps timed by Nsight Compute (device
# time only, caches left warm, clocks left alone), for the shapes and batches given. Per-kernel
# CSVs under $OUT/ncu; summarise them with scripts/accel/ncu_summary.py.
#
#   scripts/accel/ncu-decode.sh "qwen3-30b-a3b:1 mixtral-8x7b:1 qwen3-30b-a3b:64"
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
EF_BUILD_TESTS=ON source scripts/accel/build-full.sh ef_decode_bench >"$OUT/build_out.txt" 2>&1 ||
  { tail -30 "$OUT/build_out.txt"; exit 1; }
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: ${NCU:-none}"
[ -n "$NCU" ] || exit 1
mkdir -p "$OUT/ncu"
for item in ${1:-qwen3-30b-a3b:1 mixtral-8x7b:1}; do
  shape=${item%%:*} batch=${item##*:}
  # Skip the set-up and the first warm-up steps, then time ~3 steps' kernels (4 layers each).
  timeout 240 "$NCU" --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
    --launch-skip "${SKIP:-6000}" --launch-count "${COUNT:-180}" \
    "$BUILD"/tests/ef_decode_bench --shape "$shape" --batches "$batch" --iters 400 --prefill 0 --no-breakdown \
    >"$OUT/ncu/${shape}_b$batch.csv" 2>"$OUT/ncu/${shape}_b$batch.err"
  echo "$shape b$batch rc=$?"
  timeout 60 "$BUILD"/tests/ef_decode_bench --shape "$shape" --batches "$batch" --iters 20 --prefill 0 --no-breakdown |
    grep -E "^decode"
  python3 scripts/accel/ncu_summary.py "$OUT/ncu/${shape}_b$batch.csv" | head -40
done
(cd "$OUT" && tar czf ncu.tgz ncu && rm -rf ncu)
