"""Latency budgets (issue 20): how well a latency table predicts the networks it selects.

    python -m paam_fast.bench.latency --arch resnet50 --size 224 --batch 1 --keeps 0.3 0.5 0.7
    python -m paam_fast.bench.latency --arch resnet20 --size 32 --batch 256 --table t.json
    python -m paam_fast.bench.latency --arch resnet50 --batch 256 --dtype bfloat16 --channels-last

Side by side in one run, every network exported to plain torch and measured interleaved (round
by round, so a drifting machine load moves them all alike): the dense network; PAAM's global
selection at ``keep`` × the table's dense latency (from random gates: this measures the
prediction, not accuracy); and the uniform baseline (every unit thinned alike) matched to the
PAAM network's *measured* latency (started at the same predicted budget, then corrected by the
measured ratio).  Printed: predicted and measured ms, the prediction's error, the ratio to dense.
With ``--verify-iters N`` PAAM's budget is met as measured (:mod:`paam_fast.measured_budget`):
its network is measured against dense and, while over ``keep``, selected again at a budget
scaled by ``keep`` / its measured ratio (each try in the row's ``measured_budget``).
With ``--refit-in-window`` the networks the table's fit was made from (every unit at an eighth
... three quarters of its width) are measured again beside them, the fit is redone on those
measurements, and each row also gets that in-window prediction: its error is the table's and
the fit's alone, free of the machine's speed drifting between the table and the final
measurement (on the 2-core CPU the dense network moved −25% to +14% within minutes).
Writes one JSON.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch

import paam_fast as pf
from paam_fast.latency import CHECKED, LatencyTable, _fraction_alive, latency_table, measure_like
from paam_fast.measured_budget import measured_ratio, select_measured
from paam_fast.paamify import controller
from paam_fast.selection import choose, uniform_alive

from .harness import write_json


def _widths(structure, alive: dict) -> dict[int, int]:
    w = structure.widths()
    for u in structure.units:
        w[u.id] = int(alive[u.name].sum())
    return w


def _plain(model, alive: dict):
    cp = copy.deepcopy(model)
    pf.apply_masks(cp, alive)
    return pf.export(cp)


def _uniform(ctrl, table, keep: float, round_to: int) -> dict | None:
    try:
        return uniform_alive(ctrl.units, ctrl.structure, min(keep, 1.0), "latency", round_to,
                             latency=table)
    except ValueError:  # even one filter per unit is over this budget
        return None


CURVE_NETS = tuple(name for name, _ in CHECKED)  # the table's measured networks, fitted or not


def _anchor_models(model, ctrl) -> dict:
    """CHECKED's networks (every unit at that fraction of its width), named "@<fraction>"."""
    return {f"@{name}": _plain(model, _fraction_alive(ctrl.units, frac))
            for name, frac in CHECKED}


def _in_window(table: LatencyTable, got: dict, rows: dict) -> LatencyTable:
    """The table's fit redone on the dense and CHECKED networks as measured in ``got`` (beside
    the rows); every row gains ``predicted_ms_window`` (its layers' sum through that fit) and
    ``error_window``.  Returns the refitted table."""
    win = LatencyTable.from_json(table.to_json())
    win.dense_ms = got["dense"]["median_ms"]
    for name in CURVE_NETS:
        win.check[name]["measured_ms"] = got[f"@{name}"]["median_ms"]
    win = win.refit(table.meta.get("fit", "rest"))
    for name, row in rows.items():
        row["predicted_ms_window"] = win.ms_of(table.layers_for(row["predicted_ms"]))
        row["error_window"] = got[name]["median_ms"] / row["predicted_ms_window"] - 1
    return win


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                    help="budgets: fractions of the table's dense latency")
    ap.add_argument("--round-to", type=int, default=8, help="kept widths in multiples of this")
    ap.add_argument("--table", default=None, help="a saved latency table (default: measure one)")
    ap.add_argument("--save-table", default=None, help="write the measured table here")
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=11, help="interleaved rounds of the final "
                    "measurement")
    ap.add_argument("--match-iters", type=int, default=2, help="corrections of the uniform "
                    "network's budget towards PAAM's measured latency")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the inference dtype timed (a GPU's: bfloat16)")
    ap.add_argument("--coupling", default="internal", choices=["internal", "grouped"],
                    help="grouped: residual channels are units too (lower budgets reachable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit", default="curve", choices=["rest", "scale", "curve"],
                    help="rest: fixed = dense minus the layers' sum; scale: fixed and a scale "
                    "fitted to the dense and half-width networks; curve: piecewise linear "
                    "through the dense, 3/4-, 1/2-, 3/8-, 1/4- and 1/8-width networks "
                    "(paam_fast.latency)")
    ap.add_argument("--verify-iters", type=int, default=0,
                    help="PAAM's budget met as measured: while its network measures over keep "
                    "of dense, select again at keep / measured ratio times the budget, at most "
                    "this many times (paam_fast.measured_budget; 0: the table's choice)")
    ap.add_argument("--verify-rounds", type=int, default=5,
                    help="interleaved rounds of each of those measurements")
    ap.add_argument("--refit-in-window", action="store_true",
                    help="measure the table's fitted networks again beside the chosen ones and "
                    "also predict from a fit to those (the error without the machine's drift)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: the process's CPU time (one CPU thread on a shared machine)")
    return ap


def _table(a, model, size, dev):
    """The latency table (read, or measured and optionally saved), described; (table, s)."""
    t0 = time.time()
    if a.table:
        table = LatencyTable.load(a.table, model)
    else:
        table = latency_table(model, size, batch=a.batch, device=dev, grid=a.grid,
                              repeats=a.repeats, channels_last=a.channels_last, clock=a.clock,
                              fit=a.fit, dtype=getattr(torch, a.dtype), round_to=a.round_to)
        if a.save_table:
            table.save(a.save_table)
    table_s = time.time() - t0
    print(table.describe(), f"({table_s:.0f} s)" if not a.table else "(read)")
    if "warning" in table.meta:
        print("WARNING:", table.meta["warning"])
    for name, c in (table.check or {}).items():
        if isinstance(c, dict):
            print(f"table check, every unit at {name.replace('_', '-')} width"
                  f"{' (fitted to it)' if c['fitted'] else ''}: predicted "
                  f"{c['predicted_ms']:.2f} ms, measured {c['measured_ms']:.2f} ms "
                  f"({c['error']:+.1%})")
    return table, table_s


def _match_uniform(a, ctrl, table, model, paam_net, keep, dev):
    """The uniform baseline at PAAM's measured latency: start at the same predicted budget,
    then scale the budget by measured(PAAM) / measured(uniform); (masks, budget) of the
    closest match measured, or None."""
    k_u, best, found = keep, math.inf, None
    for _ in range(a.match_iters + 1):
        uni = _uniform(ctrl, table, k_u, a.round_to)
        if uni is None:
            break
        got = measure_like(table, {"p": paam_net, "u": _plain(model, uni)}, dev, rounds=7)
        ratio = got["p"]["median_ms"] / got["u"]["median_ms"]
        if abs(ratio - 1) < best:  # the closest match measured
            best = abs(ratio - 1)
            found = (uni, k_u)
        if abs(ratio - 1) < 0.02:
            break
        k_u = k_u * ratio
    return found


def _unit_widths(ctrl, alive) -> dict[str, int]:
    return {u.name: int(alive[u.name].sum()) for u in ctrl.units}


def _networks(a, model, ctrl, table, dev):
    """Dense, PAAM at each budget (random gates) and uniform matched to PAAM's measured latency:
    (rows, networks, skipped budgets)."""
    gen = torch.Generator().manual_seed(a.seed)
    gates = [torch.rand(u.width, generator=gen) * 0.9 + 0.05 for u in ctrl.units]
    alive_all = [torch.ones(u.width, dtype=torch.bool) for u in ctrl.units]
    dense = pf.export(model)
    rows = {"dense": {"keep": 1.0, "predicted_ms": table.dense_ms}}
    models = {"dense": dense}
    skipped = {}
    for keep in a.keeps:
        def select(budget):
            return choose(ctrl.units, gates, alive_all, ctrl.structure, ctrl.widths(),
                          keep=budget, cost="latency", latency=table, round_to=a.round_to)

        def measured(sel):  # the chosen network over dense, measured side by side
            return measured_ratio(table, dense, _plain(model, sel.alive), dev, a.verify_rounds)

        try:
            sel, tries = (select_measured(select, measured, keep, iters=a.verify_iters)
                          if a.verify_iters else (select(keep), None))
        except ValueError as e:  # below what this coupling can remove
            print(f"keep {keep:g}: skipped ({e})")
            skipped[str(keep)] = str(e)
            continue
        name = f"paam@{keep:g}"
        models[name] = _plain(model, sel.alive)
        rows[name] = {"keep": keep, "predicted_ms": sel.latency_ms,
                      "widths": _unit_widths(ctrl, sel.alive)}
        if tries is not None:
            rows[name]["measured_budget"] = tries
            print(f"{name}: budgets tried " + ", ".join(
                f"{h['budget']:.3f} -> measured {h['measured']:.3f}" if "measured" in h
                else f"{h['budget']:.3f} -> {h['error']}" for h in tries))
        found = _match_uniform(a, ctrl, table, model, models[name], keep, dev)
        if found is not None:
            uni, k_u = found
            uname = f"uniform@{keep:g}"
            models[uname] = _plain(model, uni)
            rows[uname] = {"keep": k_u, "predicted_ms": table.predict(
                ctrl.structure, _widths(ctrl.structure, uni)), "widths": _unit_widths(ctrl, uni)}
    return rows, models, skipped


def _read(rows, got, table, models, size):
    """Each row's measured figures, errors and counts; returns the other fit (or None)."""
    d = got["dense"]["median_ms"]
    # the same networks predicted by another fit of the same measurements
    other = {"rest": "scale", "scale": "curve", "curve": "scale"}[table.meta.get("fit", "rest")]
    alt = table.refit(other) if table.check and "half" in table.check else None
    for name, row in rows.items():
        g = got[name]
        if alt is not None:
            p_alt = alt.ms_of(table.layers_for(row["predicted_ms"]))
            row[f"predicted_ms_{alt.meta['fit']}"] = p_alt
            row[f"error_{alt.meta['fit']}"] = g["median_ms"] / p_alt - 1
            row[f"error_vs_dense_{alt.meta['fit']}"] = \
                (g["median_ms"] / d) / (p_alt / alt.dense_ms) - 1
        row.update(measured_ms=g["median_ms"], p20_ms=g["p20_ms"], p80_ms=g["p80_ms"],
                   error=g["median_ms"] / row["predicted_ms"] - 1,
                   ratio_to_dense_measured=g["median_ms"] / d,
                   ratio_to_dense_predicted=row["predicted_ms"] / table.dense_ms,
                   # the error of the ratio to dense: free of the machine's load drifting
                   # between the table's measurement and this one
                   error_vs_dense=(g["median_ms"] / d) / (row["predicted_ms"] / table.dense_ms)
                   - 1,
                   **pf.count(models[name], size))
    return alt


def _print_rows(rows, alt_fit) -> None:
    print(f"{'network':>14s} {'budget':>7s} {'predicted':>10s} {'measured':>10s} {'error':>7s} "
          f"{'÷dense':>7s} {'÷dense err':>10s} {'params':>11s} {'MACs':>14s}"
          + (f"   [fit {alt_fit}: predicted, error, ÷dense err]" if alt_fit else ""))
    for name, r in rows.items():
        print(f"{name:>14s} {r['keep']:7.3f} {r['predicted_ms']:8.2f}ms {r['measured_ms']:8.2f}ms "
              f"{r['error']:+7.1%} {r['ratio_to_dense_measured']:7.3f} "
              f"{r['error_vs_dense']:+10.1%} {r['params']:11,} {r['flops']:14,}"
              + (f"   {r[f'predicted_ms_{alt_fit}']:8.2f}ms {r[f'error_{alt_fit}']:+7.1%} "
                 f"{r[f'error_vs_dense_{alt_fit}']:+7.1%}" if alt_fit else ""))


def main(argv=None) -> dict:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.verify_iters < 0 or a.verify_rounds < 1:
        ap.error("--verify-iters must be >= 0 and --verify-rounds >= 1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    size = (1, 3, a.size, a.size)
    model = pf.paamify(pf.models.get_model(a.arch, num_classes=a.num_classes), input_size=size,
                       coupling=a.coupling)
    ctrl = controller(model)
    table, table_s = _table(a, model, size, dev)
    rows, models, skipped = _networks(a, model, ctrl, table, dev)
    in_window = a.refit_in_window and all(n in (table.check or {}) for n in CURVE_NETS)
    if a.refit_in_window and not in_window:
        print("--refit-in-window: the table has no measured networks to refit to (skipped)")
    got = measure_like(table, {**models, **(_anchor_models(model, ctrl) if in_window else {})},
                       dev, rounds=a.rounds)
    clock = table.meta.get("clock", "wall")
    alt = _read(rows, got, table, models, size)
    fit = table.meta.get("fit", "rest")
    _print_rows(rows, alt.meta["fit"] if alt is not None else None)
    window = None
    if in_window:
        win = _in_window(table, got, rows)
        print(f"refitted in the final window (fit {win.meta['fit']}, dense "
              f"{win.dense_ms:.2f} ms):", "  ".join(
                  f"{n} {r['predicted_ms_window']:.2f} ms {r['error_window']:+.1%}"
                  for n, r in rows.items()))
        print("  its held-out networks:", "  ".join(
            f"{n} {c['error']:+.1%}" for n, c in win.check.items()
            if isinstance(c, dict) and not c["fitted"]))
        window = {"fit": win.meta["fit"], "dense_ms": win.dense_ms, "anchors": win.anchors,
                  "check": {n: c for n, c in win.check.items() if isinstance(c, dict)}}
    res = {"arch": a.arch, "size": a.size, "batch": a.batch, "device_kind": dev,
           "threads": torch.get_num_threads(), "round_to": a.round_to,
           # the whole table, and each network's widths (rows): its predictions can be
           # recomputed from this file under another fit or model of the same measurements
           "loadavg": os.getloadavg(), "table": table.to_json(),
           "table_s": table_s, "coupling": a.coupling, "clock": clock, "skipped": skipped,
           "rows": rows, "window": window}
    print("wrote", write_json(f"latency_{a.arch}_b{a.batch}_{a.coupling}_{clock}_{fit}", res))
    return res


if __name__ == "__main__":
    main()
