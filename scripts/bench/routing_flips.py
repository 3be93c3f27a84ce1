#!/usr/bin/env python3
"""How much of a configuration's KL and top-1 disagreement comes from tokens whose routing changed.

Compares two `expertflow score --out` files of the same token ids (a reference and a
low-precision run): the share of tokens for which some MoE layer chose another set of experts, the
mean KL(reference || run) per token with and without such a change, and where the tokens whose
most likely next token differs fall.

  scripts/bench/routing_flips.py REF.json RUN.json
"""
import json
import math
import sys


def logsoftmax(v):
    m = max(v)
    z = m + math.log(sum(math.exp(x - m) for x in v))
    return [x - z for x in v]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip())
    ref, run = (json.load(open(p)) for p in sys.argv[1:3])
    ref_logits = [t for s in ref["logits"] for t in s]
    run_logits = [t for s in run["logits"] for t in s]
    if len(ref_logits) != len(run_logits) or len(ref["router_topk"]) != len(run["router_topk"]):
        sys.exit("the two files score different tokens or models")
    n, layers = len(ref_logits), len(ref["router_topk"])
    kl, differs = [], []
    for a, b in zip(ref_logits, run_logits):
        la, lb = logsoftmax(a), logsoftmax(b)
        kl.append(sum(math.exp(x) * (x - y) for x, y in zip(la, lb)))
        differs.append(max(range(len(a)), key=a.__getitem__) != max(range(len(b)), key=b.__getitem__))
    changed = [False] * n
    changed_layers = 0
    for layer in range(layers):
        for t in range(n):
            if set(ref["router_topk"][layer][t]) != set(run["router_topk"][layer][t]):
                changed[t] = True
                changed_layers += 1
    with_change = [k for k, c in zip(kl, changed) if c]
    without = [k for k, c in zip(kl, changed) if not c]
    total = sum(kl)
    print(f"{n} tokens, {layers} MoE layers; mean KL {total / n:.5f}")
    print(f"tokens with another expert set in some layer: {len(with_change)} ({100 * len(with_change) / n:.1f}%), "
          f"in {changed_layers} of {n * layers} token-layers ({100 * changed_layers / (n * layers):.2f}%)")
    print(f"their share of the KL: {sum(with_change) / total if total > 0 else 0:.3f}; mean KL per token "
          f"with a change {sum(with_change) / max(1, len(with_change)):.5f}, without {sum(without) / max(1, len(without)):.5f}")
    top1 = sum(differs)
    print(f"top-1 differs on {top1} tokens ({100 * top1 / n:.2f}%), "
          f"{sum(d and c for d, c in zip(differs, changed))} of them with a routing change")


if __name__ == "__main__":
    main()
