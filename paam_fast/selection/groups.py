"""Grouped units (PAAM_METHOD.md §2, grouped convolutions): selected in steps.

A unit whose channels form G groups (a grouped conv reads or writes them) keeps the same number
of filters in every group.  It is ranked in steps of G filters: the r-th step is the r-th best
alive filter of every group, valued by their mean.  Widths are then G·count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def round_up(count: int, k: int, cap: int) -> int:
    """``count`` rounded up to a multiple of ``k``, at most ``cap``."""
    return min(cap, -(-count // k) * k) if k > 1 else count


@dataclass
class Steps:
    """Per unit: ``values`` (n,) of its steps, ``alive`` (n,) which compete, ``mult`` the
    filters per step (G), and ``group_order`` (G, per) the per-group ranking (None if G = 1)."""

    values: list[torch.Tensor]
    alive: list[torch.Tensor]
    mult: list[int]
    group_order: list[torch.Tensor | None]


def collapse(units, values: list[torch.Tensor], alive: list[torch.Tensor]) -> Steps:
    mult = [getattr(u, "groups", 1) for u in units]
    vals, alv = list(values), list(alive)
    order: list[torch.Tensor | None] = [None] * len(units)
    for i, (u, gm) in enumerate(zip(units, mult)):
        if gm == 1:
            continue
        g2 = torch.where(alive[i], values[i].double(), -math.inf).view(gm, -1)
        per = int(alive[i].view(gm, -1).sum(1).min())
        if int(alive[i].sum()) != gm * per:
            raise ValueError(f"unit '{u.name}' has unequal alive counts across its {gm} groups")
        order[i] = torch.argsort(g2, dim=1, descending=True, stable=True)[:, :per]
        vals[i] = g2.gather(1, order[i]).mean(0).to(values[i].dtype)  # (per,)
        alv[i] = torch.ones(per, dtype=torch.bool, device=alive[i].device)
    return Steps(vals, alv, mult, order)


def masks(units, steps: Steps, full_alive: list[torch.Tensor], rank: list[torch.Tensor],
          widths: dict[int, int]) -> dict[str, torch.Tensor]:
    """The (F,) masks that keep ``widths[u.id]`` filters of every unit: its best steps by
    ``rank`` (indices of the steps, best first)."""
    out = {}
    for i, u in enumerate(units):
        gm, go = steps.mult[i], steps.group_order[i]
        if go is None:
            m = torch.zeros_like(steps.alive[i])
            m[rank[i][: widths[u.id]]] = True
        else:  # the best w/G alive filters of every group
            m = torch.zeros_like(full_alive[i]).view(gm, -1)
            m.scatter_(1, go[:, : widths[u.id] // gm], True)
            m = m.flatten()
        out[u.name] = m
    return out
