#!/usr/bin/env bash
# Builds ExpertFlow and runs the test suite that needs no GPU (labels unit and mpi).
# GPU tests: ctest --test-dir build -L 'gpu|multi_gpu' on a machine with NVIDIA GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
jobs=$(nproc 2>/dev/null || echo 2)
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} ${CMAKE_ARGS:-}
cmake --build "$BUILD_DIR" -j "$jobs"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ctest --test-dir "$BUILD_DIR" -L 'unit|mpi' -LE 'gpu|multi_gpu' --output-on-failure -j "$jobs" --timeout 600
