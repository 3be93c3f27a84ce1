#!/usr/bin/env python3
"""Turns `expertflow bench` JSON records into whitespace-separated .dat tables for gnuplot.

  scripts/bench/json_to_dat.py RESULTS_DIR OUT_DIR

Writes OUT_DIR/<policy>.dat per policy (rows sorted by budget) and OUT_DIR/all.dat, with columns:
  budget_pct policy conc tokens_per_s hit_rate moved_mib stall_ms ttft_p50_ms itl_p50_ms
The uncached 100% record (policy "none") is appended to every policy's file as its 100% point.
Peer-baseline records (scripts/bench/hf_accelerate_baseline.py, "system": "hf-accelerate") go to
hf-accelerate.dat.
"""
import json
import os
import sys

COLUMNS = "budget_pct policy conc tokens_per_s hit_rate moved_mib stall_ms ttft_p50_ms itl_p50_ms"


def row(j):
    r = j["results"]
    c = j.get("cache", {})
    policy = j.get("system") or c.get("policy", "none")
    budget = 100.0 * c.get("budget_fraction", 1.0)
    return (budget, policy, j["workload"]["concurrency"], r["output_tokens_per_s"], r.get("hit_rate", 1.0),
            r.get("bytes_moved", 0) / 2**20, r.get("stall_ms", 0.0), r["ttft_ms_p50"], r["itl_ms_p50"])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    rows = []
    for name in sorted(os.listdir(src)):
        if name.endswith(".json") and not name.startswith("."):
            with open(os.path.join(src, name)) as f:
                rows.append(row(json.load(f)))
    if not rows:
        sys.exit(f"json_to_dat.py: no .json records in {src}")
    os.makedirs(dst, exist_ok=True)
    policies = sorted({r[1] for r in rows if r[1] != "none"}) or ["none"]
    full = [r for r in rows if r[1] == "none"]

    def write(path, rs):
        with open(path, "w") as f:
            f.write("# " + COLUMNS + "\n")
            for r in sorted(rs, key=lambda r: (r[2], r[0])):
                f.write("%.1f %s %d %.3f %.5f %.3f %.3f %.3f %.4f\n" % r)

    for p in policies:
        extra = full if p not in ("hf-accelerate",) else []
        write(os.path.join(dst, p + ".dat"), [r for r in rows if r[1] == p] + extra)
    write(os.path.join(dst, "all.dat"), rows)
    print(" ".join(p for p in policies))


if __name__ == "__main__":
    main()
