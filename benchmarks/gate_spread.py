"""How far the gates of each unit tell its filters apart, just before selection.

Reads a run's ``presel.pt`` (written by ``paam-train`` at the selection epoch) and prints, per
gated unit, the number of filters, the mean gate and the 10th / 50th / 90th percentiles of g.
A unit whose 10th–90th band is narrow ranks its filters by noise; a selection key that compares
units by g then keeps or cuts whole units (RESULTS.md, issue 18).

    python benchmarks/gate_spread.py runs/digits/paam [more runs ...]
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def spread(run: str) -> list[dict]:
    st = torch.load(os.path.join(run, "presel.pt"), map_location="cpu", weights_only=True)
    names = json.loads(st["last_gate_units"]) if "last_gate_units" in st else None
    rows = []
    for k, g in enumerate(st["last_gates"]):
        for r in range(g.shape[0]):
            v = g[r].double()
            v = v[v > 0]
            q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
            rows.append({"unit": names[k][r] if names else f"group {k} row {r}",
                         "filters": int(v.numel()), "mean": float(v.mean()),
                         "p10": q[0], "p50": q[1], "p90": q[2]})
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    for run in ap.parse_args().runs:
        print(f"## {run}\n\n| unit | filters | mean g | p10 | p50 | p90 |")
        print("|---|---|---|---|---|---|")
        for r in spread(run):
            print(f"| {r['unit']} | {r['filters']} | {r['mean']:.3f} | {r['p10']:.3f} | "
                  f"{r['p50']:.3f} | {r['p90']:.3f} |")
        print()
