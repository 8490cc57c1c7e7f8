#!/usr/bin/env python3
"""Paired test-error differences of the local-loss grid (presets/local-loss-fmnist.toml).

    python3 scripts/local_loss_pairs.py results/local-loss-fmnist

For every rule, loss and K: the test error per seed, and Δ = (setting − reference of the same
seed, K and rule) in points for two references: the same rule under `ce` (what the loss
changes), and `dgl` under the same loss (what SGR changes). Only finished runs (summary.json).
"""
import json
import os
import sys

root = sys.argv[1]
err = {}
for cell in sorted(os.listdir(root)):
    path = os.path.join(root, cell, "summary.json")
    if not os.path.exists(path):
        continue
    s = json.load(open(path))
    c = s["config"]
    err[(c["rule"], c["local_loss"], c["modules"], c["seed"])] = 100 * (1 - s["test_accuracy"])
seeds = sorted({k[3] for k in err})


def row(label, a, b=None):
    per, deltas = [], []
    for s in seeds:
        if a + (s,) in err and (b is None or b + (s,) in err):
            v = err[a + (s,)] - (err[b + (s,)] if b else 0)
            per.append(f"s{s}: {v:+.2f}" if b else f"s{s}: {v:.2f}")
            deltas.append(v)
    mean = f"{sum(deltas) / len(deltas):+.2f}" if b and deltas else (
        f"{sum(deltas) / len(deltas):.2f}" if deltas else "–")
    return f"| {label} | {len(deltas)} | {', '.join(per) or '–'} | {mean} |"


print("| setting (K) | n | test error per seed (%) | mean |\n|---|---|---|---|")
for k in (4, 8):
    for rule in ("dgl", "sgr"):
        for loss in ("ce", "infopro", "predsim"):
            print(row(f"{rule} {loss} (K={k})", (rule, loss, k)))
print("\n| Δ (K) | n | Δ per seed (points) | mean Δ |\n|---|---|---|---|")
for k in (4, 8):
    for rule in ("dgl", "sgr"):
        for loss in ("infopro", "predsim"):
            print(row(f"{rule}: {loss} − ce (K={k})", (rule, loss, k), (rule, "ce", k)))
    for loss in ("ce", "infopro", "predsim"):
        print(row(f"{loss}: sgr − dgl (K={k})", ("sgr", loss, k), ("dgl", loss, k)))
