#!/usr/bin/env bash
# Draws PNGs from a sweep's JSON records with gnuplot (Debian: gnuplot-nox).
#   scripts/bench/plot.sh RESULTS_DIR [PNG_DIR] [TITLE]
# Writes PNG_DIR/tokens_per_s_vs_budget.png and PNG_DIR/hit_rate_vs_budget.png (one line per
# policy; the 100% point is the uncached, all-resident run). PNG_DIR defaults to RESULTS_DIR.
set -euo pipefail
src=${1:?usage: plot.sh RESULTS_DIR [PNG_DIR] [TITLE]}
dst=${2:-$src}
title=${3:-expertflow bench}
command -v gnuplot >/dev/null || { echo "plot.sh: gnuplot not found (scripts/install-deps.sh installs gnuplot-nox)" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
dat=$(mktemp -d)
trap 'rm -rf "$dat"' EXIT
policies=$(python3 "$here/json_to_dat.py" "$src" "$dat")
mkdir -p "$dst"
gnuplot -e "datdir='$dat'; outdir='$dst'; policies='$policies'; plottitle='$title'" "$here/plot.gp"
echo "plot.sh: wrote $(ls "$dst"/*.png | tr "\n" " ")"
