#!/usr/bin/env python3
"""Keeps the first L layers of a moe-routing-trace (for a model of L layers routed by a deeper one).

  scripts/bench/slice_trace.py SRC.jsonl DST.jsonl L
"""
import json
import sys


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, dst, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(src) as f, open(dst, "w") as g:
        h = json.loads(f.readline())
        if layers > h["num_layers"]:
            sys.exit(f"{src} has {h['num_layers']} layers, fewer than {layers}")
        h["num_layers"] = layers
        g.write(json.dumps(h) + "\n")
        for line in f:
            t = json.loads(line)
            t["experts"] = t["experts"][:layers]
            if "weights" in t:
                t["weights"] = t["weights"][:layers]
            g.write(json.dumps(t) + "\n")


if __name__ == "__main__":
    main()
