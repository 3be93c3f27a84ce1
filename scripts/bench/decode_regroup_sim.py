#!/usr/bin/env python3
"""Decode-step regrouping, measured before it is built: does choosing which running sequences step
together cut the expert loads per generated token?

Model: S sequences decode at once (each a stream of tokens of a routing trace, one token a step);
each step runs B of them. Per MoE layer an LRU cache of N slots; a step loads every expert its B
tokens need that is not resident, after which the layer keeps its N most recent experts. Policies:
  fifo      the B sequences that waited longest (round robin: what continuous batching does)
  oracle    the B sequences whose *true* next-token routing needs the fewest non-resident experts
  previous  the same with each sequence's previous token's routing as the forecast (what a serving
            loop knows without a predictor)
A starvation bound: a sequence not run for `max_wait` steps is taken first. Output: loads per
generated token per policy and the saving against fifo, over regimes (B, S, N).

  scripts/bench/decode_regroup_sim.py TRACE.jsonl [--json OUT]
"""
import argparse
import collections
import json
import sys


def read_trace(path):
    seqs = collections.defaultdict(list)
    with open(path) as f:
        header = json.loads(f.readline())
        for line in f:
            t = json.loads(line)
            seqs[t["seq"]].append((t["pos"], t["experts"]))
    streams = [[e for _, e in sorted(v)] for _, v in sorted(seqs.items())]
    return header, [s for s in streams if len(s) >= 16]


class Lru:
    def __init__(self, layers, slots):
        self.slots = slots
        self.res = [collections.OrderedDict() for _ in range(layers)]

    def missing(self, layer, experts):
        return sum(1 for e in set(experts) if e not in self.res[layer])

    def access(self, layer, experts):
        """Loads the step's missing experts; afterwards the layer keeps its `slots` most recent."""
        loads = 0
        r = self.res[layer]
        for e in experts:
            if e in r:
                r.move_to_end(e)
            else:
                loads += 1
                r[e] = True
        while len(r) > self.slots:
            r.popitem(last=False)
        return loads


def simulate(streams, layers, policy, batch, running, slots, max_wait=8, steps=600):
    cache = Lru(layers, slots)
    pos = [0] * running            # next token of each running slot
    src = list(range(running))     # which stream each running slot plays (cycled)
    next_stream = running
    waited = [0] * running
    loads = tokens = 0
    order = list(range(running))
    for _ in range(steps):
        def need(i, which):
            s = streams[src[i] % len(streams)]
            p = pos[i] % len(s)
            if which == "previous":
                p = max(p - 1, 0)
            return s[p]
        if policy == "fifo":
            chosen = order[:batch]
            order = order[batch:] + chosen
        else:
            starving = [i for i in range(running) if waited[i] >= max_wait]
            rest = [i for i in range(running) if i not in starving]
            rest.sort(key=lambda i: sum(cache.missing(l, need(i, policy)[l]) for l in range(layers)))
            chosen = (starving + rest)[:batch]
        for l in range(layers):
            experts = sorted({e for i in chosen for e in need(i, "oracle")[l]})
            loads += cache.access(l, experts)
        for i in range(running):
            waited[i] = 0 if i in chosen else waited[i] + 1
        for i in chosen:
            pos[i] += 1
            tokens += 1
            if pos[i] >= len(streams[src[i] % len(streams)]):  # finished: a new sequence takes the slot
                src[i], pos[i] = next_stream, 0
                next_stream += 1
    return loads / tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--json")
    a = ap.parse_args()
    header, streams = read_trace(a.trace)
    layers, experts, k = header["num_layers"], header["num_experts"], header["top_k"]
    regimes = []
    for batch, running in ((4, 16), (8, 32), (16, 32)):
        for frac in (0.25, 0.5):
            slots = max(k, int(experts * frac))
            regimes.append((batch, running, slots))
    rows = []
    print(f"# {header.get('model', a.trace)}: {len(streams)} sequences, {layers} layers x {experts} experts, top-{k}")
    print(f"{'B':>3} {'S':>3} {'slots':>5} {'fifo':>8} {'oracle':>8} {'saved':>7} {'previous':>9} {'saved':>7}")
    for batch, running, slots in regimes:
        r = {p: simulate(streams, layers, p, batch, running, slots) for p in ("fifo", "oracle", "previous")}
        so = 1 - r["oracle"] / r["fifo"]
        sp = 1 - r["previous"] / r["fifo"]
        print(f"{batch:>3} {running:>3} {slots:>5} {r['fifo']:8.3f} {r['oracle']:8.3f} {100 * so:6.1f}% "
              f"{r['previous']:9.3f} {100 * sp:6.1f}%")
        rows.append({"batch": batch, "running": running, "slots_per_layer": slots, "loads_per_token": r,
                     "saved_oracle": so, "saved_previous": sp})
    if a.json:
        json.dump({"trace": a.trace, "regimes": rows}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
