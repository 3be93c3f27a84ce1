#!/usr/bin/env bash
# Builds ExpertFlow and runs the test suite that needs no GPU (labels unit and mpi); fails if any
# of those tests was skipped.
# GPU tests: ctest --test-dir build -L 'gpu|multi_gpu' on a machine with NVIDIA GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
jobs=$(nproc 2>/dev/null || echo 2)
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} ${CMAKE_ARGS:-}
cmake --build "$BUILD_DIR" -j "$jobs"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
log="$BUILD_DIR/ctest-cpu.log"
ctest --test-dir "$BUILD_DIR" -L 'unit|mpi' -LE 'gpu|multi_gpu' --output-on-failure -j "$jobs" --timeout 600 |
  tee "$log"
# Every file a CPU test reads is in the repository (tests/data, models/): none may skip.
if grep -E '\*\*\*Skipped|Not Run' "$log"; then
  echo "test.sh: the tests above were skipped; every test without the gpu/multi_gpu label must run" >&2
  exit 1
fi
