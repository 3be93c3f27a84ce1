#!/usr/bin/env python3
"""Turns `expertflow bench` JSON records into whitespace-separated .dat tables for gnuplot.

  scripts/bench/json_to_dat.py RESULTS_DIR OUT_DIR

Writes OUT_DIR/<mode>.dat per cache mode (policy, +predictor when one prefetches) (rows sorted by budget) and OUT_DIR/all.dat, with columns:
  budget_pct policy conc tokens_per_s hit_rate moved_mib stall_ms ttft_p50_ms itl_p50_ms
The uncached 100% record (policy "none") is appended to every policy's file as its 100% point.
Peer-baseline records (scripts/bench/hf_accelerate_baseline.py, "system": "hf-accelerate") go to
hf-accelerate.dat. Multi-rank records (`mpirun -np R expertflow bench`) go to scaling.dat instead:
  ranks assignment conc tokens_per_s tokens_per_s_per_rank a2a_bytes_per_token
"""
import json
import os
import sys

COLUMNS = "budget_pct policy conc tokens_per_s hit_rate moved_mib stall_ms ttft_p50_ms itl_p50_ms"


def row(j):
    r = j["results"]
    c = j.get("cache", {})
    policy = j.get("system") or c.get("policy", "none")
    predictor = c.get("predictor", "none")
    if policy not in ("none", "lru", "hf-accelerate") and predictor != "none":
        policy += "+" + predictor  # e.g. expertflow+lookahead, expertflow+oracle
    budget = 100.0 * c.get("budget_fraction", 1.0)
    return (budget, policy, j["workload"]["concurrency"], r["output_tokens_per_s"], r.get("hit_rate", 1.0),
            r.get("bytes_moved", 0) / 2**20, r.get("stall_ms", 0.0), r["ttft_ms_p50"], r["itl_ms_p50"])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    rows, scaling = [], []
    for name in sorted(os.listdir(src)):
        if name.endswith(".json") and not name.startswith("."):
            with open(os.path.join(src, name)) as f:
                j = json.load(f)
            ranks = j.get("ranks", 1)
            if ranks > 1 or (ranks == 1 and j.get("system") is None and j.get("assignment") and
                             j.get("cache", {}).get("policy", "none") == "none"):
                r = j["results"]
                scaling.append((ranks, j.get("assignment", "round_robin"), j["workload"]["concurrency"],
                                r["output_tokens_per_s"], r["output_tokens_per_s"] / ranks,
                                r.get("a2a_bytes_per_token", 0.0)))
            if ranks == 1:
                rows.append(row(j))
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
    if any(r[0] > 1 for r in scaling):
        with open(os.path.join(dst, "scaling.dat"), "w") as f:
            f.write("# ranks assignment conc tokens_per_s tokens_per_s_per_rank a2a_bytes_per_token\n")
            for r in sorted(scaling, key=lambda r: (r[1], r[2], r[0])):
                f.write("%d %s %d %.3f %.3f %.1f\n" % r)
    print(" ".join(p for p in policies))


if __name__ == "__main__":
    main()
