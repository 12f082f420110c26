"""A latency budget met as measured, not only as predicted (issue 20; NetAdapt, ECCV 2018,
adapts to empirical measurements the same way).

A latency table predicts; the device decides.  On the 2-core CPU the networks chosen at half of
ResNet50's latency at batch 32 measured 0.59 of dense (BENCHMARKS.md), and the same network
measured ±20% apart in two windows minutes apart.  :func:`select_measured` closes the loop:
select at a budget, measure the chosen network against dense on the device, and while it is
over ``keep · (1 + tol)`` scale the budget by ``keep / measured`` and select again.

    sel, history = select_measured(
        lambda b: pf.select(model, keep=b, cost="latency", latency=table),
        lambda sel: measured_ratio(sel), keep=0.5)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["select_measured", "measured_ratio"]


def select_measured(select: Callable[[float], Any], measure: Callable[[Any], float], keep: float,
                    iters: int = 3, tol: float = 0.02) -> tuple[Any, list[dict]]:
    """Select at ``keep`` of the predicted latency, then correct the budget by measurement.

    Args:
        select: budget (a fraction of the dense latency) -> a selection; may raise ValueError
            for a budget the model cannot reach (the loop then stops).
        measure: selection -> its network's measured latency over the dense network's, measured
            side by side on the target device.
        keep: the fraction of the dense latency the network must measure at most.
        iters: at most this many budgets after the first.
        tol: a measurement within ``keep · (1 + tol)`` counts as met (the device's noise).
    Returns:
        (selection, history): the selection of the last budget that was met, else of the one
        measured fastest; history lists every try as {"budget", "measured", "within", "chosen"}
        (and {"budget", "error"} for a budget ``select`` refused).
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    history: list[dict] = []
    tried: list[tuple[Any, dict]] = []
    budget = keep
    for _ in range(iters + 1):
        try:
            sel = select(budget)
        except ValueError as e:
            if not tried:
                raise
            history.append({"budget": budget, "error": str(e)})
            break
        r = float(measure(sel))
        h = {"budget": budget, "measured": r, "within": r <= keep * (1 + tol), "chosen": False}
        history.append(h)
        tried.append((sel, h))
        if h["within"]:
            break
        budget *= keep / r
    met = [t for t in tried if t[1]["within"]]
    sel, h = met[-1] if met else min(tried, key=lambda t: t[1]["measured"])
    h["chosen"] = True
    return sel, history


def measured_ratio(table, dense, net, device=None, rounds: int = 5) -> float:
    """Plain network ``net``'s latency over plain ``dense``'s, measured side by side as
    ``table`` was (its batch, dtype, memory format and clock; interleaved rounds)."""
    from .latency import measure_like

    got = measure_like(table, {"dense": dense, "net": net}, device, rounds=rounds)
    return got["net"]["median_ms"] / got["dense"]["median_ms"]
