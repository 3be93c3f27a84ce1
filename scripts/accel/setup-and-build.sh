#!/bin/bash
# Configure and build the CUDA targets on the accelerator machine, then (unless --build-only)
# run the GPU tests and the decode benchmark, logging under $OUT (or ./out).
#
# The machine lacks the UCX headers and cpp-httplib that the top-level CMakeLists requires at
# configure time. Fetch their Debian packages here first (no network there):
#   bash ../shared/tools/accel-deps.sh .deps/debs
# and carry `.deps` in the run. This script unpacks them into .deps/root, points pkg-config at
# copies of their .pc files with the prefix rewritten, and builds only the targets that need
# neither library (ef_runtime, gpu_tests, ef_decode_bench), so nothing links the carried files.
#
#   scripts/accel/setup-and-build.sh [--build-only] [bench args...]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
BUILD_ONLY=0
if [[ "${1:-}" == "--build-only" ]]; then BUILD_ONLY=1; shift; fi

ROOT=$PWD/.deps/root
PCDIR=$PWD/.deps/pkgconfig
rm -rf "$ROOT" "$PCDIR"
mkdir -p "$ROOT" "$PCDIR"
for f in .deps/debs/*.deb; do dpkg -x "$f" "$ROOT"; done
for pc in "$ROOT"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc; do
  sed -e "s|^prefix *= */usr|prefix=$ROOT/usr|" -e '/^Requires.private/d' "$pc" >"$PCDIR/$(basename "$pc")"
done

{
  echo "# host $(hostname), $(date -u +%FT%TZ), git $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  nvcc --version 2>&1 | tail -1
  cmake --version | head -1
} | tee "$OUT/env.txt"

PKG_CONFIG_PATH=$PCDIR cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DEF_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DEF_HTTPLIB_INCLUDE="$ROOT/usr/include" >"$OUT/configure.log" 2>&1 ||
  { tail -40 "$OUT/configure.log"; exit 1; }
ninja -C build-gpu -j"$(nproc)" gpu_tests ef_decode_bench >"$OUT/build.log" 2>&1 ||
  { grep -E "error|FAILED" -A3 "$OUT/build.log" | head -80; exit 1; }
echo "build ok"
[[ $BUILD_ONLY == 1 ]] && exit 0

(cd build-gpu && ctest -L gpu --output-on-failure --timeout 300) 2>&1 | tee "$OUT/ctest.log" | tail -60
ctest_rc=${PIPESTATUS[0]}
# The per-fixture numbers the tests print.
(cd build-gpu && ./tests/gpu_tests --gtest_filter='CudaReferenceTest.*' 2>&1 | grep -E "^\[ [a-z0-9_]+ \]") |
  tee "$OUT/fixtures.txt"
(cd build-gpu && EF_CUDA_BF16_WEIGHTS=1 ./tests/gpu_tests --gtest_filter='CudaReferenceBf16.*' 2>&1 |
  grep -E "^\[ [a-z0-9_]+ \]|OK|FAILED") | tee -a "$OUT/fixtures.txt"

./build-gpu/tests/ef_decode_bench --json "$OUT/decode_bench.json" "$@" 2>&1 | tee "$OUT/decode_bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "ctest rc=$ctest_rc bench rc=$bench_rc"
exit $((ctest_rc | bench_rc))
