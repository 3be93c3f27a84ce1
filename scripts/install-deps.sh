#!/usr/bin/env bash
# Installs every Debian package ExpertFlow needs to build and test (Debian 12 / Ubuntu 22.04+).
# The CUDA toolkit (nvcc, cuBLAS, NCCL) is optional and not installed here: when
# /usr/local/cuda is present the build enables the CUDA backend (EF_CUDA=AUTO).
# clang and libclang-rt-14-dev (libFuzzer and the sanitizer runtimes of Debian 12's clang 14)
# build the fuzz targets (scripts/fuzz.sh); the main build uses g++.
set -euo pipefail
pkgs=(
  build-essential cmake ninja-build pkg-config git
  libopenmpi-dev openmpi-bin
  libucx-dev ucx-utils
  libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libcpp-httplib-dev
  googletest libgtest-dev libgmock-dev
  curl python3 gnuplot-nox
  iproute2  # ip, tc: scripts/cluster/netns.sh (the multinode test)
  clang libclang-rt-14-dev
)
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#pkgs[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
