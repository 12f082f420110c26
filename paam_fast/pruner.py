"""The pruning schedule of PAAM_METHOD.md §6, usable from any training loop.

    pruner = pf.Pruner(model, optimizer, epochs=182, lam=0.2, keep=0.48)
    for epoch in range(epochs):
        for x, y in loader:
            loss = criterion(model(x), y) + pruner.penalty()
            ...
        events = pruner.epoch_end(epoch)

The pruner owns λ (and the ``target=`` controller that adjusts it), the selection epoch, and
what happens after selection ("compact": one selection and physical removal; "masked": ``steps``
selection events between ``select_epoch`` and ``final_epoch`` with the budget interpolated from
dense to ``keep``, then physical removal).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .paamify import BALANCES, apply_masks, compact, controller, penalty, select
from .selection import check_keep, check_mass, choose
from .selection.keys import MEASURED_KEYS, check_key

__all__ = ["Pruner", "DEFAULT_LAMBDA"]

# The best λ of the project's CPU validation search (RESULTS.md: ResNet20, CIFAR-10 subset,
# 15 epochs; 0.05 > 0.01 > 0 and far above 0.5 and 2).  A GPU search may move it.
DEFAULT_LAMBDA = 0.05


def _broadcast_masks(model: nn.Module) -> None:
    """Under torch.distributed, make every rank hold rank 0's masks.  The gates are computed from
    identical weights on every rank, so this is a guard against floating-point ties, not a fix
    for diverged replicas."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    ctrl = controller(model)
    for m in ctrl.masks():
        t = m.to(torch.uint8)
        dist.broadcast(t, src=0)
        m.copy_(t.bool())
    apply_masks(model, {u.name: m for u, m in zip(ctrl.units, ctrl.masks())})


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) \
        else model


class Pruner:
    """PAAM's schedule for a paamified ``model`` trained with ``optimizer``.

    Args:
        epochs: total epochs of the run.
        lam: λ, the coefficient of the penalty.
        keep: final fraction of the dense model's ``select_cost`` (budget mode), or
        mass: mass-mode fraction (default 0.95 when neither keep nor target is given), or
        target: a fraction of ``select_cost`` to keep, reached by adjusting λ each epoch before
            selection so that mass-mode selection lands on it.
        cost: the penalty's filter cost ("uniform", "params", "flops", "latency").
        select_cost: what ``keep`` / ``target`` measure ("params", "flops" or "latency").
        latency: a :class:`~paam_fast.latency.LatencyTable` measured for this model, needed by
            ``select_cost="latency"`` and ``cost="latency"`` (the predicted ms of a filter).
        select_epoch: E_sel, default 30% of ``epochs``; final_epoch: E_final (masked mode),
            default 50%.
        after_select: "compact" or "masked"; steps: selection events in masked mode.
        min_keep, round_to: see :func:`paam_fast.select`.
        target_gain: how fast λ follows the target (λ *= exp(gain·(kept − target)/target)).
        balance: the penalty's balance across units (see :func:`paam_fast.penalty`): "filter"
            (per-filter mean, default), "unit" (mean gate per unit, then over units) or
            "budget" (|mean gate − keep|, with ``keep`` or ``target`` as the budget).
        select_key, select_beta, select_allocation: what selection ranks filters by and how it
            allocates the budget (see :func:`paam_fast.select`).
        measure, verify_iters: with ``verify_iters`` > 0 (``select_cost="latency"`` and
            ``keep`` only), the last cut meets ``keep`` as measured: ``measure(model)`` gives the
            masked model's latency over the dense one's on the target device, and while it is
            over ``keep`` the cut is made again at a budget scaled by ``keep`` / that, at most
            ``verify_iters`` times (:func:`paam_fast.measured_budget.select_measured`; the tries
            are in the select event's ``measured_budget``).
        importance: for a measured key (``select_key="taylor"``), a function of no arguments
            that measures the per-unit values at each selection event (e.g. a closure over
            :func:`paam_fast.selection.taylor.taylor_importance` and a few training batches).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, epochs: int,
                 lam: float = DEFAULT_LAMBDA, keep: float | None = None,
                 mass: float | None = None, target: float | None = None, cost: str = "uniform",
                 select_cost: str = "params", select_epoch: int | None = None,
                 final_epoch: int | None = None, after_select: str = "compact", steps: int = 4,
                 min_keep: float = 0.05, round_to: int = 1, target_gain: float = 1.0,
                 balance: str = "filter", select_key: str = "gate",
                 select_beta: float = 0.0, select_allocation: str = "global",
                 latency=None, importance=None,
                 measure: Callable[[nn.Module], float] | None = None,
                 verify_iters: int = 0) -> None:
        self.model = _unwrap(model)
        controller(self.model)
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if not (isinstance(lam, (int, float)) and lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"lam must be a finite non-negative number, got {lam!r}")
        if sum(v is not None for v in (keep, mass, target)) > 1:
            raise ValueError("give at most one of keep=, mass=, target=")
        if keep is not None:
            check_keep(keep)
        if target is not None:
            check_keep(target)
        if keep is None and target is None and mass is None:
            mass = 0.95
        if mass is not None:
            check_mass(mass)
        if after_select not in ("compact", "masked"):
            raise ValueError(f"after_select must be 'compact' or 'masked', got {after_select!r}")
        if cost not in ("uniform", "params", "flops", "latency"):
            raise ValueError(f"cost must be 'uniform', 'params', 'flops' or 'latency', got "
                             f"{cost!r}")
        if select_cost not in ("params", "flops", "latency", "params+flops"):
            raise ValueError(f"select_cost must be 'params', 'flops', 'latency' or "
                             f"'params+flops', got {select_cost!r}")
        if "latency" in (cost, select_cost):
            if latency is None:
                raise ValueError("cost or select_cost 'latency' needs latency=<a LatencyTable "
                                 "measured for this model> (paam_fast.latency.latency_table)")
            from .selection.costs import LatencyCost

            LatencyCost(controller(self.model).structure, latency)  # refuses a foreign table
            controller(self.model).latency_table = latency
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
        if balance == "budget" and keep is None and target is None:
            raise ValueError("balance='budget' needs keep= or target= (the budget it aims at)")
        check_key(select_key, select_beta)
        if select_beta and select_cost == "params+flops" and keep is None:
            raise ValueError("select_beta > 0 with select_cost='params+flops' weighs the two "
                             "parts against a budget: give keep=")
        if select_key in MEASURED_KEYS:
            if importance is None:
                raise ValueError(f"select_key={select_key!r} needs importance= (a function "
                                 "measuring the per-unit values at selection)")
            if keep is None:  # mass and target modes read the mass of the gates themselves
                raise ValueError(f"select_key={select_key!r} needs a budget (keep=)")
        elif importance is not None:
            raise ValueError(f"importance= is only used by a measured key "
                             f"({sorted(MEASURED_KEYS)})")
        if isinstance(verify_iters, bool) or not isinstance(verify_iters, int) or verify_iters < 0:
            raise ValueError(f"verify_iters must be a non-negative integer, got {verify_iters!r}")
        if verify_iters and (select_cost != "latency" or keep is None or measure is None):
            raise ValueError("verify_iters > 0 meets a latency budget as measured: it needs "
                             "select_cost='latency', keep= and measure=")
        self.measure, self.verify_iters = measure, verify_iters
        self.importance = importance
        self.balance = balance
        if select_allocation not in ("global", "uniform"):
            raise ValueError(f"select_allocation must be 'global' or 'uniform', got "
                             f"{select_allocation!r}")
        if select_allocation == "uniform" and keep is None:
            raise ValueError("select_allocation='uniform' needs keep=")
        self.select_kw = {"key": select_key, "beta": select_beta,
                          "allocation": select_allocation, "latency": latency}
        self.optimizer = optimizer
        self.epochs = epochs
        self.lam = float(lam)
        self.keep, self.mass, self.target = keep, mass, target
        self.cost, self.select_cost = cost, select_cost
        self.select_epoch = max(1, round(0.3 * epochs)) if select_epoch is None else select_epoch
        self.final_epoch = (max(self.select_epoch, round(0.5 * epochs)) if final_epoch is None
                            else final_epoch)
        if not (1 <= self.select_epoch <= epochs):
            raise ValueError(f"select_epoch must be in [1, {epochs}], got {self.select_epoch}")
        if not (self.select_epoch <= self.final_epoch <= epochs):
            raise ValueError(f"final_epoch must be in [select_epoch, epochs], got "
                             f"{self.final_epoch}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.after_select, self.steps = after_select, steps
        self.min_keep, self.round_to, self.target_gain = min_keep, round_to, target_gain
        self.events_done = 0
        self.final_keep: float | None = keep

    # --------------------------------------------------------------- per step
    def penalty(self, lam: torch.Tensor | None = None) -> torch.Tensor:
        """λ · penalty (fp32 scalar); zero once the gates are frozen.  ``lam``: a device tensor
        holding λ, used instead of the Python float (a captured CUDA graph reads it there)."""
        budget = self.keep if self.keep is not None else self.target
        return (self.lam if lam is None else lam) * penalty(self.model, self.cost, self.balance,
                                                            budget)

    @property
    def active(self) -> bool:
        """True while the scoring networks train."""
        return not controller(self.model).frozen

    # --------------------------------------------------------------- per epoch
    def _event_epochs(self) -> list[int]:
        if self.after_select == "compact":
            return [self.select_epoch]
        span = self.final_epoch - self.select_epoch
        return [self.select_epoch + round(k * span / self.steps) for k in range(self.steps)]

    def _kept_fraction_mass(self) -> float:
        ctrl = controller(self.model)
        sel = choose(ctrl.units, ctrl.unit_gates(), ctrl.masks(), ctrl.structure, ctrl.widths(),
                     mass=self.mass or 0.95, cost=self.select_cost, min_keep=self.min_keep,
                     round_to=self.round_to, key=self.select_kw["key"],
                     beta=self.select_kw["beta"], latency=self.select_kw["latency"])
        if self.select_cost == "params":
            return sel.params / sel.dense_params
        if self.select_cost == "params+flops":  # the binding one of the two
            return max(sel.params / sel.dense_params, sel.flops / max(sel.dense_flops, 1))
        if self.select_cost == "latency":
            return sel.latency_ms / sel.dense_latency_ms
        return sel.flops / max(sel.dense_flops, 1)

    def epoch_end(self, epoch: int) -> list[dict]:
        """Call after epoch ``epoch`` (0-based) finished. Returns what happened, as dicts with
        "event" in {"lambda", "select", "compact"}."""
        events: list[dict] = []
        done = epoch + 1
        ctrl = controller(self.model)
        if ctrl.frozen:
            return events
        plan = self._event_epochs()
        if self.target is not None and done < self.select_epoch:
            frac = self._kept_fraction_mass()
            old = self.lam
            step = self.target_gain * (frac - self.target) / self.target
            self.lam = float(min(max(self.lam * math.exp(max(min(step, 2.0), -2.0)), 1e-6), 1e4))
            events.append({"epoch": epoch, "event": "lambda", "lam_before": old,
                           "lam": self.lam, "kept_fraction_mass": frac})
        while self.events_done < len(plan) and plan[self.events_done] <= done:
            k = self.events_done
            kw = dict(self.select_kw)
            if self.importance is not None:
                kw["importance"] = self.importance()
            tries = None
            if self.verify_iters and k == len(plan) - 1:  # the last cut, met as measured
                sel, tries = self._select_measured(kw)
            elif self.after_select == "compact":
                sel = (select(self.model, keep=self.keep, cost=self.select_cost,
                              min_keep=self.min_keep, round_to=self.round_to, **kw)
                       if self.keep is not None else
                       select(self.model, mass=self.mass or 0.95, cost=self.select_cost,
                              min_keep=self.min_keep, round_to=self.round_to,
                              **kw))
            else:
                if self.final_keep is None:  # mass / target: the first event fixes the goal
                    self.final_keep = self._kept_fraction_mass()
                keep_k = 1 - (1 - self.final_keep) * (k + 1) / self.steps
                sel = select(self.model, keep=keep_k, cost=self.select_cost,
                             min_keep=self.min_keep, round_to=self.round_to, **kw)
            _broadcast_masks(self.model)
            self.events_done += 1
            events.append({"epoch": epoch, "event": "select", "index": k, **sel.to_dict(),
                           **({"measured_budget": tries} if tries is not None else {})})
        if self.events_done == len(plan) and (self.after_select == "compact"
                                              or done >= self.final_epoch):
            widths = compact(self.model, self.optimizer)
            events.append({"epoch": epoch, "event": "compact", "widths": widths})
        return events

    def _select_measured(self, kw: dict):
        """The last cut at ``keep`` of the latency as measured (:mod:`.measured_budget`): every
        try starts from the masks before it; the chosen one's masks are left applied."""
        from .measured_budget import select_measured

        ctrl = controller(self.model)
        before = {u.name: m.clone() for u, m in zip(ctrl.units, ctrl.masks())}

        def at(budget):
            apply_masks(self.model, {n: m.clone() for n, m in before.items()})
            return select(self.model, keep=budget, cost=self.select_cost,
                          min_keep=self.min_keep, round_to=self.round_to, **kw)

        sel, tries = select_measured(at, lambda _: self.measure(self.model), self.keep,
                                     iters=self.verify_iters)
        chosen = next(h for h in tries if h.get("chosen"))
        if tries[-1] is not chosen:  # the masks applied are another try's: the chosen again
            sel = at(chosen["budget"])
        return sel, tries

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"lam": self.lam, "events_done": self.events_done, "final_keep": self.final_keep}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])
        self.events_done = int(state["events_done"])
        # The masked schedule's goal is this pruner's keep, or (mass / target modes) fixed by
        # its first event.  Before any event (a fork's pre-selection state) the saved value is
        # the source run's goal, not this run's: keep our own.
        if self.events_done > 0:
            self.final_keep = state["final_keep"]


