"""The baselines' widths: ``uniform`` (every unit thinned to the same fraction of its filters)
and ``random`` (every unit thinned to its own random fraction, all scaled to the budget)."""

from __future__ import annotations

import math

import torch

from ..graph import Space, Structure
from .costs import cost_model
from .groups import round_up
from .result import check_keep


def uniform_widths(units: list[Space], structure: Structure, keep: float, cost: str = "params",
                   round_to: int = 1, shares: list[float] | None = None,
                   latency=None) -> dict[int, int]:
    """Widths (space id -> channels) with every unit at its first ⌈r·F⌉ filters (rounded up to
    ``round_to``), r the largest fraction that fits ``keep`` × the dense ``cost`` (``latency``:
    the table, for ``cost="latency"``).  With ``shares`` (one per unit, in (0, 1]) unit u keeps
    ⌈min(1, r·shares[u])·F⌉ instead."""
    check_keep(keep)
    shares = shares or [1.0] * len(units)
    model = cost_model(structure, cost, latency)
    total, budget = model.total, model.budget(keep)
    dense_w = structure.widths()

    def widths(r: float) -> dict[int, int]:
        w = dict(dense_w)
        for u, share in zip(units, shares):
            gm = getattr(u, "groups", 1)
            step = round_to // math.gcd(round_to, gm)
            frac = min(1.0, r * share)
            w[u.id] = gm * round_up(max(1, math.ceil(frac * u.width / gm - 1e-9)), step,
                                    u.width // gm)
        return w

    if total(widths(0.0)) > budget:
        raise ValueError(f"keep={keep}: even one filter per unit exceeds the budget")
    lo, hi = 0.0, 1.0 / min(shares)
    for _ in range(50):  # bisection on r: the count is monotone in r
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(widths(mid)) <= budget else (lo, mid)
    return widths(lo)


def uniform_alive(units: list[Space], structure: Structure, keep: float, cost: str = "params",
                  round_to: int = 1, latency=None) -> dict[str, torch.Tensor]:
    """The `uniform` baseline as masks: {unit name: (F,) bool}, the first filters of every
    group kept."""
    return first_alive(units, uniform_widths(units, structure, keep, cost, round_to,
                                             latency=latency))


def random_alive(units: list[Space], structure: Structure, keep: float, cost: str = "params",
                 round_to: int = 1, seed: int = 0, min_share: float = 0.05, latency=None
                 ) -> dict[str, torch.Tensor]:
    """The `random` control: each unit's share drawn uniformly from [min_share, 1] (a generator
    seeded by ``seed``), then every share scaled by the one factor that fits the budget: random
    allocations at the same cost, which a learned allocation must beat."""
    gen = torch.Generator().manual_seed(seed)
    shares = (min_share + (1 - min_share) * torch.rand(len(units), generator=gen,
                                                       dtype=torch.float64)).tolist()
    return first_alive(units, uniform_widths(units, structure, keep, cost, round_to, shares,
                                             latency))


def first_alive(units: list[Space], w: dict[int, int]) -> dict[str, torch.Tensor]:
    """Masks {unit name: (F,) bool} keeping the first ``w[unit id]`` filters of every unit (the
    same number in every group of a grouped unit, at least one): the networks whose widths
    alone matter (baselines trained from scratch, latency measured on random weights)."""
    out = {}
    for u in units:
        gm = getattr(u, "groups", 1)
        m = torch.zeros(gm, u.width // gm, dtype=torch.bool)
        m[:, : max(1, w[u.id] // gm)] = True
        out[u.name] = m.flatten()
    return out
