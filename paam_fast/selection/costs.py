"""What a set of widths costs, in the budget's unit (PAAM_METHOD.md §6.2).

A cost model answers two questions about widths ``w`` (space id -> channels): the model's
``total(w)``, and ``local(space_id)``, a function of ``w`` that sums only the terms a unit's width
changes (its producers and its consumers), and ``budget(keep)``, the total that ``keep`` of the
dense model allows.  The budget search adds a filter by recomputing the local part before and
after, so the count stays exact (a filter's cost depends on its neighbours' widths) without
recounting the whole model.  ``"latency"`` (:class:`LatencyCost`) answers them from a table
measured on the target device (:mod:`paam_fast.latency`): it counts the timed layers' sum, in
ms as timed alone, which the table maps to the network's predicted ms (``ms``).
``"params+flops"`` (:class:`JointCost`) counts both at once: its totals are :class:`Joint`
pairs, and a budget holds only when both parts do (a network at most as large *and* at most as
costly as a given fraction of dense: what uniform thinning is at that fraction).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..graph import Structure

# The latency table (paam_fast.latency.LatencyTable) is not imported here: latency measures
# paamified models, paamify selects, and selection would import latency back (a circle).  A
# table is anything with ``bind(structure)``, ``ms_of``, ``layers_for`` and ``dense_ms``.
LatencyTable = object

Widths = dict[int, int]


@dataclass
class StructureCost:
    """Parameters (``metric="params"``) or MACs (``"flops"``) counted on the analysed graph."""

    structure: Structure
    metric: str
    _touching: dict[int, list] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.metric

    def total(self, w: Widths) -> int:
        return self.structure.params(w) if self.metric == "params" else self.structure.macs(w)

    def budget(self, keep: float) -> int:
        return int(math.floor(keep * self.total(self.structure.widths())))

    def ms(self, total):  # only latency has another unit
        return total

    def local(self, space_id: int) -> Callable[[Widths], int]:
        if space_id not in self._touching:
            self._touching[space_id] = self.structure.costs_touching(space_id)
        touching = self._touching[space_id]
        if self.metric == "params":
            return lambda w: sum(c.params(w) for c in touching)
        return lambda w: sum(c.macs(w) for c in touching)


@dataclass(frozen=True)
class Joint:
    """Several counts at once.  ``a > b`` when any part of ``a`` exceeds ``b``'s (a budget is
    broken), ``a <= b`` when none does; sums and differences part by part, and ``k * a`` scales
    every part, so the budget searches run unchanged on it."""

    parts: tuple

    def __add__(self, other: Joint) -> Joint:
        return Joint(tuple(a + b for a, b in zip(self.parts, other.parts)))

    def __sub__(self, other: Joint) -> Joint:
        return Joint(tuple(a - b for a, b in zip(self.parts, other.parts)))

    def __rmul__(self, k: float) -> Joint:
        return Joint(tuple(k * a for a in self.parts))

    def __gt__(self, other: Joint) -> bool:
        return any(a > b for a, b in zip(self.parts, other.parts))

    def __le__(self, other: Joint) -> bool:
        return not self > other

    def floor(self) -> Joint:
        return Joint(tuple(int(math.floor(a)) for a in self.parts))


@dataclass
class JointCost:
    """Parameters and MACs together (``"params+flops"``): totals are ``Joint((params, MACs))``."""

    structure: Structure
    _parts: tuple = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._parts = (StructureCost(self.structure, "params"),
                       StructureCost(self.structure, "flops"))

    @property
    def name(self) -> str:
        return "params+flops"

    def total(self, w: Widths) -> Joint:
        return Joint(tuple(p.total(w) for p in self._parts))

    def budget(self, keep: float) -> Joint:
        return (keep * self.total(self.structure.widths())).floor()

    def ms(self, total):
        return total

    def local(self, space_id: int) -> Callable[[Widths], Joint]:
        fs = [p.local(space_id) for p in self._parts]
        return lambda w: Joint(tuple(f(w) for f in fs))


@dataclass
class LatencyCost:
    """Predicted latency (a :class:`~paam_fast.latency.LatencyTable`): ``total(w)`` is the sum of
    every timed layer at ``w`` (ms as timed alone), ``local(space_id)`` the sum of those that
    read or write that space, ``ms(total)`` the network's predicted ms at that sum (the table's
    fit, increasing in it), and ``budget(keep)`` the sum at which the prediction is ``keep`` of
    the measured dense network.  Counting the sum rather than the prediction keeps a filter's
    cost additive under any fit."""

    structure: Structure
    table: LatencyTable
    _touching: dict[int, list] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._layers = self.table.bind(self.structure)  # refuses another model's table

    @property
    def name(self) -> str:
        return "latency"

    def total(self, w: Widths) -> float:
        return sum(b.ms(w) for b in self._layers)

    def local(self, space_id: int) -> Callable[[Widths], float]:
        if space_id not in self._touching:
            self._touching[space_id] = [b for b in self._layers if b.cost.touches(space_id)]
        touching = self._touching[space_id]
        return lambda w: sum(b.ms(w) for b in touching)

    def budget(self, keep: float) -> float:
        return self.table.layers_for(keep * self.table.dense_ms)

    def ms(self, total: float) -> float:
        return self.table.ms_of(total)


COSTS = ("params", "flops", "latency", "params+flops")


def cost_model(structure: Structure, cost: str, latency: LatencyTable | None = None
               ) -> StructureCost | LatencyCost | JointCost:
    """The cost model named ``cost`` over ``structure``: "params", "flops", "params+flops", or
    "latency" (with ``latency``, a table measured for this model)."""
    if cost not in COSTS:
        raise ValueError(f"selection cost must be one of {COSTS}, got {cost!r}")
    if cost == "params+flops":
        return JointCost(structure)
    if cost == "latency":
        if latency is None:
            raise ValueError("cost='latency' needs latency=<a LatencyTable for this model> "
                             "(paam_fast.latency.latency_table)")
        if not all(hasattr(latency, a) for a in ("bind", "ms_of", "layers_for", "dense_ms")):
            raise ValueError(f"latency must be a paam_fast.latency.LatencyTable, got "
                             f"{type(latency).__name__}")
        return LatencyCost(structure, latency)
    return StructureCost(structure, cost)


def step_delta(model, unit, widths: Widths, step: int):
    """What the last ``step`` filters of ``unit`` cost at ``widths``, in the model's unit (a
    count, ms, or a :class:`Joint` of counts)."""
    local = model.local(unit.id)
    w = dict(widths)
    full = local(w)
    w[unit.id] = max(0, w[unit.id] - step)
    return full - local(w)


def step_costs(model, units, widths: Widths, mult: list[int]) -> list[float]:
    """What one more filter of each unit costs at ``widths`` (per filter: a grouped unit's step
    of G filters, divided by G)."""
    return [max(step_delta(model, u, widths, gm), 1e-12) / gm for u, gm in zip(units, mult)]
