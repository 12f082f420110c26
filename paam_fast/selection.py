"""Global selection of the filters that survive (PAAM_METHOD.md §6.2).

All gated units are ranked together by their gate g, descending.

* budget mode (``keep=``): keep filters in that order while the whole model's physically counted
  parameters (or FLOPs) stay within ``keep`` × the dense count.  The count is recomputed exactly
  as widths change (a filter's cost depends on its consumers' widths), so the result lands within
  one filter's cost of the budget.
* mass mode (``mass=``): keep the shortest prefix whose gates sum to ``mass`` of the total.

Every unit keeps at least max(1, ⌈min_keep·F⌉) filters, and with ``round_to=k`` kept widths are
rounded up to multiples of k (never above the alive count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .graph import Space, Structure

__all__ = ["Selection", "choose", "check_keep", "check_mass", "uniform_alive"]


@dataclass(frozen=True)
class Selection:
    """What a selection decided.  ``alive``: per unit name, a (F,) bool mask; ``params`` and
    ``flops``: the model's counts at the kept widths; ``budget``: the target count (budget mode)."""

    alive: dict[str, torch.Tensor]
    params: int
    flops: int
    dense_params: int
    dense_flops: int
    budget: int | None
    mode: str

    @property
    def widths(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.alive.items()}

    def to_dict(self) -> dict:
        return {"mode": self.mode, "params": self.params, "flops": self.flops,
                "dense_params": self.dense_params, "dense_flops": self.dense_flops,
                "budget": self.budget, "widths": self.widths}


def check_keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not (0 < keep <= 1) \
            or math.isnan(keep):
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
    return float(keep)


def check_mass(mass) -> float:
    if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not (0 < mass <= 1) \
            or math.isnan(mass):
        raise ValueError(f"mass must be a fraction in (0, 1], got {mass!r}")
    return float(mass)


def _round(w: int, k: int, cap: int) -> int:
    return min(cap, -(-w // k) * k) if k > 1 else w


def choose(units: list[Space], gates: list[torch.Tensor], alive: list[torch.Tensor],
           structure: Structure, widths: dict[int, int], *, keep: float | None = None,
           mass: float | None = None, cost: str = "params", min_keep: float = 0.05,
           round_to: int = 1) -> Selection:
    """Pick the filters that survive.

    Args:
        units: the gated spaces; gates: their (F,) gate values; alive: their (F,) bool masks
            (only alive filters compete; dead ones stay dead).
        structure: the cost model; widths: space id -> current physical width of every space.
        keep / mass: exactly one; cost: "params" or "flops" (what ``keep`` is a fraction of).
    Returns:
        a :class:`Selection`.  Raises ValueError for non-finite gates or an unreachable budget.
    """
    if cost not in ("params", "flops"):
        raise ValueError(f"selection cost must be 'params' or 'flops', got {cost!r}")
    if (keep is None) == (mass is None):
        raise ValueError("give exactly one of keep= (budget mode) or mass= (mass mode)")
    if not (0 <= min_keep <= 1):
        raise ValueError(f"min_keep must be in [0, 1], got {min_keep!r}")
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    for u, g in zip(units, gates):
        if not torch.isfinite(g).all():
            raise ValueError(f"unit '{u.name}' has non-finite scores (NaN or inf); the scoring "
                             "network diverged: lower the learning rate or λ")
    fn = (lambda c, w: c.params(w)) if cost == "params" else (lambda c, w: c.macs(w))
    total_of = structure.params if cost == "params" else structure.macs
    dense_w = structure.widths()
    w = dict(widths)
    # A unit whose channels form G groups (a grouped conv reads or writes them) is selected in
    # steps of G filters, the r-th best of every group, scored by their mean gate; widths are
    # then G·count, and round_to applies to that width.  Below, for such a unit, "filter"
    # means one such step and ``mult`` maps counts to widths.
    full_gates, full_alive, mult = gates, alive, [getattr(u, "groups", 1) for u in units]
    g_order: list[torch.Tensor | None] = [None] * len(units)  # (G, n) per-group ranking
    gates, alive = list(gates), list(alive)
    for i, (u, gm) in enumerate(zip(units, mult)):
        if gm == 1:
            continue
        g2 = torch.where(full_alive[i], full_gates[i].double(), -math.inf).view(gm, -1)
        per = int(full_alive[i].view(gm, -1).sum(1).min())
        if int(full_alive[i].sum()) != gm * per:
            raise ValueError(f"unit '{u.name}' has unequal alive counts across its {gm} groups")
        g_order[i] = torch.argsort(g2, dim=1, descending=True, stable=True)[:, :per]
        ranked = g2.gather(1, g_order[i]).mean(0)  # (per,)
        gates[i] = ranked.to(full_gates[i].dtype)
        alive[i] = torch.ones(per, dtype=torch.bool, device=full_alive[i].device)
    n_alive = [int(a.sum()) for a in alive]
    floors = [min(n, max(1, math.ceil(min_keep * u.width / gm)))
              for u, n, gm in zip(units, n_alive, mult)]
    order = [torch.argsort(torch.where(a, g.double(), -math.inf), descending=True, stable=True)[:n]
             for g, a, n in zip(gates, alive, n_alive)]
    # round_to on the width G·count: the count a multiple of round_to / gcd(round_to, G)
    steps = [round_to // math.gcd(round_to, gm) for gm in mult]

    def width(i: int, c: int) -> int:
        return mult[i] * _round(c, steps[i], n_alive[i])

    count = [0] * len(units)
    budget = None
    if keep is not None:
        budget = int(math.floor(keep * total_of(dense_w)))
        for u in units:
            w[u.id] = 0
        floor_total = total_of(w)
        if floor_total > budget:
            raise ValueError(f"keep={keep} asks for {budget:,} {cost} but the parts no selection "
                             f"can remove need {floor_total:,} of the dense {total_of(dense_w):,}")
        for i, u in enumerate(units):
            count[i] = floors[i]
            w[u.id] = width(i, floors[i])
        total = total_of(w)
        if total > budget:
            raise ValueError(f"keep={keep} asks for {budget:,} {cost} but min_keep={min_keep} "
                             f"(round_to={round_to}) alone needs {total:,}")
        touching = [structure.costs_touching(u.id) for u in units]
        cand = [(float(gates[i][j]), i, r) for i in range(len(units))
                for r, j in enumerate(order[i].tolist()) if r >= floors[i]]
        cand.sort(key=lambda t: -t[0])  # stable: ties keep unit order, then rank in unit
        for _, i, r in cand:
            if r != count[i]:  # an earlier, better filter of this unit did not fit
                continue
            sid = units[i].id
            new = width(i, count[i] + 1)
            if new != w[sid]:
                before = sum(fn(c, w) for c in touching[i])
                old, w[sid] = w[sid], new
                delta = sum(fn(c, w) for c in touching[i]) - before
                if total + delta > budget:
                    w[sid] = old
                    break
                total += delta
            count[i] += 1
        mode = "keep"
    else:
        # a grouped unit's step weighs as its G filters
        vals = torch.cat([g[a].double() for g, a in zip(gates, alive)])
        weight = torch.cat([torch.full((n,), float(gm), dtype=torch.float64)
                            for n, gm in zip(n_alive, mult)])
        owner = torch.cat([torch.full((n,), i) for i, n in enumerate(n_alive)])
        srt, perm = torch.sort(vals, descending=True, stable=True)
        csum = torch.cumsum(srt * weight[perm], 0)
        n_keep = int(torch.searchsorted(csum, mass * float(csum[-1]) * (1 - 1e-12)).item()) + 1
        n_keep = min(n_keep, int(vals.numel()))
        counts = torch.bincount(owner[perm[:n_keep]], minlength=len(units)).tolist()
        for i in range(len(units)):
            count[i] = max(counts[i], floors[i])
        mode = "mass"
    for i, u in enumerate(units):
        w[u.id] = width(i, count[i])
    new_alive = {}
    for i, u in enumerate(units):
        if g_order[i] is None:
            m = torch.zeros_like(alive[i])
            m[order[i][: w[u.id]]] = True
        else:  # the best w/G alive filters of every group
            gm = mult[i]
            m = torch.zeros_like(full_alive[i]).view(gm, -1)
            m.scatter_(1, g_order[i][:, : w[u.id] // gm], True)
            m = m.flatten()
        new_alive[u.name] = m
    return Selection(alive=new_alive, params=structure.params(w), flops=structure.macs(w),
                     dense_params=structure.params(dense_w), dense_flops=structure.macs(dense_w),
                     budget=budget, mode=mode)


def uniform_alive(units: list[Space], structure: Structure, keep: float, cost: str = "params",
                  round_to: int = 1) -> dict[str, torch.Tensor]:
    """The `uniform` baseline: every unit thinned to the same fraction r of its filters (its
    first ⌈r·F⌉, rounded up to ``round_to``), with r the largest that fits ``keep`` × the dense
    ``cost``.  Returns {unit name: (F,) bool}."""
    check_keep(keep)
    total_of = structure.params if cost == "params" else structure.macs
    dense_w = structure.widths()
    budget = keep * total_of(dense_w)

    def widths(r: float) -> dict[int, int]:
        w = dict(dense_w)
        for u in units:
            gm = getattr(u, "groups", 1)
            step = round_to // math.gcd(round_to, gm)
            w[u.id] = gm * _round(max(1, math.ceil(r * u.width / gm - 1e-9)), step,
                                  u.width // gm)
        return w

    if total_of(widths(0.0)) > budget:
        raise ValueError(f"keep={keep}: even one filter per unit exceeds the budget")
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total_of(widths(mid)) <= budget else (lo, mid)
    w = widths(lo)
    out = {}
    for u in units:
        gm = getattr(u, "groups", 1)
        m = torch.zeros(gm, u.width // gm, dtype=torch.bool)
        m[:, : w[u.id] // gm] = True  # the first filters of every group
        out[u.name] = m.flatten()
    return out
