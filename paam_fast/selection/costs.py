"""What a set of widths costs, in the budget's unit (PAAM_METHOD.md §6.2).

A cost model answers two questions about widths ``w`` (space id -> channels): the model's
``total(w)``, and ``local(space_id)``, a function of ``w`` that sums only the terms a unit's width
changes (its producers and its consumers).  The budget search adds a filter by recomputing the
local part before and after, so the count stays exact (a filter's cost depends on its
neighbours' widths) without recounting the whole model.  A latency model plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..graph import Structure

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

    def local(self, space_id: int) -> Callable[[Widths], int]:
        if space_id not in self._touching:
            self._touching[space_id] = self.structure.costs_touching(space_id)
        touching = self._touching[space_id]
        if self.metric == "params":
            return lambda w: sum(c.params(w) for c in touching)
        return lambda w: sum(c.macs(w) for c in touching)


COSTS = ("params", "flops")


def cost_model(structure: Structure, cost: str) -> StructureCost:
    """The cost model named ``cost`` ("params" or "flops") over ``structure``."""
    if cost not in COSTS:
        raise ValueError(f"selection cost must be one of {COSTS}, got {cost!r}")
    return StructureCost(structure, cost)


def step_costs(model, units, widths: Widths, mult: list[int]) -> list[float]:
    """What one more filter of each unit costs at ``widths`` (per filter: a grouped unit's step
    of G filters, divided by G)."""
    out = []
    for u, gm in zip(units, mult):
        local = model.local(u.id)
        w = dict(widths)
        full = local(w)
        w[u.id] = max(0, w[u.id] - gm)
        out.append(max(full - local(w), 1e-12) / gm)
    return out
