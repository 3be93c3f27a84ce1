#!/usr/bin/env bash
# Builds ExpertFlow (if needed) and runs the embedded default: tiny-code-moe from models/,
# two CPU ranks under mpirun, configured by configs/demo.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
if [ ! -x "$BUILD_DIR/expertflow" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$BUILD_DIR" -j "$(nproc 2>/dev/null || echo 2)"
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec mpirun -np 2 --oversubscribe "$BUILD_DIR/expertflow" generate --config configs/demo.yaml "$@"
