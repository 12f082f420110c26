"""Read every proxy run against the uniform-thinning curve, at its own parameters and MACs.

Uniform thinning at several budgets (the settings whose name starts with "uniform", plus dense
as the budget 1.0) gives, per seed, a curve of validation top-1 against parameters and one
against MACs (piecewise linear in log cost between measured points; no extrapolation, except
that a run up to 1% below the cheapest point is read at it, which can only count against it).  Every
other run is read against its own seed's curves at its own parameters and at its own MACs, and
the differences are paired over seeds: mean ± std, two-sided paired t and p.  A run outside a
curve's measured range gets no reading on that axis (shown as "—").

    python benchmarks/proxy_curve.py --results results/proxy2.jsonl --plot results/proxy2.png
    python benchmarks/proxy_curve.py --against uniform --setting "paam key=taylor both=0.3 beta=1"

``--against A --setting S``: S − A seed by seed (same seed, no curve), with the paired t and the
one-sided test of "the mean difference exceeds ``--margin``" (a figure "+1.0 or more").
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict


def load(paths: list[str]) -> list[dict]:
    rows, seen = [], set()
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            if (r["setting"], r["seed"]) not in seen:
                seen.add((r["setting"], r["seed"]))
                rows.append(r)
    return rows


def is_curve(r: dict) -> bool:
    """Dense and uniform thinning of the default coupling (grouped uniform thinning also cuts
    the residual stages: another family, read against the curve like any other run)."""
    name = r["setting"]
    return name == "dense" or (name.startswith("uniform") and "grouped" not in name)


# A run whose budget landed just below the curve's cheapest point (a budget holds within one
# filter, and uniform thinning's rounding differs from PAAM's: 80,376 vs 80,752 params at keep
# 0.3) is read at that point's accuracy if it is within this fraction below it.  That only makes
# the reading harder for the run (the curve is lower at fewer parameters); above the dearest
# point nothing is read.
BELOW_TOLERANCE = 0.01


def curve_at(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear interpolation in log(x) through (cost, accuracy) points; None outside
    the measured range, except just below its cheapest point (``BELOW_TOLERANCE``)."""
    pts = sorted(points)
    if pts and pts[0][0] * (1 - BELOW_TOLERANCE) <= x < pts[0][0]:
        return pts[0][1]
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return max(y0, y1)
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return pts[0][1] if x == pts[0][0] else None


def paired(diffs: list[float]) -> tuple[float, float, float | None]:
    """(mean, std, two-sided paired-t p) of per-seed differences."""
    n = len(diffs)
    m = sum(diffs) / n
    if n < 2:
        return m, 0.0, None
    sd = (sum((d - m) ** 2 for d in diffs) / (n - 1)) ** 0.5
    if sd == 0:
        return m, sd, 0.0
    from scipy import stats

    t = m / (sd / n ** 0.5)
    return m, sd, float(2 * stats.t.sf(abs(t), n - 1))


def one_sided_above(diffs: list[float], margin: float) -> float | None:
    """p of the one-sided paired t of mean(diffs) > margin (None below 2 seeds)."""
    n = len(diffs)
    if n < 2:
        return None
    m = sum(diffs) / n
    sd = (sum((d - m) ** 2 for d in diffs) / (n - 1)) ** 0.5
    if sd == 0:
        return 0.0 if m > margin else 1.0
    from scipy import stats

    return float(stats.t.sf((m - margin) / (sd / n ** 0.5), n - 1))


def against(rows: list[dict], setting: str, base: str) -> list[tuple[int, dict, dict]]:
    """(seed, row of ``setting``, row of ``base``) for every seed that has both."""
    by = {(r["setting"], r["seed"]): r for r in rows}
    return [(seed, by[(setting, seed)], by[(base, seed)])
            for seed in sorted({s for (_, s) in by})
            if (setting, seed) in by and (base, seed) in by]


def against_text(rows: list[dict], setting: str, base: str, margin: float) -> str:
    pairs = against(rows, setting, base)
    if not pairs:
        return f"no seed has both {setting!r} and {base!r}"
    lines, diffs = [], []
    for seed, r, b in pairs:
        diffs.append(100 * (r["val_top1"] - b["val_top1"]))
        lines.append(f"seed {seed}: {100 * r['val_top1']:.2f} vs {100 * b['val_top1']:.2f} "
                     f"({diffs[-1]:+.2f}); params {r['params']:,} vs {b['params']:,}, "
                     f"MACs {r['flops']:,} vs {b['flops']:,}")
    m, sd, p = paired(diffs)
    q = one_sided_above(diffs, margin)
    lines.append(f"{setting} − {base}: {m:+.2f} ± {sd:.2f} pts, n = {len(diffs)}"
                 + (f", two-sided p = {p:.3f}, one-sided p(mean > {margin:+.1f}) = {q:.3f}"
                    if p is not None else ""))
    return "\n".join(lines)


def readings(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per setting, per axis ("params", "flops"): the per-seed differences to the curve."""
    curves: dict[int, dict[str, list]] = defaultdict(lambda: {"params": [], "flops": []})
    for r in rows:
        if is_curve(r):
            for ax in ("params", "flops"):
                curves[r["seed"]][ax].append((r[ax], r["val_top1"]))
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"params": [], "flops": []})
    for r in rows:
        if is_curve(r) or r["seed"] not in curves:
            continue
        for ax in ("params", "flops"):
            c = curve_at(curves[r["seed"]][ax], r[ax])
            if c is not None:
                out[r["setting"]][ax].append(100 * (r["val_top1"] - c))
    return out


def table(rows: list[dict]) -> str:
    by = defaultdict(list)
    for r in rows:
        by[r["setting"]].append(r)
    rd = readings(rows)
    lines = ["| setting | seeds | val top-1 (mean ± std) | params | MACs | − uniform curve at "
             "its params (pts, n, p) | − uniform curve at its MACs (pts, n, p) |",
             "|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
        accs = [100 * r["val_top1"] for r in rs]
        m = sum(accs) / len(accs)
        sd = (sum((a - m) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0
        cells = []
        for ax in ("params", "flops"):
            d = rd.get(name, {}).get(ax, [])
            if not d:
                cells.append("—")
                continue
            mm, ss, p = paired(d)
            cells.append(f"{mm:+.2f} ± {ss:.2f}, {len(d)}" + (f", p={p:.3f}" if p is not None
                                                                else ""))
        lines.append(f"| {name} | {len(rs)} | {m:.2f} ± {sd:.2f} | "
                     f"{sum(r['params'] for r in rs) / len(rs):,.0f} | "
                     f"{sum(r['flops'] for r in rs) / len(rs):,.0f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def replace_table(text: str, new_table: str) -> str:
    """`text` with its table that starts with `new_table`'s header line replaced by `new_table`
    (the table ends at the first line that is not a table row). So RESULTS.md's table is
    regenerated from the rows, never edited by hand."""
    header = new_table.splitlines()[0]
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == header]
    if len(starts) != 1:
        raise ValueError(f"expected one table with the header {header!r}, found {len(starts)}")
    end = starts[0]
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "".join(lines[:starts[0]]) + new_table + "\n" + "".join(lines[end:])


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = sorted({r["setting"] for r in rows}, key=lambda n: (not is_curve({"setting": n}), n))
    markers = "os^vD<>pP*hX"
    for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], "flops", "MACs")):
        for seed in sorted({r["seed"] for r in rows}):
            pts = sorted((r[key], 100 * r["val_top1"]) for r in rows
                         if is_curve(r) and r["seed"] == seed)
            if pts:
                ax.plot(*zip(*pts), color="#999999", lw=1, alpha=0.7,
                        label="uniform curve (per seed)" if seed == min(r["seed"] for r in rows)
                        else None)
        for i, name in enumerate(n for n in names if not is_curve({"setting": n})):
            rs = [r for r in rows if r["setting"] == name]
            ax.scatter([r[key] for r in rs], [100 * r["val_top1"] for r in rs], s=22,
                       marker=markers[i % len(markers)], label=name)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("every run against uniform thinning, at its own parameters and MACs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", nargs="+", default=["results/proxy2.jsonl"])
    ap.add_argument("--plot", default=None, help="write the two-panel PNG here")
    ap.add_argument("--against", default=None, help="pair --setting with this setting, seed by "
                    "seed, instead of printing the table")
    ap.add_argument("--setting", default=None)
    ap.add_argument("--margin", type=float, default=1.0, help="the one-sided test's margin, pts")
    ap.add_argument("--into", default=None, help="replace the table in this markdown file "
                    "(e.g. RESULTS.md) instead of printing it")
    a = ap.parse_args()
    rows = load(a.results)
    if a.against:
        if not a.setting:
            ap.error("--against needs --setting")
        print(against_text(rows, a.setting, a.against, a.margin))
    elif a.into:
        with open(a.into) as f:
            text = replace_table(f.read(), table(rows))
        with open(a.into, "w") as f:
            f.write(text)
    else:
        print(table(rows))
    if a.plot:
        plot(rows, a.plot)
