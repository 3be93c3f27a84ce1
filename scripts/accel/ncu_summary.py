#!/usr/bin/env python3
"""Summarises an Nsight Compute CSV of gpu__time_duration.sum rows (scripts/accel/ncu-decode.sh):
per kernel name and grid the count and mean device time, largest total first.

    ncu_summary.py RUN.csv
"""
import csv
import io
import re
import sys
from collections import OrderedDict


def short(name):
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"ef::runtime::cuda::(\(anonymous namespace\)::)?", "", name)
    return name[:80]


def main():
    path = sys.argv[1]
    text = open(path, errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        print(f"{path}: no ncu rows")
        return
    rows = [r for r in csv.DictReader(io.StringIO(text[start:])) if r.get("Metric Name") == "gpu__time_duration.sum"]
    per = OrderedDict()
    total = 0.0
    for r in rows:
        us = float(r["Metric Value"].replace(",", ""))
        if r["Metric Unit"] in ("ns", "nsecond"):
            us /= 1e3
        elif r["Metric Unit"] in ("ms", "msecond"):
            us *= 1e3
        k = short(r["Kernel Name"]) + " grid " + r["Grid Size"]
        c, t = per.get(k, (0, 0.0))
        per[k] = (c + 1, t + us)
        total += us
    print(f"{path}: {len(rows)} kernels, {total:.1f} us of device time")
    for k, (c, t) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"  {t / max(c, 1):9.2f} us x {c:4d}  {k}")


if __name__ == "__main__":
    main()
