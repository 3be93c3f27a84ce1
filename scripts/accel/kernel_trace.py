#!/usr/bin/env python3
"""Summarises an Nsight Systems cuda_gpu_trace CSV: per kernel name the count, total and mean device
time and the mean idle gap before it; then one stretch of the timeline (the last window of kernels
before the final step's largest kernel), kernel by kernel with its gap.

    kernel_trace.py TRACE.csv [--window 60]
"""
import csv
import re
import sys
from collections import OrderedDict


def short(name):
    name = re.sub(r"\(.*", "", name)  # drop argument lists
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"ef::runtime::cuda::(\(anonymous namespace\)::)?", "", name)
    return name[:90]


def main():
    path = sys.argv[1]
    window = int(sys.argv[sys.argv.index("--window") + 1]) if "--window" in sys.argv else 60
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            name = r.get("Name", "")
            if r.get("Grid X") in (None, "") and not name:
                continue
            start = float(r["Start (ns)"])
            dur = float(r["Duration (ns)"])
            is_kernel = r.get("Grid X", "") not in ("", None)
            rows.append((start, dur, short(name) if is_kernel else "[" + name + "]"))
    rows.sort()
    stats = OrderedDict()
    prev_end = None
    gaps = []
    for start, dur, name in rows:
        gap = 0.0 if prev_end is None else max(0.0, start - prev_end)
        gaps.append(gap)
        s = stats.setdefault(name, [0, 0.0, 0.0])
        s[0] += 1
        s[1] += dur
        s[2] += gap
        prev_end = max(prev_end or 0.0, start + dur)
    total = sum(s[1] for s in stats.values())
    print(f"{'kernel':90s} {'count':>6s} {'total us':>10s} {'mean us':>9s} {'gap us':>8s}")
    for name, (n, t, g) in sorted(stats.items(), key=lambda kv: -kv[1][1])[:40]:
        print(f"{name:90s} {n:6d} {t / 1e3:10.1f} {t / n / 1e3:9.2f} {g / n / 1e3:8.2f}")
    print(f"{'all':90s} {len(rows):6d} {total / 1e3:10.1f}   gaps total {sum(gaps) / 1e3:.1f} us")
    end = len(rows)
    print(f"\n# the last {window} operations")
    for i in range(max(0, end - window), end):
        start, dur, name = rows[i]
        print(f"{(start - rows[max(0, end - window)][0]) / 1e3:10.2f} {dur / 1e3:8.2f} gap {gaps[i] / 1e3:7.2f}  {name}")


if __name__ == "__main__":
    main()
