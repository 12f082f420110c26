"""The ``uniform`` baseline's widths: every unit thinned to the same fraction of its filters."""

from __future__ import annotations

import math

import torch

from ..graph import Space, Structure
from .costs import cost_model
from .groups import round_up
from .result import check_keep


def uniform_widths(units: list[Space], structure: Structure, keep: float, cost: str = "params",
                   round_to: int = 1, latency=None) -> dict[int, int]:
    """Widths (space id -> channels) with every unit at its first ⌈r·F⌉ filters (rounded up to
    ``round_to``), r the largest fraction that fits ``keep`` × the dense ``cost`` (``latency``:
    the table, for ``cost="latency"``)."""
    check_keep(keep)
    total = cost_model(structure, cost, latency).total
    dense_w = structure.widths()
    budget = keep * total(dense_w)

    def widths(r: float) -> dict[int, int]:
        w = dict(dense_w)
        for u in units:
            gm = getattr(u, "groups", 1)
            step = round_to // math.gcd(round_to, gm)
            w[u.id] = gm * round_up(max(1, math.ceil(r * u.width / gm - 1e-9)), step,
                                  u.width // gm)
        return w

    if total(widths(0.0)) > budget:
        raise ValueError(f"keep={keep}: even one filter per unit exceeds the budget")
    lo, hi = 0.0, 1.0
    for _ in range(50):  # bisection on r: the count is monotone in r
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(widths(mid)) <= budget else (lo, mid)
    return widths(lo)


def uniform_alive(units: list[Space], structure: Structure, keep: float, cost: str = "params",
                  round_to: int = 1, latency=None) -> dict[str, torch.Tensor]:
    """The `uniform` baseline as masks: {unit name: (F,) bool}, the first filters of every
    group kept."""
    w = uniform_widths(units, structure, keep, cost, round_to, latency)
    out = {}
    for u in units:
        gm = getattr(u, "groups", 1)
        m = torch.zeros(gm, u.width // gm, dtype=torch.bool)
        m[:, : w[u.id] // gm] = True
        out[u.name] = m.flatten()
    return out
