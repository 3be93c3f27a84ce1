#!/usr/bin/env python3
"""Compares two `expertflow score` JSON outputs: logits within a tolerance, router top-k equal."""
import json
import sys

a, b, tol = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), float(sys.argv[3])
worst = 0.0
for x, y in zip(a["logits"], b["logits"], strict=True):
    for rx, ry in zip(x, y, strict=True):
        for vx, vy in zip(rx, ry, strict=True):
            worst = max(worst, abs(vx - vy))
if a["router_topk"] != b["router_topk"]:
    sys.exit(f"router top-k differs between {sys.argv[1]} and {sys.argv[2]}")
if worst > tol:
    sys.exit(f"logits differ by {worst} > {tol} between {sys.argv[1]} and {sys.argv[2]}")
print(f"ok: max |logit diff| {worst}")
