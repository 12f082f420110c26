"""Torch-Pruning as a peer method: ``paam-train --method torch-pruning``.

Torch-Pruning (G. Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023;
https://github.com/VainF/Torch-Pruning, ``pip install torch-pruning==1.6.1``) is what a user
would most likely pick instead of PAAM.  Its own recipe for sparse learning followed by pruning,
run in PAAM's one training run:

* epochs 0 .. E_sel-1 (the joint phase): its group-norm sparse learning — a
  ``GroupNormPruner(reg=λ)`` whose ``regularize(model)`` adds λ·γ·w to every coupled group's
  gradients after each backward, before the optimizer step, and whose
  ``update_regularizer()`` runs at every epoch start, as its README's "Sparse Training" section
  says;
* at the end of epoch E_sel-1: one global pruning step (``global_pruning=True``: one ranking of
  all groups' channels by their group L2 norm, ``GroupMagnitudeImportance(p=2)``, the README's
  criterion), the final classifier in ``ignored_layers``, sized to the run's budget (below);
* then the pruned network trains to the end like every other method, with no regularizer.

How the budget is met.  Torch-Pruning's ``pruning_ratio`` is a fraction of *channels*, not of
parameters or MACs.  With global pruning it removes the ``n = N - int(N·(1 - ratio))`` channels
of lowest importance among all N channels of all groups (ties at the threshold go too; a group
that would lose every channel is left whole by its ``check_pruning_group``).  So the ratio is
searched: the number of kept channels k is set through ``ratio = 1 - (k + 0.5)/N`` (which makes
``int(N·(1 - ratio)) = k`` exactly), each candidate is pruned on a deep copy of the model with a
fresh pruner, and the copy's parameters (or MACs, ``select_cost="flops"``) are counted with
:func:`paam_fast.count` — the count every method's report uses.  A scan of k = N·(15/16, 14/16,
...) finds the first k within the budget, then bisection over the integers finds the *largest k
whose counted cost is ≤ floor(keep · dense cost)* (the budget PAAM's selection uses too).  One
channel more is over the budget; the event records both costs, so the gap (one channel's worth,
or a tie or a ``round_to`` step) is visible.  The winning copy's Torch-Pruning *pruning history*
(root layer name, in/out, channel indices per group pruned) is then replayed on the real model,
whose counted cost is checked to equal the copy's.

Resume.  Checkpoints are loaded with ``weights_only=True``, so a pruned model object cannot be
pickled into them.  The pruning history is plain JSON: :meth:`state_dict` stores it, and
:meth:`load_state_dict` replays it (``DependencyGraph.load_pruning_history``) on the freshly
built dense model before its state is loaded, which rebuilds the pruned architecture exactly.

CIFAR ResNets' option-A shortcut (:class:`paam_fast.models.PadShortcut`: subsample, zero-pad
channels) is opaque to Torch-Pruning's tracer, which would take its ``F.pad`` for an element-wise
op and couple the 16- and 32-channel stages into one broken group.  It is registered with
Torch-Pruning through a customized pruner instead, which slices its channel map
(``PadShortcut.keep_in`` / ``keep_out``: the pairs of a removed channel go) when either side is
pruned, as paam_fast's own grouped coupling does.  So the stage channels (the residual
groups) are pruned too, as Torch-Pruning does on any ResNet — unless ``scope="internal"``
(``--tp-scope internal``, ours): then every conv and linear that writes no channel PAAM's
internal coupling gates is an ignored layer, and Torch-Pruning prunes exactly PAAM's default
units (a control: does its edge come from its ranking or from the residual stages it may cut?).
"""

from __future__ import annotations

import copy
import json
from importlib import metadata

import torch
from torch import nn

from ..count import count
from ..models import PadShortcut

__all__ = ["DEFAULT_REG", "INSTALL", "MissingTorchPruning",
           "TorchPruningPeer", "require"]

INSTALL = "pip install torch-pruning==1.6.1"
# Torch-Pruning 1.6.1's default reg for group-norm sparse learning: ``reg=1e-4`` in
# ``GroupNormPruner.__init__`` (torch_pruning/pruner/algorithms/group_norm_pruner.py; the
# docstring there says 1e-5, the signature — what a user gets — says 1e-4).
DEFAULT_REG = 1e-4


class MissingTorchPruning(ImportError):
    """torch_pruning is not installed; the message says what to install."""


def require():
    """The ``torch_pruning`` module, or :class:`MissingTorchPruning`."""
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise MissingTorchPruning(f"--method torch-pruning needs: {INSTALL}") from e
    return tp


def version() -> str:
    try:
        return metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:  # an unpackaged checkout
        return getattr(require(), "__version__", "unknown")


# --------------------------------------------------------------------------- option-A shortcut
def _pad_shortcut_pruner(tp):
    """Torch-Pruning's pruning functions for :class:`PadShortcut`: the two sides are
    independent (different prune_in/prune_out: no intra-layer dependency, like a conv)."""

    def kept(n: int, idxs, device) -> torch.Tensor:
        gone = {int(i) for i in idxs}
        return torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long,
                            device=device)

    class PadShortcutPruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = PadShortcut

        def prune_out_channels(self, layer, idxs):
            layer.keep_out(kept(layer.out_channels, idxs, layer.channel_map().device))
            return layer

        def prune_in_channels(self, layer, idxs):
            layer.keep_in(kept(layer.in_channels, idxs, layer.channel_map().device))
            return layer

        def get_out_channels(self, layer):
            return layer.out_channels

        def get_in_channels(self, layer):
            return layer.in_channels

    return PadShortcutPruner()


def complete_pad_shortcuts(model: nn.Module, example: torch.Tensor) -> int:
    """Give every :class:`PadShortcut` of ``model`` built without ``in_channels`` its input
    width (read from one eval forward of ``example``: its map needs it); returns how many
    PadShortcuts there are."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, PadShortcut)}
    todo = [m for m in names if m.in_channels is None]
    if todo:
        hooks = [m.register_forward_pre_hook(
            lambda m, a: setattr(m, "in_channels", a[0].shape[1])) for m in todo]
        was_training = model.training
        model.eval()  # BN running statistics must not move
        try:
            with torch.no_grad():
                model(example)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
    return len(names)


def _classifier(model: nn.Module) -> str:
    """The name of the final classifier: the last nn.Linear (resnet fc, vgg / mobilenet
    classifier[-1]), kept whole as Torch-Pruning's README asks."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    if last is None:
        raise ValueError("torch-pruning: the model has no nn.Linear classifier to keep whole")
    return last


def _outside_internal_units(model: nn.Module, input_size: tuple[int, ...]) -> list[str]:
    """Every conv and linear that writes no channel PAAM's internal coupling gates (the stem,
    each residual block's last conv, projection shortcuts, the classifier): ignored by
    Torch-Pruning, they keep every group they root whole, so only PAAM's units are pruned."""
    from ..graph import analyse

    units = analyse(model, tuple(input_size), "internal").units
    producers = {p for u in units for p in u.producers}
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in producers]


# --------------------------------------------------------------------------- the peer
class TorchPruningPeer:
    """Torch-Pruning's group-norm sparse learning and one global pruning step, with the hooks
    ``paam-train`` calls: :meth:`regularize` after each backward, :meth:`epoch_end` after each
    epoch (prunes at E_sel and returns events like :meth:`paam_fast.Pruner.epoch_end`),
    :meth:`state_dict` / :meth:`load_state_dict` for checkpoints.

    Args:
        model: a plain (not paamified) model, on its device; its PadShortcuts are replaced.
        input_size: (1, C, H, W), for tracing and for :func:`paam_fast.count`.
        epochs: total epochs; select_epoch: E_sel (default 30% of ``epochs``, as PAAM's).
        keep: fraction (0, 1] of the dense model's ``select_cost`` to keep.
        select_cost: "params" or "flops" (MACs), counted by :func:`paam_fast.count`.
        reg: λ, GroupNormPruner's ``reg``.
        round_to: GroupNormPruner's ``round_to`` (1: none).
        scope: "all" (every coupled group Torch-Pruning finds, the residual stages too: as
            published) or "internal" (ours, a control: only the channels that PAAM's internal
            coupling gates; every other conv and linear goes into ``ignored_layers``, so the
            residual stages keep their width, as under PAAM's default).
    """

    def __init__(self, model: nn.Module, *, input_size: tuple[int, ...], epochs: int,
                 keep: float, select_cost: str = "params", select_epoch: int | None = None,
                 reg: float = DEFAULT_REG, round_to: int = 1, scope: str = "all") -> None:
        self.tp = require()
        if select_cost not in ("params", "flops"):
            raise ValueError(f"select_cost must be 'params' or 'flops', got {select_cost!r}")
        if scope not in ("all", "internal"):
            raise ValueError(f"scope must be 'all' or 'internal', got {scope!r}")
        if not (0 < keep <= 1):
            raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
        self.model, self.input_size = model, tuple(input_size)
        self.keep, self.select_cost, self.reg = float(keep), select_cost, float(reg)
        self.round_to = round_to
        self.select_epoch = max(1, round(0.3 * epochs)) if select_epoch is None else select_epoch
        if not (1 <= self.select_epoch <= epochs):
            raise ValueError(f"select_epoch must be in [1, {epochs}], got {self.select_epoch}")
        p = next(model.parameters())
        self._example = torch.zeros(self.input_size, dtype=p.dtype, device=p.device)
        self.dense = count(model, self.input_size)
        self.classifier = _classifier(model)
        # (the classifier writes no gated channel: "internal" ignores it too)
        self.ignored = (_outside_internal_units(model, self.input_size)
                        if scope == "internal" else [self.classifier])
        self.scope = scope
        self.shortcuts = complete_pad_shortcuts(model, self._example)
        self.pruner = self._make_pruner(model, pruning_ratio=0.0)  # the regularizer; its DG
        self.channels = int(self.pruner.initial_total_channels)  # N, all groups' channels
        self.pruned = False
        self.history: list = []
        self.search: dict | None = None

    def _make_pruner(self, model: nn.Module, pruning_ratio: float):
        tp = self.tp
        was_training = model.training
        model.eval()  # tracing runs a forward: BN running statistics must not move
        try:
            with torch.enable_grad():  # Torch-Pruning traces the autograd graph
                return tp.pruner.GroupNormPruner(
                    model, self._example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                    reg=self.reg, global_pruning=True, pruning_ratio=pruning_ratio,
                    ignored_layers=[model.get_submodule(n) for n in self.ignored],
                    round_to=self.round_to if self.round_to > 1 else None,
                    customized_pruners={PadShortcut: _pad_shortcut_pruner(tp)})
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ per step / epoch
    @property
    def active(self) -> bool:
        """True while the sparse-learning regularizer runs (before the pruning step)."""
        return not self.pruned

    def regularize(self, model: nn.Module | None = None) -> None:
        """Call after ``loss.backward()``, before ``optimizer.step()``: Torch-Pruning adds its
        group-norm regularizer's gradient (λ·γ·w per coupled group) to ``.grad``.  ``model``
        is accepted for the library's signature; the pruner acts on the model it traced."""
        if not self.pruned:
            self.pruner.regularize(self.model)

    def epoch_end(self, epoch: int) -> list[dict]:
        """Call after epoch ``epoch`` (0-based).  At the end of epoch E_sel-1 the global pruning
        step runs and one event {"event": "compact", ...} comes back (or {"event": "select"} if
        the budget is the dense model); before it, the regularizer's groups are refreshed for
        the next epoch (``update_regularizer``, per its README)."""
        if self.pruned:
            return []
        if epoch + 1 < self.select_epoch:
            self.pruner.update_regularizer()
            return []
        return [self._prune(epoch)]

    # ------------------------------------------------------------------ the pruning step
    def _trial(self, kept: int) -> tuple[list, dict[str, int]]:
        """Prune a copy of the model globally down to ``kept`` of the N channels; its pruning
        history and counts."""
        ratio = 1.0 - (kept + 0.5) / self.channels  # int(N·(1 - ratio)) == kept exactly
        m = copy.deepcopy(self.model)
        for q in m.parameters():
            q.grad = None
        pr = self._make_pruner(m, pruning_ratio=ratio)
        pr.step()
        return json.loads(json.dumps(pr.pruning_history())), count(m, self.input_size)

    def _prune(self, epoch: int) -> dict:
        key = self.select_cost
        budget = int(self.keep * self.dense[key])  # floor, as PAAM's budget selection
        if budget >= self.dense[key]:
            self.pruned = True
            self.search = {"budget": budget, "kept_channels": self.channels, "trials": 0}
            return {"epoch": epoch, "event": "select", "params": self.dense["params"],
                    "flops": self.dense["flops"], "note": "the budget is the dense model"}
        trials: dict[int, tuple[list, dict[str, int]]] = {}

        def cost(k: int) -> int:
            if k not in trials:
                trials[k] = self._trial(k)
            return trials[k][1][key]

        n = self.channels
        hi, lo = n, None  # cost(hi) > budget; cost(lo) <= budget
        for j in range(1, 16):
            k = max(1, round(n * (16 - j) / 16))
            if cost(k) <= budget:
                lo = k
                break
            hi = k
        if lo is None:
            best = min(trials.items(), key=lambda kv: kv[1][1][key])
            raise ValueError(
                f"torch-pruning: its global pruning step cannot reach --keep {self.keep} of the "
                f"{key} ({budget:,}); the least it reached is {best[1][1][key]:,} keeping "
                f"{best[0]} of {n} channels")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cost(mid) <= budget:
                lo = mid
            else:
                hi = mid
        history, counts = trials[lo]
        self._apply(history)
        now = count(self.model, self.input_size)
        if now != counts:  # the replay must build what was counted
            raise RuntimeError(f"torch-pruning: the replayed pruning counts {now}, its trial "
                               f"{counts}")
        self.search = {"budget": budget, "select_cost": key, "scope": self.scope,
                       "kept_channels": lo,
                       "channels": n, "pruning_ratio": 1.0 - (lo + 0.5) / n,
                       "cost": counts[key], "cost_one_channel_more": cost(hi),
                       "trials": len(trials)}
        return {"epoch": epoch, "event": "compact", "method": "torch-pruning",
                **counts, **self.search, "widths": self.widths()}

    def _apply(self, history: list) -> None:
        self.pruner.load_pruning_history(copy.deepcopy(history))
        self.history = history
        self.pruned = True

    def widths(self) -> dict[str, int]:
        """Output channels of every conv, by module name."""
        return {n: m.out_channels for n, m in self.model.named_modules()
                if isinstance(m, nn.Conv2d)}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """JSON-serialisable: whether the pruning step ran, its Torch-Pruning pruning history
        and the search's figures."""
        return {"pruned": self.pruned, "history": self.history, "search": self.search,
                "reg": self.reg}

    def load_state_dict(self, state: dict) -> None:
        """Restore after :meth:`state_dict`; on a dense model, a pruned state's history is
        replayed first, so the model's own ``load_state_dict`` finds the pruned shapes."""
        if state["pruned"] and not self.pruned:
            self._apply(state["history"])
        self.pruned = bool(state["pruned"])
        self.history = state["history"]
        self.search = state["search"]
