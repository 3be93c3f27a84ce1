#!/usr/bin/env python3
"""Replays a moe-routing-trace through the cost model of cache.cpu_compute auto at batch 1, with and
without the admission rule (cache.cpu_compute_admit, cache/host_share_plan.h), and prints the model's
time per token and misses per token. An estimate to choose what to measure, not a measurement.

Per layer and token: the misses go, in order, to whichever path finishes them first (the copy
engine at COPY ms per expert, the host at HOST ms), then one expert of the host's path is split
so both end together (host_share_plan.h); an admitted miss is copied whole. Without admission the
slots keep their first content (the run's warm-up; here a random set, SEEDS of them); with it a
miss with at least MARGIN more uses than the least used resident expert the step does not need
replaces it (use counts never decay, one per expert and step; ties: the lowest id).

  scripts/bench/host_admission_sim.py tests/data/traces/mixtral8x7b_gsm8k_decode.jsonl \\
      [--slots 4] [--copy-ms 6.35] [--host-ms 3.5] [--margins 1,2,3] [--tokens N] [--seeds 3]
"""
import argparse
import json
import random


def layer_ms(misses, admitted, copy, host):
    c = admitted * copy
    h = 0.0
    for _ in range(misses - admitted):
        if c + copy <= h + host:
            c += copy
        else:
            h += host
    end = max(c, h)
    if misses > admitted and h >= c and h > 0:  # split the host's last expert
        h0 = h - host
        f = max(0.0, min(0.5, (h0 + host - c) / (copy + host)))
        end = min(end, max(c + f * copy, h0 + (1 - f) * host))
    return end


def run(tokens, experts, slots, copy, host, margin, seed):
    rng = random.Random(seed)
    layers = len(tokens[0])
    cache = [set(rng.sample(range(experts), slots)) for _ in range(layers)]
    uses = [[0] * experts for _ in range(layers)]
    total = misses = loads = 0
    for t in tokens:
        for l, used in enumerate(t):
            for e in set(used):
                uses[l][e] += 1
            miss = [e for e in used if e not in cache[l]]
            admitted = 0
            if margin:
                evictable = [v for v in cache[l] if v not in used]
                for e in miss:
                    if not evictable:
                        break
                    v = min(evictable, key=lambda v: (uses[l][v], v))
                    if uses[l][e] >= uses[l][v] + margin:
                        cache[l].remove(v)
                        cache[l].add(e)
                        evictable.remove(v)
                        admitted += 1
                        loads += 1
                        break  # one admission per layer and step, as the runtime does
            misses += len(miss)
            total += layer_ms(len(miss), admitted, copy, host)
    n = len(tokens)
    return total / n, misses / n, loads


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--copy-ms", type=float, default=6.35)
    ap.add_argument("--host-ms", type=float, default=3.5)
    ap.add_argument("--margins", default="1,2,3")
    ap.add_argument("--tokens", type=int, default=0, help="the first N tokens only (0: all)")
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    with open(a.trace) as f:
        head = json.loads(f.readline())
        tokens = [json.loads(line)["experts"] for line in f if line.strip()]
    if a.tokens:
        tokens = tokens[: a.tokens]
    experts = head["num_experts"]
    print(f"# {a.trace}: {len(tokens)} tokens, {len(tokens[0])} layers, {a.slots} of {experts} slots, "
          f"copy {a.copy_ms} ms, host {a.host_ms} ms per expert")
    print(f"{'rule':<14} {'ms/token (per seed)':<28} {'misses/token':>13} {'loads':>7}")
    for margin in [0] + [int(m) for m in a.margins.split(",")]:
        rs = [run(tokens, experts, a.slots, a.copy_ms, a.host_ms, margin, s) for s in range(a.seeds)]
        name = "frozen slots" if margin == 0 else f"admit, M={margin}"
        ms = ", ".join(f"{r[0]:.1f}" for r in rs)
        print(f"{name:<14} {ms:<28} {sum(r[1] for r in rs) / len(rs):13.1f} {sum(r[2] for r in rs) / len(rs):7.0f}")


if __name__ == "__main__":
    main()
