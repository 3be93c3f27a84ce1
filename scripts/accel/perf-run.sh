#!/bin/bash
# On a machine with >= 2 GPUs: build the full project (CUDA + MPI/UCX/NCCL comm, as nccl-check.sh
# does, against the carried packages of .deps/debs) with the GPU tests and benchmarks in
# build-perf-gpu, then run ef_decode_bench, ef_a2a_bench under mpirun -np NP and `ctest -L gpu`.
#
#   scripts/accel/perf-run.sh [NP]        logs and JSON under $OUT (or ./out)
#
# Each step has its own timeout so one slow step leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
NP=${1:-2}
BUILD=build-perf-gpu

ROOT=$PWD/.deps/root
PCDIR=$PWD/.deps/pkgconfig
LIBDIR=$ROOT/usr/lib/x86_64-linux-gnu
SYSLIB=/usr/lib/x86_64-linux-gnu

# (1) Unpack the carried packages; rewrite the .pc prefixes; httplib without brotli (nccl-check.sh).
rm -rf "$ROOT" "$PCDIR"
mkdir -p "$ROOT" "$PCDIR"
for f in .deps/debs/*.deb; do dpkg -x "$f" "$ROOT"; done
for pc in "$LIBDIR"/pkgconfig/*.pc; do
  sed -e "s|^prefix *= */usr|prefix=$ROOT/usr|" -e '/^Requires.private/d' "$pc" >"$PCDIR/$(basename "$pc")"
done
sed -i 's/ -DCPPHTTPLIB_BROTLI_SUPPORT//' "$PCDIR/cpp-httplib.pc"

# (2) UCX development symlinks to the machine's runtime.
{
  echo "# host $(hostname), $(date -u +%FT%TZ), git $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1
  nvcc --version 2>&1 | tail -1
  mpirun --version 2>&1 | head -1
  for lib in ucp uct ucs ucm; do
    if [[ -e $SYSLIB/lib$lib.so.0 ]]; then ln -sfn "$SYSLIB/lib$lib.so.0" "$LIBDIR/lib$lib.so"; else echo "missing: $SYSLIB/lib$lib.so.0"; fi
  done
} 2>&1 | tee "$OUT/env.txt"

# (3) Configure (tests on) and build.
t0=$(date +%s)
rm -f $BUILD/CMakeCache.txt
PKG_CONFIG_PATH=$PCDIR cmake -S . -B $BUILD -G Ninja -DCMAKE_BUILD_TYPE=Release -DEF_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DEF_HTTPLIB_INCLUDE="$ROOT/usr/include" >"$OUT/configure.log" 2>&1 ||
  { tail -40 "$OUT/configure.log"; exit 1; }
ninja -C $BUILD -j"$(nproc)" expertflow gpu_tests ef_decode_bench ef_a2a_bench >"$OUT/build.log" 2>&1 ||
  { grep -E "error|FAILED|undefined" -A3 "$OUT/build.log" | head -80; exit 1; }
echo "build ok in $(($(date +%s) - t0)) s"

export LD_LIBRARY_PATH=$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0

# (4) Decode benchmark on GPU 0.
t0=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 150 $BUILD/tests/ef_decode_bench --json "$OUT/decode_bench.json" 2>&1 |
  tee "$OUT/decode_bench.txt"
echo "decode bench rc=${PIPESTATUS[0]} in $(($(date +%s) - t0)) s"

# (5) Exchange vs raw NCCL all-to-all.
t0=$(date +%s)
timeout 90 mpirun -np "$NP" -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH --oversubscribe \
  $BUILD/tests/ef_a2a_bench --json "$OUT/a2a_bench.json" 2>&1 | tee "$OUT/a2a_bench.txt"
echo "a2a bench rc=${PIPESTATUS[0]} in $(($(date +%s) - t0)) s"

# (6) GPU tests (ops vs CPU, CUDA backend, engine on CUDA vs fixtures).
t0=$(date +%s)
(cd $BUILD && timeout 200 ctest -L gpu --output-on-failure -j4 >"$OUT/ctest_gpu.log" 2>&1)
echo "ctest rc=$? in $(($(date +%s) - t0)) s"
grep -E "tests passed|tests failed|Failed|\*\*\*|Timeout" "$OUT/ctest_gpu.log" | tail -20
