"""The selection driver: key, steps, floors, search, masks (PAAM_METHOD.md §6.2)."""

from __future__ import annotations

import math
import warnings

import torch

from ..graph import Space, Structure
from .balance import balanced_fill, part_step_costs
from .budget import fill_budget, mass_counts
from .costs import Joint, JointCost, cost_model, step_costs
from .groups import collapse, masks, round_up
from .keys import check_key, rank_values
from .result import Selection
from .uniform import uniform_widths


def _check(units, gates, keep, mass, min_keep, round_to) -> None:
    if (keep is None) == (mass is None):
        raise ValueError("give exactly one of keep= (budget mode) or mass= (mass mode)")
    if not (0 <= min_keep <= 1):
        raise ValueError(f"min_keep must be in [0, 1], got {min_keep!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    for u, g in zip(units, gates):
        if not torch.isfinite(g).all():
            raise ValueError(f"unit '{u.name}' has non-finite scores (NaN or inf); the scoring "
                             "network diverged: lower the learning rate or λ")


def _amount(x, cost: str, model, unit: bool = True) -> str:
    """A total of ``model`` in words (a latency total as the network's predicted ms)."""
    if isinstance(x, Joint):
        return f"{x.parts[0]:,} params and {x.parts[1]:,} MACs"
    if cost == "latency":
        return f"{model.ms(x):.4g} ms"
    return f"{x:,} {cost}" if unit else f"{x:,}"


def _start_at_floors(units, keep, cost, min_keep, round_to, model, structure, width, floors,
                     w: dict[int, int]) -> int | float:
    """Budget mode's start: the budget in ``cost``, every unit at its floor in ``w``; a clear
    error if the parts no selection removes, or the floors, already exceed the budget."""
    dense_total = model.total(structure.widths())
    budget = model.budget(keep)
    for u in units:
        w[u.id] = 0
    if model.total(w) > budget:
        raise ValueError(f"keep={keep} asks for {_amount(budget, cost, model)} but the parts no "
                         f"selection can remove need {_amount(model.total(w), cost, model, False)}"
                         f" of the dense {_amount(dense_total, cost, model, False)}")
    for i, u in enumerate(units):
        w[u.id] = width(i, floors[i])
    if model.total(w) > budget:
        need = _amount(model.total(w), cost, model, False)
        raise ValueError(f"keep={keep} asks for {_amount(budget, cost, model)} but "
                         f"min_keep={min_keep} "
                         f"(round_to={round_to}) alone needs {need}")
    return budget


def choose(units: list[Space], gates: list[torch.Tensor], alive: list[torch.Tensor],
           structure: Structure, widths: dict[int, int], *, keep: float | None = None,
           mass: float | None = None, cost: str = "params", min_keep: float = 0.05,
           round_to: int = 1, key: str = "gate", beta: float = 0.0,
           allocation: str = "global", latency=None) -> Selection:
    """Pick the filters that survive.

    Args:
        units: the gated spaces; gates: their (F,) gate values; alive: their (F,) bool masks
            (only alive filters compete; dead ones stay dead).
        structure: the graph's counts; widths: space id -> current physical width of every space.
        keep / mass: exactly one; cost: "params", "flops" or "latency" (what ``keep`` is a
            fraction of); latency: the :class:`~paam_fast.latency.LatencyTable` of this model
            (needed by, and only used with, ``cost="latency"``).
        key, beta: what filters are ranked by (:mod:`paam_fast.selection.keys`).  Under
            ``cost="params+flops"`` a filter's cost for ``beta`` weighs its parameters and MACs
            so that both parts of the budget bind (:mod:`paam_fast.selection.balance`).
        allocation: "global" (one ranking over all units decides the widths) or "uniform"
            (budget mode: the widths of the uniform baseline, each unit keeping its own best
            filters by the key: a control that separates allocation from the pipeline).
    Returns:
        a :class:`Selection`.  Raises ValueError for non-finite gates or an unreachable budget.
    """
    model = cost_model(structure, cost, latency)
    check_key(key, beta)
    joint_beta = bool(beta) and isinstance(model, JointCost)
    if joint_beta and keep is None:
        raise ValueError("beta > 0 under cost='params+flops' weighs the two parts against a "
                         "budget: give keep=, not mass=")
    if allocation not in ("global", "uniform"):
        raise ValueError(f"allocation must be 'global' or 'uniform', got {allocation!r}")
    if allocation == "uniform" and keep is None:
        raise ValueError("allocation='uniform' needs a budget (keep=)")
    _check(units, gates, keep, mass, min_keep, round_to)
    why = latency.mismatch(round_to) if cost == "latency" else None
    if why:
        warnings.warn(why, stacklevel=2)
    mult = [getattr(u, "groups", 1) for u in units]
    n_alive = [int(a.sum()) for a in collapse(units, gates, alive).alive]
    floors = [min(n, max(1, math.ceil(min_keep * u.width / gm)))
              for u, n, gm in zip(units, n_alive, mult)]
    # round_to applies to the width G·count: the count a multiple of round_to / gcd(round_to, G)
    per = [round_to // math.gcd(round_to, gm) for gm in mult]

    def width(i: int, c: int) -> int:
        return mult[i] * round_up(c, per[i], n_alive[i])

    def ranked(fcost):
        steps = collapse(units, rank_values(key, gates, alive, fcost, beta), alive)
        rank = [torch.argsort(torch.where(a, v.double(), -math.inf), descending=True,
                              stable=True)[:n] for v, a, n in zip(steps.values, steps.alive,
                                                                  n_alive)]
        return steps, rank

    w = dict(widths)
    budget = None
    if allocation == "uniform":  # the key orders filters inside a unit: any cost^beta will do
        steps, rank = ranked([1.0] * len(units) if beta else None)
        budget = model.budget(keep)
        uw = uniform_widths(units, structure, keep, cost, round_to, latency)
        w.update({u.id: min(uw[u.id], mult[i] * n_alive[i]) for i, u in enumerate(units)})
    elif keep is not None:
        budget = _start_at_floors(units, keep, cost, min_keep, round_to, model, structure,
                                  width, floors, w)
        at_floors = dict(w)

        def fill(fcost):
            steps, rank = ranked(fcost)
            wf = dict(at_floors)
            count = fill_budget(units, steps.values, rank, floors, width, model, budget, wf)
            wf.update({u.id: width(i, count[i]) for i, u in enumerate(units)})
            return steps, rank, wf

        if joint_beta:
            steps, rank, w = balanced_fill(fill, part_step_costs(model, units, widths, mult),
                                           budget, model)
        else:
            steps, rank, w = fill(step_costs(model, units, widths, mult) if beta else None)
    else:
        steps, rank = ranked(step_costs(model, units, widths, mult) if beta else None)
        count = mass_counts(steps.values, steps.alive, mult, floors, mass)
        w.update({u.id: width(i, count[i]) for i, u in enumerate(units)})
    dense_w = structure.widths()
    lat = {}
    if cost == "latency":  # in predicted ms, the budget too
        lat = {"latency_ms": model.ms(model.total(w)),
               "dense_latency_ms": model.ms(model.total(dense_w))}
        budget = None if budget is None else model.ms(budget)
    if isinstance(budget, Joint):
        budget = dict(zip(("params", "flops"), budget.parts))
    return Selection(alive=masks(units, steps, alive, rank, w), params=structure.params(w),
                     flops=structure.macs(w), dense_params=structure.params(dense_w),
                     dense_flops=structure.macs(dense_w), budget=budget,
                     mode="keep" if keep is not None else "mass", **lat)
