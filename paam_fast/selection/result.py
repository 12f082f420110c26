"""What a selection decided, and the checks of its fractions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Selection:
    """What a selection decided.  ``alive``: per unit name, a (F,) bool mask; ``params`` and
    ``flops``: the model's counts at the kept widths; ``budget``: the target count (budget
    mode; {"params": …, "flops": …} under ``cost="params+flops"``; ms under
    ``cost="latency"``, where ``latency_ms`` and ``dense_latency_ms`` hold the table's
    predictions at the kept and the dense widths)."""

    alive: dict[str, torch.Tensor]
    params: int
    flops: int
    dense_params: int
    dense_flops: int
    budget: int | float | dict | None
    mode: str
    latency_ms: float | None = None
    dense_latency_ms: float | None = None

    @property
    def widths(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.alive.items()}

    def to_dict(self) -> dict:
        return {"mode": self.mode, "params": self.params, "flops": self.flops,
                "dense_params": self.dense_params, "dense_flops": self.dense_flops,
                "budget": self.budget, "widths": self.widths,
                **({"latency_ms": self.latency_ms, "dense_latency_ms": self.dense_latency_ms}
                   if self.latency_ms is not None else {})}


def _check_fraction(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) \
            or not (0 < x <= 1):
        raise ValueError(f"{name} must be a fraction in (0, 1], got {x!r}")
    return float(x)


def check_keep(keep) -> float:
    return _check_fraction("keep", keep)


def check_mass(mass) -> float:
    return _check_fraction("mass", mass)
