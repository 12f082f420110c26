"""What each filter is ranked by in the global selection (PAAM_METHOD.md §6.2, "the ranking key
is an open choice").

A key maps a unit's gates g (F,) and alive mask (F,) to one value per filter; larger is kept
first.  Dead filters' values are ignored.  Every key may be divided by the filter's cost to the
power β (``beta``): β = 0 is the plain key, β = 1 the knapsack greedy (value per unit of budget).

* ``"gate"`` (default): g itself.  Under ``normalize="max"`` g is relative to its unit's top
  filter, so it is not comparable across units (a flat unit looks important, a wide one less).
* ``"unit_mean"``: g divided by the mean g of its unit's alive filters: "how much more than its
  unit's typical filter", free of the max's width bias (the max of more samples is larger).
* ``"taylor"``: the filter's first-order effect on the loss, ``|g·∂L/∂g|`` averaged over a few
  training batches (:mod:`.taylor`), in loss units, so comparable across units.  It is not a
  function of g: the caller measures it and passes it in place of the gates
  (``select(..., key="taylor", importance=...)``); here it is taken as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Key = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gate(g: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    return g


def unit_mean(g: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    n = int(alive.sum())
    if n == 0:
        return g
    mean = g.double()[alive].mean()
    return (g.double() / mean.clamp_min(1e-30)).to(g.dtype)


def taylor(importance: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """The measured importance itself (passed where the gates would be)."""
    return importance


KEYS: dict[str, Key] = {"gate": gate, "unit_mean": unit_mean, "taylor": taylor}
# keys whose values are measured by the caller (select()'s ``importance=``), not computed from g
MEASURED_KEYS = frozenset({"taylor"})


def check_key(key: str, beta: float) -> None:
    if key not in KEYS:
        raise ValueError(f"selection key must be one of {sorted(KEYS)}, got {key!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0 <= beta <= 4):
        raise ValueError(f"beta (the key's cost exponent) must be a number in [0, 4], got "
                         f"{beta!r}")


def rank_values(key: str, gates: list[torch.Tensor], alive: list[torch.Tensor],
                filter_costs: list[float] | None = None, beta: float = 0.0
                ) -> list[torch.Tensor]:
    """Per unit, the (F,) values the selection ranks by.  ``filter_costs``: one filter's cost
    per unit (needed when ``beta`` > 0)."""
    vals = [KEYS[key](g, a) for g, a in zip(gates, alive)]
    if beta:
        if filter_costs is None:
            raise ValueError("a key with beta > 0 needs the filters' costs")
        vals = [(v.double() / (c ** beta)).to(v.dtype) for v, c in zip(vals, filter_costs)]
    return vals
