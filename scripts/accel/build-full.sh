#!/bin/bash
# Builds `expertflow` (CUDA, NCCL, MPI/UCX comm, HTTP server) on the accelerator machine in
# $BUILD (default build-gpu2), from the Debian packages carried in .deps/debs (the machine lacks the UCX headers
# and cpp-httplib; fetch them here first: bash ../shared/tools/accel-deps.sh .deps/debs).
# Source it (it exports LD_LIBRARY_PATH and the Open MPI/NCCL settings the runs need):
#
#   source scripts/accel/build-full.sh [extra ninja targets...]    logs under $OUT (or ./out)
#   EF_BUILD_TESTS=ON source scripts/accel/build-full.sh gpu_tests  (to run ctest -L gpu too)
# It sets ROOT (the unpacked packages), LIBDIR and BUILD for the caller.
#
# libucx-dev's libucp.so/libuct.so/libucs.so/libucm.so point at .so.0.0.0 files the carried
# packages do not hold; they are linked here to the machine's UCX 1.16 runtime. The machine has no
# brotli headers, so httplib is compiled without its brotli compressor.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
BUILD=${BUILD:-build-gpu2}
ROOT=$PWD/.deps/root
PCDIR=$PWD/.deps/pkgconfig
LIBDIR=$ROOT/usr/lib/x86_64-linux-gnu
SYSLIB=/usr/lib/x86_64-linux-gnu

rm -rf "$ROOT" "$PCDIR"
mkdir -p "$ROOT" "$PCDIR"
for f in .deps/debs/*.deb; do dpkg -x "$f" "$ROOT"; done
for pc in "$LIBDIR"/pkgconfig/*.pc; do
  sed -e "s|^prefix *= */usr|prefix=$ROOT/usr|" -e '/^Requires.private/d' "$pc" >"$PCDIR/$(basename "$pc")"
done
sed -i 's/ -DCPPHTTPLIB_BROTLI_SUPPORT//' "$PCDIR/cpp-httplib.pc"
for lib in ucp uct ucs ucm; do
  [[ -e $SYSLIB/lib$lib.so.0 ]] && ln -sfn "$SYSLIB/lib$lib.so.0" "$LIBDIR/lib$lib.so"
done
{
  echo "# host $(hostname), $(date -u +%FT%TZ), git $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1
  nvcc --version 2>&1 | tail -1
  mpirun --version 2>&1 | head -1
  nproc
  free -g | head -2
  df -h . | tail -1
} 2>&1 | tee "$OUT/env.txt"

t0=$(date +%s)
rm -f "$BUILD/CMakeCache.txt"  # pkg_check_modules caches its flags
PKG_CONFIG_PATH=$PCDIR cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEF_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DEF_BUILD_TESTS=${EF_BUILD_TESTS:-OFF} -DEF_HTTPLIB_INCLUDE="$ROOT/usr/include" \
  >"$OUT/configure.log" 2>&1 || { tail -40 "$OUT/configure.log"; return 1 2>/dev/null || exit 1; }
ninja -C "$BUILD" -j"$(nproc)" expertflow "$@" >"$OUT/build.log" 2>&1 ||
  { grep -E "error|FAILED|undefined" -A3 "$OUT/build.log" | head -80; return 1 2>/dev/null || exit 1; }
echo "build ok in $(($(date +%s) - t0)) s"
export LD_LIBRARY_PATH=$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
