"""paamify: turn a CNN into a PAAM network in place, and the functions that act on one.

``paamify`` finds the gated units from the graph (:mod:`paam_fast.graph`), swaps the gate sites
for :mod:`paam_fast.nn`'s gated modules (sharing their Parameters), attaches a
:class:`PaamController` as ``model.paam`` (the scoring networks, the hard masks) and a forward
pre-hook that scores every unit at the start of each forward, batching units of equal (F, D).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from . import dispatch
from .graph import Space, Structure, analyse
from .models.resnet_cifar import PadShortcut
from .nn import (
    GateBox,
    GatedBatchNorm2d,
    GatedConv2d,
    GatedConvBN2d,
    GatedLinear,
    MaskedPadShortcut,
    _Gated,
    recast,
)
from .selection import Selection, check_keep, check_mass, choose
from .selection.keys import MEASURED_KEYS
from .surgery import slice_cats, slice_space

__all__ = ["PaamController", "paamify", "is_paamified", "controller", "scores", "penalty",
           "BALANCES", "select", "apply_masks", "freeze", "compact", "param_groups",
           "DEFAULT_INPUT_SIZE"]

DEFAULT_INPUT_SIZE = (1, 3, 224, 224)


class _ShapeGroup(nn.Module):
    """Scoring networks of the units that share (F, D): stacked, so one bmm chain scores all.

    Parameters: wq, wk, wv (G, D, d); w (G, d), zero at init, and b (G,) = ``init_bias``, so
    every filter of a unit starts with the same e = b0 and, under normalize="max", g = 1.
    """

    def __init__(self, n: int, f: int, d_tok: int, dim: int, dtype, device,
                 init_bias: float = 0.0) -> None:
        super().__init__()
        # Xavier-like scale for the projections; the head's w is zero so every e = b0 at init:
        # with g = s / max s every gate is then exactly 1 (x / x) whatever b0 is.
        std = 1.0 / math.sqrt(d_tok)
        kw = {"dtype": dtype, "device": device}
        self.wq = nn.Parameter(torch.randn(n, d_tok, dim, **kw) * std)
        self.wk = nn.Parameter(torch.randn(n, d_tok, dim, **kw) * std)
        self.wv = nn.Parameter(torch.randn(n, d_tok, dim, **kw) * std)
        self.w = nn.Parameter(torch.zeros(n, dim, **kw))
        self.b = nn.Parameter(torch.full((n,), float(init_bias), **kw))
        self.f = f


class PaamController(nn.Module):
    """Everything PAAM adds to a model: ``model.paam``.

    Holds the scoring networks (``groups``), the hard masks (buffers ``mask_<i>``, (F,) bool per
    unit), the configuration and the structure found by :func:`paam_fast.graph.analyse`.
    """

    def __init__(self, model: nn.Module, structure: Structure, *, dim: int, leak: float,
                 normalize: str, coupling: str, scorer: str = "attention",
                 init_bias: float = 0.0, residual: bool = False) -> None:
        super().__init__()
        self.dim, self.leak, self.normalize, self.coupling = dim, leak, normalize, coupling
        self.residual = residual
        self.init_bias = init_bias
        self.scorer = scorer
        self.structure = structure
        self.units: list[Space] = structure.units
        self._mods = dict(model.named_modules())
        self._boxes = [GateBox() for _ in self.units]
        self._last = GateBox()  # list of (G, F) gates per group, from the last forward
        self.frozen = False
        self.compacted = False
        self._all_alive = [True] * len(structure.units)
        # masked mode: "compact" runs on the alive channels only; "dense" multiplies by masks
        self.masked_compute = "compact"
        self._cost_cache: dict[str, tuple[list[float], float]] = {}
        # dense index of each kept channel, per space id (composed over compactions)
        self.kept: dict[int, list[int]] = {}
        p = next(model.parameters())
        for i, u in enumerate(self.units):
            self.register_buffer(f"mask_{i}", torch.ones(u.width, dtype=torch.bool,
                                                          device=p.device))
        self.register_load_state_dict_post_hook(self.masks_changed)
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, u in enumerate(self.units):
            by_shape[(u.width, self._token_dim(u))].append(i)
        self.groups = nn.ModuleList()
        self.group_units: list[list[int]] = []
        self._fold_sites: list[str] = []
        if scorer == "bn":  # Network Slimming: no scoring network, gates stay 1 until frozen
            by_shape = {}
        for (f, d_tok), idx in by_shape.items():
            self.groups.append(_ShapeGroup(len(idx), f, d_tok, dim, p.dtype, p.device,
                                           init_bias))
            self.group_units.append(idx)
        if self.groups:
            self._plan_folding()

    def _plan_folding(self) -> None:
        """Every affine BN gate site gets γ' = g·γ, β' = g·β from one flat computation per
        forward: the sites' γ and β concatenated, times the gates gathered by ``_fold_rows``
        (positions in the gates of all groups, flattened group by group)."""
        base, pos = 0, {}
        for idx in self.group_units:
            f = self.units[idx[0]].width
            for row, i in enumerate(idx):
                pos[i] = base + row * f
            base += len(idx) * f
        rows = []
        for i, u in enumerate(self.units):
            for name in u.sites:
                m = self._mods[name]
                if isinstance(m, GatedBatchNorm2d) and m.weight is not None and m.bias is not None:
                    self._fold_sites.append(name)
                    rows.append(torch.arange(u.width) + pos[i])
                    m._paam_fold = GateBox()
        dev = self.mask(0).device
        self.register_buffer("_fold_rows", torch.cat(rows).to(dev) if rows else
                             torch.zeros(0, dtype=torch.long, device=dev), persistent=False)

    def _fold(self, gates: list[torch.Tensor]) -> None:
        if not self._fold_sites:
            return
        sites = [self._mods[n] for n in self._fold_sites]
        gamma = torch.cat([m.weight for m in sites])
        beta = torch.cat([m.bias for m in sites])
        g = torch.cat([x.reshape(-1) for x in gates]).index_select(0, self._fold_rows)
        g = g.to(gamma.dtype)
        sizes = [m.weight.shape[0] for m in sites]
        for m, w, b in zip(sites, (gamma * g).split(sizes), (beta * g).split(sizes)):
            m._paam_fold.value = (w, b)

    # ------------------------------------------------------------------ helpers
    def _token_dim(self, u: Space) -> int:
        return sum(self._mods[c].weight[0].numel() for c in u.token_convs)

    def mask(self, i: int) -> torch.Tensor:
        return self._buffers[f"mask_{i}"]

    def masks(self) -> list[torch.Tensor]:
        return [self.mask(i) for i in range(len(self.units))]

    def tokens(self, i: int) -> torch.Tensor:
        """Unit i's tokens (F, D): its filters flattened, detached (§3)."""
        ws = [self._mods[c].weight.detach().flatten(1) for c in self.units[i].token_convs]
        return ws[0] if len(ws) == 1 else torch.cat(ws, 1)

    def widths(self) -> dict[int, int]:
        """Physical width of every space now (alive counts for gated units)."""
        w = self.structure.widths()
        for sid, kept in self.kept.items():
            w[sid] = len(kept)
        if not self.compacted:
            for i, u in enumerate(self.units):
                w[u.id] = int(self.mask(i).sum())
        return w

    # ------------------------------------------------------------------ scoring
    def compute_gates(self) -> list[torch.Tensor]:
        """Score every unit: the fused Triton kernels (all units, a few launches) or one batched
        reference chain per (F, D) group. Returns (G, F) per group."""
        if self._triton():
            from .triton_scoring import score_all

            return score_all(self)[0]
        out = []
        for grp, idx in zip(self.groups, self.group_units):
            x = torch.stack([self.tokens(i) for i in idx]) if len(idx) > 1 \
                else self.tokens(idx[0])[None]
            # whether every filter is alive is cached on the host (no device sync per step)
            alive = None if all(self._all_alive[i] for i in idx) \
                else torch.stack([self.mask(i) for i in idx])
            out.append(dispatch.score(x, grp.wq, grp.wk, grp.wv, grp.w, grp.b, alive,
                                      self.leak, self.normalize, self.residual))
        return out

    def refresh(self) -> None:
        """Compute this forward's gates and hand each unit's to its gate sites."""
        if self.frozen or self.scorer == "bn":
            return
        if self._triton():  # the kernel writes the folded affines itself
            from .triton_scoring import score_all

            gates, folds = score_all(self)
            for n, wb in folds.items():
                self._mods[n]._paam_fold.value = wb
        else:
            gates = self.compute_gates()
            self._fold(gates)
        self._last.value = gates
        for g, idx in zip(gates, self.group_units):
            for row, i in enumerate(idx):
                self._boxes[i].value = g[row]

    def _triton(self) -> bool:
        if self.residual:  # the fused kernels have no residual path yet: the reference scores
            return False
        p = self.groups[0].wq
        return dispatch.scoring_backend(p.device, p.dtype, self.dim)[0] == "triton"

    def unit_gates(self, detach: bool = True) -> list[torch.Tensor]:
        """Per unit (F,) gates of the last forward (frozen gates once frozen)."""
        if self.frozen:
            return [self._mods[u.sites[0]].paam_gate for u in self.units]
        if self.scorer == "bn":
            return [self.bn_scores(i) if detach else self.bn_scores(i, grad=True)
                    for i in range(len(self.units))]
        if self._last.value is None:
            raise RuntimeError("no scores yet: run a forward pass of the model first")
        out: list[torch.Tensor | None] = [None] * len(self.units)
        for g, idx in zip(self._last.value, self.group_units):
            for row, i in enumerate(idx):
                out[i] = g[row].detach() if detach else g[row]
        return out

    def bn_scores(self, i: int, grad: bool = False) -> torch.Tensor:
        """Network Slimming's score of unit i: |γ| of its gate-site BNs (mean over sites)."""
        sites = [self._mods[n] for n in self.units[i].sites]
        gammas = [m.weight for m in sites if isinstance(m, nn.BatchNorm2d)]
        if not gammas:
            raise ValueError(f"unit '{self.units[i].name}' ends in no BatchNorm: scorer='bn' "
                             "(Network Slimming) needs one")
        s = torch.stack([g.abs() for g in gammas]).mean(0).float()
        s = s * self.mask(i).to(s.dtype)
        return s if grad else s.detach()

    def fresh_unit_gates(self) -> list[torch.Tensor]:
        """Per unit (F,) gates computed now from the current weights, masked, no autograd."""
        with torch.no_grad():
            if self.scorer == "bn":
                return [self.mask(i).float() for i in range(len(self.units))]
            out: list[torch.Tensor | None] = [None] * len(self.units)
            for g, idx in zip(self.compute_gates(), self.group_units):
                for row, i in enumerate(idx):
                    out[i] = g[row] * self.mask(i).to(g.dtype)
            return out

    def masks_changed(self, *_) -> None:
        """Refresh what depends on the masks: host-side caches (so a step needs no device
        sync) and the BNs' frozen-statistics masks.  Runs after load_state_dict too."""
        self._all_alive = [bool(self.mask(i).all()) for i in range(len(self.units))]
        self._cost_cache.clear()
        self.__dict__.pop("_triton_table", None)  # alive counts changed: rebuilt on next use
        compact_exec = self.masked_compute == "compact" and not self.compacted
        ops = dispatch.masked() if compact_exec and not all(self._all_alive) else None
        for name in _carriers(self.structure):  # clear, then set below: a module can sit in
            m = self._mods[name]                 # two units
            m._paam_out_idx = m._paam_in_idx = m._paam_alive = None
            m._paam_ops = ops
        for i, u in enumerate(self.units):
            if self._all_alive[i] or self.compacted:
                continue
            if not compact_exec:
                for name in u.channelwise + u.shifts:  # BNs: frozen statistics; shifts: zeros
                    if isinstance(self._mods[name], (GatedBatchNorm2d, MaskedPadShortcut)):
                        self._mods[name]._paam_alive = self.mask(i)
                continue
            idx = torch.nonzero(self.mask(i)).flatten()
            for name in u.writers + u.channelwise:
                self._mods[name]._paam_out_idx = idx
            for name, block in u.consumers:
                self._mods[name]._paam_in_idx = _blocks(idx, block)
        if compact_exec:  # consumers of a concat read the alive channels of every segment
            alive = {u.id: torch.nonzero(self.mask(i)).flatten()
                     for i, u in enumerate(self.units) if not self._all_alive[i]}
            for cat in self.structure.cats:
                if not any(sid in alive for sid, _ in cat.segments):
                    continue
                idx = cat.index(alive).to(self.mask(0).device)
                for name, block in cat.consumers:
                    self._mods[name]._paam_in_idx = _blocks(idx, block)

    def penalty_weights(self, cost: str) -> tuple[list[float], float, torch.Tensor]:
        """(c_l per unit, Σ_l c_l·alive_l, c per gate row in group-major order (fp32, on the
        device)), cached until the masks change."""
        if cost not in self._cost_cache:
            c = self.filter_costs(cost)
            den = sum(ci * int(m.sum()) for ci, m in zip(c, self.masks()))
            rows = [torch.full((self.units[i].width,), c[i]) for idx in self.group_units
                    for i in idx]
            vec = (torch.cat(rows) if rows else torch.zeros(0)).to(self.mask(0).device)
            self._cost_cache[cost] = (c, float(den), vec)
        return self._cost_cache[cost]

    def unit_balance_weights(self, cost: str) -> torch.Tensor:
        """Per gate row (group-major, fp32, on the device): c_l / (alive_l · Σ_l' c_l'), so
        that Σ rows·g = Σ_l c_l·ḡ_l / Σ_l c_l (penalty balance "unit"); cached like
        :meth:`penalty_weights`."""
        key = f"unit:{cost}"
        if key not in self._cost_cache:
            c = self.filter_costs(cost)
            tot = sum(c) if sum(c) > 0 else 1.0
            alive = [max(int(m.sum()), 1) for m in self.masks()]
            rows = [torch.full((self.units[i].width,), c[i] / (alive[i] * tot))
                    for idx in self.group_units for i in idx]
            vec = (torch.cat(rows) if rows else torch.zeros(0)).to(self.mask(0).device)
            self._cost_cache[key] = ([], 0.0, vec)
        return self._cost_cache[key][2]

    def filter_costs(self, cost: str) -> list[float]:
        """c_l of §5: what one filter of each unit costs now, consumers' slices included."""
        if cost == "uniform":
            return [1.0] * len(self.units)
        if cost == "latency":
            return self._latency_filter_costs()
        if cost not in ("params", "flops"):
            raise ValueError(f"cost must be 'uniform', 'params', 'flops' or 'latency', got "
                             f"{cost!r}")
        w = self.widths()
        out = []
        for u in self.units:
            touching = self.structure.costs_touching(u.id)
            f = (lambda c, ww: c.params(ww)) if cost == "params" else (lambda c, ww: c.macs(ww))
            now = sum(f(c, w) for c in touching)
            # a grouped unit loses one filter per group at a time: its cost per filter is a
            # G-th of that (one filter alone would leave a width the groups do not divide)
            w2 = dict(w)
            w2[u.id] = max(w[u.id] - u.groups, 0)
            out.append(float(now - sum(f(c, w2) for c in touching)) / u.groups)
        return out

    def _latency_filter_costs(self) -> list[float]:
        """c_l under ``cost="latency"``: the ms one filter of each unit costs now in the timed
        layers of ``self.latency_table`` (set by :class:`~paam_fast.Pruner`; the penalty divides
        by the total, so the table's fit from layers to network cancels), floored at a millionth
        of the dearest so a noisy flat stretch of the table never makes a filter free."""
        table = getattr(self, "latency_table", None)
        if table is None:
            raise ValueError("cost='latency' needs a latency table: Pruner(..., latency=table) "
                             "or model.paam.latency_table = table")
        from .selection.costs import LatencyCost, step_costs

        c = step_costs(LatencyCost(self.structure, table), self.units, self.widths(),
                       [u.groups for u in self.units])
        floor = 1e-6 * max(c)
        return [max(x, floor) for x in c]

    def _pre_forward(self, module, args) -> None:
        self.refresh()

    def forward(self, x):
        """Identity.  The controller is a child of the model (so ``model.parameters()`` holds
        the scoring networks); an ``nn.Sequential`` model calls its children in order, and the
        controller, registered last, must then pass the output through unchanged."""
        return x


def _blocks(idx: torch.Tensor, block: int) -> torch.Tensor:
    """Feature indices of channels ``idx`` when each channel owns ``block`` features."""
    return idx if block == 1 else (
        idx[:, None] * block + torch.arange(block, device=idx.device)).flatten()


def _carriers(structure: Structure) -> list[str]:
    """Every module that carries a unit's channels (sliced when it is pruned)."""
    names: list[str] = []
    for u in structure.units:
        names += u.sites + u.writers + u.channelwise + [c[0] for c in u.consumers]
    for cat in structure.cats:
        names += [c[0] for c in cat.consumers]
    return list(dict.fromkeys(names))


def is_paamified(model: nn.Module) -> bool:
    return isinstance(getattr(model, "paam", None), PaamController)


def controller(model: nn.Module) -> PaamController:
    """``model.paam``; a DDP / compiled wrapper is looked through to the model it holds."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if not is_paamified(model) and isinstance(inner, nn.Module):
            model = inner
    ctrl = getattr(model, "paam", None)
    if not isinstance(ctrl, PaamController):
        raise ValueError("this model is not paamified: call paam_fast.paamify(model) first")
    return ctrl


def _forced_sites(model: nn.Module) -> dict[str, str]:
    forced = {}
    for name, m in model.named_modules():
        if isinstance(m, GatedConvBN2d):
            forced[f"{name}.conv" if name else "conv"] = f"{name}.bn" if name else "bn"
        elif isinstance(m, GatedConv2d):
            forced[name] = name
    return forced


def default_init_bias(normalize: str) -> float:
    """b0 when none is given: -2 under normalize="max" (every b0 starts exactly dense there, and
    -2 keeps filters off the leaky-exp's kink: +2.70 ± 2.09 val pts over b0 = 0, paired, 5 seeds,
    RESULTS.md issue-11 proxy); 0 under "none", where b0 scales the start (PAAM_METHOD.md §3)."""
    return -2.0 if normalize == "max" else 0.0


def _check_options(model: nn.Module, dim, leak, normalize, scorer, init_bias) -> float:
    """paamify's argument checks (a clear ValueError, the model untouched); returns b0."""
    if is_paamified(model):
        raise ValueError("this model is already paamified (model.paam exists); paamify it once")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not (isinstance(leak, (int, float)) and 0 <= leak < math.inf):
        raise ValueError(f"leak must be a finite non-negative number, got {leak!r}")
    if normalize not in ("max", "none"):
        raise ValueError(f"normalize must be 'max' or 'none', got {normalize!r}")
    if scorer not in ("attention", "bn"):
        raise ValueError(f"scorer must be 'attention' or 'bn', got {scorer!r}")
    if init_bias is None:
        init_bias = default_init_bias(normalize)
    if isinstance(init_bias, bool) or not isinstance(init_bias, (int, float)) \
            or not math.isfinite(init_bias):
        raise ValueError(f"init_bias must be a finite number, got {init_bias!r}")
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters to prune")
    if any(p.is_meta for p in params):
        raise ValueError("the model is on the meta device: materialise it (e.g. model.to_empty("
                         "device='cpu') and initialise) before paamify; scoring needs real weights")
    return float(init_bias)


def paamify(model: nn.Module, coupling: str = "internal", dim: int = 32, leak: float = 0.01,
            normalize: str = "max", input_size: tuple[int, ...] | None = None,
            scorer: str = "attention", init_bias: float | None = None,
            residual: bool = False) -> nn.Module:
    """Make ``model`` a PAAM network, in place, and return it.

    Args:
        model: an fx-traceable CNN (torchvision classifiers, ``paam_fast.models``, models built
            from ``paam_fast.nn``'s drop-in modules).
        coupling: "internal" (default) or "grouped" (channels tied by residual adds share a gate).
        dim: attention width d; leak: the leaky-exp slope α above 0.
        normalize: "max" (g = s / max s, default) or "none" (g = s, the paper-literal variant).
        input_size: (N, C, H, W) at which FLOPs are counted; default ``model.input_size`` if the
            model has one (``paam_fast.models`` do), else (1, 3, 224, 224).
        scorer: "attention" (PAAM) or "bn" (the Network Slimming baseline: filters ranked by the
            |γ| of their BN, penalty L1 on those γ; same selection and compaction).
        init_bias: b0, the scoring head's starting bias (ours, PAAM_METHOD.md §3).  With w = 0
            every filter starts at e = b0; under normalize="max" every gate is exactly 1 at init
            for any b0, and a b0 < 0 (e.g. -2) starts every filter on the leaky-exp's exp branch
            instead of on its kink at 0.  Under normalize="none" the start is g = leaky_exp(b0)
            (dense only at b0 = 0).  Default (None): ``default_init_bias(normalize)``, i.e. -2
            under "max" (chosen by the paired 5-seed CIFAR proxy runs, RESULTS.md) and 0 under
            "none".
        residual: score with H = V + P·V instead of P·V (ours, an option): each filter's own
            projection beside the attended one, so scores can tell filters apart under
            near-uniform attention.  Scored by the PyTorch reference (no fused kernel yet).
    Returns:
        the same model, with ``model.paam`` (:class:`PaamController`).  Units that cannot be gated
        are listed in ``model.paam.structure.ungated`` with the reason.
    """
    init_bias = _check_options(model, dim, leak, normalize, scorer, init_bias)
    if input_size is None:
        input_size = tuple(getattr(model, "input_size", DEFAULT_INPUT_SIZE))
        if len(input_size) == 3:
            input_size = (1, *input_size)
    structure = analyse(model, tuple(input_size), coupling, _forced_sites(model))
    if not structure.units:
        reasons = "; ".join(f"{n}: {r}" for n, r in structure.ungated[:5])
        raise ValueError(f"paam_fast found no unit it can gate in {type(model).__name__} "
                         f"(coupling={coupling!r}). {reasons}")
    for w in structure.warnings:
        import warnings

        warnings.warn(w, stacklevel=2)
    # Swap the gate sites (and every BN of a unit, for masked mode's frozen statistics).
    swap = {}
    # Every conv / BN / Linear that carries a unit's channels gets a gated class (same
    # Parameters): sites apply the gate, and in masked mode all of them run on alive channels.
    for name in _carriers(structure):
        m = model.get_submodule(name)
        if isinstance(m, _Gated) or name in swap:
            continue
        if isinstance(m, nn.BatchNorm2d):
            swap[name] = recast(m, GatedBatchNorm2d)
        elif isinstance(m, nn.Conv2d):
            swap[name] = recast(m, GatedConv2d)
        elif isinstance(m, nn.Linear):
            swap[name] = recast(m, GatedLinear)
        elif isinstance(m, PadShortcut):
            swap[name] = recast(m, MaskedPadShortcut)
    for name, new in swap.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    ctrl = PaamController(model, structure, dim=dim, leak=float(leak), normalize=normalize,
                          coupling=coupling, scorer=scorer, init_bias=float(init_bias),
                          residual=bool(residual))
    model.paam = ctrl
    for i, u in enumerate(structure.units):
        for name in u.sites:
            ctrl._mods[name]._paam_box = ctrl._boxes[i]
    model.register_forward_pre_hook(ctrl._pre_forward)
    return model


# ---------------------------------------------------------------------- public functions
def scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """{unit name: fp32 (F,) gate values g} of the last forward (dead filters 0)."""
    ctrl = controller(model)
    return {u.name: g.detach().float().clone() for u, g in zip(ctrl.units, ctrl.unit_gates())}


BALANCES = ("filter", "unit", "budget")


def penalty(model: nn.Module, cost: str = "uniform", balance: str = "filter",
            budget: float | None = None) -> torch.Tensor:
    """The additive term of §5 (fp32 scalar, differentiable w.r.t. the scoring networks; zero
    once the gates are frozen), over alive filters (dead ones have g = 0):

    * ``balance="filter"`` (default): m = Σ_l Σ_i c_l·g_li / Σ_l Σ_i c_l, the per-filter mean;
      a unit's total push grows with its width.
    * ``"unit"``: Σ_l c_l·ḡ_l / Σ_l c_l with ḡ_l the mean alive gate of unit l: every unit
      weighs the same whatever its width (with ``cost="uniform"``, the mean over units).
    * ``"budget"``: |m − ``budget``| with m the per-filter mean above: pushes the mean gate
      to the budget (from either side) and no further.  ``budget`` in (0, 1] is needed.

    "unit" and "budget" are ours (PAAM_METHOD.md §5 leaves the balance open).
    """
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    if balance == "budget":
        if budget is None:
            raise ValueError("balance='budget' needs budget= (the kept fraction aimed at)")
        check_keep(budget)
    ctrl = controller(model)
    if ctrl.frozen:
        p = next(model.parameters())
        return torch.zeros((), dtype=torch.float32, device=p.device)
    if ctrl.scorer == "bn":  # Network Slimming: L1 on the units' BN γ
        return sum(ctrl.bn_scores(i, grad=True).sum() for i in range(len(ctrl.units)))
    if ctrl._last.value is None:
        raise RuntimeError("no scores yet: run a forward pass of the model first")
    # one flat dot product for all units (dead filters have g = 0); the Triton path hands the
    # flat gates over as they are (triton_scoring.FlatGates)
    flat = getattr(ctrl._last.value, "flat", None)
    g = (flat if flat is not None else torch.cat([x.reshape(-1) for x in ctrl._last.value]))
    g = g.float()
    if balance == "unit":
        return (g * ctrl.unit_balance_weights(cost)).sum()
    _, den, vec = ctrl.penalty_weights(cost)
    m = (g * vec).sum() / max(den, 1e-30)
    return m if balance == "filter" else (m - float(budget)).abs()


def select(model: nn.Module, keep: float | None = None, mass: float | None = None,
           cost: str = "params", min_keep: float = 0.05, round_to: int = 1,
           key: str = "gate", beta: float = 0.0, allocation: str = "global",
           latency=None, importance: list[torch.Tensor] | None = None) -> Selection:
    """Global selection (§6.2) on the last forward's gates; applies the hard masks.

    Args:
        keep: budget mode, a fraction in (0, 1] of the dense model's ``cost``.
        mass: mass mode, a fraction in (0, 1] of the summed gates (default 0.95 if neither).
        cost: "params", "flops" or "latency" (with ``latency``, a
            :class:`~paam_fast.latency.LatencyTable` measured for this model: ``keep`` is then
            a fraction of its predicted dense latency); min_keep: per-unit floor fraction;
            round_to: width multiple.
        key, beta: what filters are ranked by ("gate", "unit_mean" or "taylor"), divided by
            their cost^beta (:mod:`paam_fast.selection.keys`; ours, default: the gate itself).
        importance: per unit (F,) values measured for a measured key (``key="taylor"``: from
            :func:`paam_fast.selection.taylor.taylor_importance`), ranked in place of the gates.
        allocation: "global" (§6.2) or "uniform" (the uniform baseline's widths, each unit's
            best filters by the key: a control).
    Returns:
        the :class:`~paam_fast.selection.Selection`; the model's masks now hold it.
    """
    ctrl = controller(model)
    if ctrl.frozen:
        raise ValueError("gates are frozen (the model was compacted or frozen): nothing to select")
    if keep is None and mass is None:
        mass = 0.95
    if keep is not None:
        check_keep(keep)
    if mass is not None:
        check_mass(mass)
    if key in MEASURED_KEYS:
        if importance is None or len(importance) != len(ctrl.units):
            raise ValueError(f"key={key!r} ranks measured values: pass importance= (one (F,) "
                             "tensor per gated unit, e.g. paam_fast.selection.taylor."
                             "taylor_importance(model, batches))")
        for u, v in zip(ctrl.units, importance):
            if v.shape != (u.width,):
                raise ValueError(f"importance of unit '{u.name}' has shape {tuple(v.shape)}, "
                                 f"expected ({u.width},)")
        gates = [v.detach().float() for v in importance]
    elif importance is not None:
        raise ValueError(f"importance= is only used by a measured key "
                         f"({sorted(MEASURED_KEYS)}), not key={key!r}")
    else:
        gates = ctrl.unit_gates()
    sel = choose(ctrl.units, gates, ctrl.masks(), ctrl.structure, ctrl.widths(), keep=keep,
                 mass=mass, cost=cost, min_keep=min_keep, round_to=round_to, key=key, beta=beta,
                 allocation=allocation, latency=latency)
    apply_masks(model, sel.alive)
    return sel


def apply_masks(model: nn.Module, alive: dict[str, torch.Tensor]) -> None:
    """Set the hard masks (unit name -> (F,) bool) and point the units' BNs at them."""
    ctrl = controller(model)
    for i, u in enumerate(ctrl.units):
        if u.name in alive:
            ctrl.mask(i).copy_(alive[u.name].to(ctrl.mask(i).device))
    ctrl.masks_changed()
    if ctrl._last.value is not None:  # the last forward's gates, masked, for scores()/select()
        ctrl._last.value = [g * torch.stack([ctrl.mask(i) for i in idx]).to(g.dtype)
                            for g, idx in zip(ctrl._last.value, ctrl.group_units)]


def _drop_from_optimizer(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    for p in params:
        optimizer.state.pop(p, None)


def freeze(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Freeze the gates at their current values (masked) as buffers ``paam_gate`` on the gate
    sites and drop the scoring networks (their parameters leave ``optimizer``; its param groups
    stay, possibly empty, so LR schedulers still line up)."""
    ctrl = controller(model)
    if ctrl.frozen:
        return
    for i, gi in enumerate(ctrl.fresh_unit_gates()):
        for name in ctrl.units[i].sites:
            site = ctrl._mods[name]
            site.register_buffer("paam_gate", gi.to(site.weight.dtype).clone())
            site._paam_box = site._paam_fold = None
    if optimizer is not None:
        _drop_from_optimizer(optimizer, list(ctrl.groups.parameters()))
    ctrl.groups = nn.ModuleList()
    ctrl.group_units = []
    ctrl._last.value = None
    ctrl.frozen = True


def compact(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Remove the dropped filters physically, in place (§6.3 "compact").

    Conv rows, BN entries, depthwise filters, the consumers' input channels and the classifier's
    features are sliced; ``optimizer``'s state is sliced with them (same optimizer object); the
    kept gates become frozen buffers and the scoring networks are dropped.
    Returns {unit name: kept width}.
    """
    ctrl = controller(model)
    if ctrl.compacted:
        return {u.name: len(ctrl.kept[u.id]) for u in ctrl.units}
    freeze(model, optimizer)
    for i, u in enumerate(ctrl.units):
        mask = ctrl.mask(i)
        idx = torch.nonzero(mask).flatten()
        if idx.numel() == 0:
            raise RuntimeError(f"unit '{u.name}' has no alive filter")
        if idx.numel() < mask.numel():
            slice_space(ctrl._mods, u.writers, u.channelwise, u.consumers, idx,
                        optimizer)
        ctrl.kept[u.id] = idx.tolist()
        ctrl._buffers[f"mask_{i}"] = torch.ones(idx.numel(), dtype=torch.bool,
                                                device=mask.device)
    slice_cats(ctrl._mods, ctrl.structure.cats,
               {u.id: torch.tensor(ctrl.kept[u.id], dtype=torch.long) for u in ctrl.units
                if len(ctrl.kept[u.id]) < u.width}, optimizer)
    ctrl.compacted = True
    ctrl.masks_changed()
    return {u.name: len(ctrl.kept[u.id]) for u in ctrl.units}


def param_groups(model: nn.Module, weight_decay: float = 1e-4,
                 score_lr: float | None = None) -> list[dict]:
    """Optimizer param groups of §6: the network with ``weight_decay``, the scoring networks
    without (their group is named "paam" and stays, empty, after compaction).  ``score_lr``:
    a learning rate of their own for the scoring networks (default: the optimizer's)."""
    ctrl = controller(model)
    an = {id(p) for p in ctrl.parameters()}
    net = [p for p in model.parameters() if id(p) not in an]
    paam = {"params": list(ctrl.parameters()), "weight_decay": 0.0, "name": "paam"}
    if score_lr is not None:
        if not (isinstance(score_lr, (int, float)) and score_lr > 0 and math.isfinite(score_lr)):
            raise ValueError(f"score_lr must be a positive number, got {score_lr!r}")
        paam["lr"] = float(score_lr)
    return [{"params": net, "weight_decay": weight_decay, "name": "net"}, paam]



