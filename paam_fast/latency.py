"""A latency budget measured on the target device (issue 20).

A network whose gated units are at widths ``w`` (space id -> channels) is predicted to take

    T(w) = fixed + scale · Σ_l t_l(in_l(w), out_l(w))        (milliseconds per forward)

where l runs over the layers whose width a gated unit changes: every conv and linear layer that
reads or writes a gated space, timed together with the BatchNorm and the activation that
directly follow it when its output is gated (they shrink with it), and a gated BatchNorm that
follows no such layer, alone.  Each t_l is measured once per distinct layer shape (ResNet50
repeats most of its shapes), in eval mode, forward only, at a grid of (input width, output
width) points at the layer's real input size, stride, kernel and groups (a depthwise conv's one
width is both), with warm-up and the median over repeats, and interpolated bilinearly in
between.  With ``fit="rest"`` ``scale`` is 1 and ``fixed`` is the rest: the
measured latency of the dense network minus the table's sum at dense widths (stem, residual
adds, pooling, ungated layers, the framework's overhead).

What the prediction leaves out: layers timed alone do not share caches with their neighbours as
they do inside the network, and width-dependent work outside the timed blocks (a residual add of
a grouped unit, an activation that does not directly follow its layer) sits in ``fixed`` at its
dense cost.  One in-network profile on a CPU (ResNet50, batch 1, one thread, a machine busy
with other work) found the "fixed" rest of the half-width network ~30% below the dense one's
(activations staying in cache more often), so that ``fit="rest"`` over-predicted it by ~10%;
other tables on the same machine predicted it within 1%: the noise there did not settle it.
``fit="scale"`` (ours, the default from 2026-12-03 to 2026-12-07) fits ``fixed`` and ``scale``
to two measured networks instead, the dense one and every unit at half its width: every ms the
table removes then removes ``scale`` ms.  On an idle machine (BENCHMARKS.md, "Latency budgets
... idle") it predicted every exported network's latency relative to dense within 6%, where
"rest" missed CIFAR ResNet20 at batch 256 by up to 32% (its isolated layers run faster than
inside the network); without ``check`` there is no half-width measurement and the fit is "rest".
Both are one straight line from the layers' sum Σ to the network's time, and neither holds far
below half width where the untimed rest (residual adds, the ReLUs after them, shortcuts) shrinks
with the gated stages: grouped CIFAR ResNet20 at batch 256, whose networks at 0.3 of latency sit
near an eighth of its widths, was over-predicted by 64% (BENCHMARKS.md).  ``fit="curve"`` (ours)
puts the line through more measured networks: T = f(Σ), f piecewise linear through the networks
with every unit at an eighth, a quarter, three eighths, half and three quarters of its width and
the dense one (those at five sixteenths and five eighths are left out, to check it), extended
linearly beyond them.  Three eighths became an anchor on 2026-12-08: held out, it was
over-predicted in 6 of 6 idle runs (−1 to −17%), where budgets near 0.3 of latency land.
f is increasing (a table whose measurements are not is refused, and falls back to "scale"), so
a budget T ≤ keep · T_dense is Σ ≤ f⁻¹(keep · T_dense): the selection counts Σ, which stays
additive over the layers.  It is the default since 2026-12-07 (BENCHMARKS.md, "A curve
through measured networks"): on grouped ResNet20 at batch 256 the held-out networks told the
"scale" line's bias between half width and dense (the three-quarter network over-predicted by
7–31% in three idle runs) and below half width (up to 26% at 0.3 of latency).
A layer's time can jump just past a multiple of 8: on the 2-core CPU a 16 × 16 conv + BN +
ReLU takes 3.7 ms at 16 → 16 channels and 12.3 ms at 17 → 17 (13.1 at 24 → 24: a fast kernel
up to 16 channels there; timed alone, and inside the network the same), a cliff that a grid of
aligned points interpolates straight across.  So a table for selections at a ``round_to`` that
is not a multiple of 8 also times each aligned grid point's next width, and reads an unaligned
width among unaligned points only (:class:`Grid`'s ``align``; up to 4× the points of an
aligned table, twice the time for grouped CIFAR ResNet20); a selection at such
a ``round_to`` with a table built without them is warned (``LatencyTable.mismatch``).  The
curve's networks stay at the plain fractions (half of grouped ResNet20 at 8 / 16 / 32): moved
off the multiples of 8 (9 / 17 / 33) they predicted the chosen networks worse (BENCHMARKS.md,
"Two families of widths").
``LatencyTable.check`` holds how far the prediction was from measured networks at other widths
(an eighth to three quarters of every unit's width), taken when the table was built.

    table = latency_table(model, (1, 3, 224, 224), batch=1)   # a paamified (or plain) model
    table.save("latency_table.json")
    sel = paam_fast.select(model, keep=0.5, cost="latency", latency=table)
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .bench.harness import compare_ms, wall_ms
from .graph import ModuleCost, Structure

__all__ = ["LatencyTable", "Grid", "latency_table", "measure_latency", "measure_like",
           "fingerprint", "predict_ms", "FORMAT"]

FORMAT = "paam_fast.latency/1"

# activations timed with the layer they follow: name -> f(x, inplace)
_ACT_FN: dict[str, Callable[[torch.Tensor, bool], torch.Tensor]] = {
    "relu": lambda x, ip: torch.relu_(x) if ip else torch.relu(x),
    "relu6": lambda x, ip: F.relu6(x, inplace=ip),
    "silu": lambda x, ip: F.silu(x, inplace=ip),
    "hardswish": lambda x, ip: F.hardswish(x, inplace=ip),
    "gelu": lambda x, ip: F.gelu(x),
    "mish": lambda x, ip: F.mish(x, inplace=ip),
    "tanh": lambda x, ip: torch.tanh(x),
    "elu": lambda x, ip: F.elu(x, inplace=ip),
    "leaky_relu": lambda x, ip: F.leaky_relu(x, inplace=ip),
    "hardtanh": lambda x, ip: F.hardtanh(x, inplace=ip),
}
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
                nn.GELU: "gelu", nn.Mish: "mish", nn.Tanh: "tanh", nn.ELU: "elu",
                nn.LeakyReLU: "leaky_relu", nn.Hardtanh: "hardtanh"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
                  F.relu6: "relu6", F.silu: "silu", F.hardswish: "hardswish", F.gelu: "gelu",
                  F.mish: "mish", torch.tanh: "tanh", F.elu: "elu", F.leaky_relu: "leaky_relu",
                  F.hardtanh: "hardtanh"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh"}


# ----------------------------------------------------------------------------- the table
def _segment(xs: list[int], x: float) -> tuple[int, float]:
    """(j, t): x = xs[j] + t·(xs[j+1] − xs[j]); outside the grid the edge segment extends
    linearly.  A one-point axis gives (0, 0)."""
    if len(xs) == 1:
        return 0, 0.0
    j = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    return j, (x - xs[j]) / (xs[j + 1] - xs[j])


@dataclass
class Grid:
    """One layer shape's measurements: ``ms[a][b]`` at input width ``ins[a]`` and output width
    ``outs[b]`` (an axis with one point does not vary).  ``op`` says what was timed.

    ``align`` = (q_in, q_out): an axis with q > 0 holds two families of widths, the multiples
    of q and the rest (its two ends belong to both), and a width is interpolated among the
    points of its own family only.  Why: a device may run a layer several times slower one
    channel past a multiple of 8 (the 2-core CPU: a 16 × 16 conv at 17 → 17 channels 3.3×
    slower than at 16 → 16; BENCHMARKS.md, "Two families of widths"), and a straight line from
    the aligned point 16 to 24 reads 17 at 16's speed."""

    op: dict
    ins: list[int]
    outs: list[int]
    ms: list[list[float]]
    align: tuple[int, int] = (0, 0)

    def __post_init__(self):
        self.align = (int(self.align[0]), int(self.align[1]))
        # per axis, per family (aligned?): the indices of its points and their widths
        self._fam = [{f: _family(xs, q, f) for f in (False, True)}
                     for xs, q in ((self.ins, self.align[0]), (self.outs, self.align[1]))]

    def _points(self, axis: int, x: float) -> tuple[list[int], list[int]]:
        q = self.align[axis]
        return self._fam[axis][bool(q) and abs(x - round(x)) < 1e-9 and round(x) % q == 0]

    def __call__(self, i: float, o: float) -> float:
        """Bilinear interpolation at (input width i, output width o), in ms, among the points
        of each width's family."""
        ia, ix = self._points(0, i)
        ob, ox = self._points(1, o)
        a, s = _segment(ix, i)
        b, t = _segment(ox, o)
        m = self.ms
        if len(ix) == 1 and len(ox) == 1:
            return m[ia[0]][ob[0]]
        if len(ix) == 1:
            r = m[ia[0]]
            return r[ob[b]] + t * (r[ob[b + 1]] - r[ob[b]])
        if len(ox) == 1:
            c = ob[0]
            return m[ia[a]][c] + s * (m[ia[a + 1]][c] - m[ia[a]][c])
        lo_row, hi_row = m[ia[a]], m[ia[a + 1]]
        lo = lo_row[ob[b]] + t * (lo_row[ob[b + 1]] - lo_row[ob[b]])
        hi = hi_row[ob[b]] + t * (hi_row[ob[b + 1]] - hi_row[ob[b]])
        return lo + s * (hi - lo)

    def to_json(self) -> dict:
        d = {"op": self.op, "ins": self.ins, "outs": self.outs, "ms": self.ms}
        if any(self.align):
            d["align"] = list(self.align)
        return d


def _family(xs: list[int], q: int, aligned: bool) -> tuple[list[int], list[int]]:
    """(indices, widths) of the points of ``xs`` in one family: all of them without ``q``;
    else the multiples of q (``aligned``) or the rest, and the two ends in both."""
    keep = [k for k, x in enumerate(xs)
            if not q or k in (0, len(xs) - 1) or (x % q == 0) == aligned]
    return keep, [xs[k] for k in keep]


@dataclass
class _Bound:
    """A table entry bound to the structure's count of that layer (its widths from ``w``)."""

    cost: ModuleCost
    grid: Grid
    depthwise: bool = False

    def ms(self, w: dict[int, int]) -> float:
        c = self.cost
        o = w.get(c.out_space, c.out_dense) if c.out_space is not None else c.out_dense
        return self.grid(o if self.depthwise else c._in(w), o)


def fingerprint(structure: Structure) -> str:
    """A digest of what a latency table depends on in a model's structure: its gated units
    (names, widths, groups), every counted layer (name, kind, dense widths, kernel, groups,
    which widths are gated) and its other parameters; not the input size."""
    units = {u.id for u in structure.units}
    rows: list = [[u.name, u.width, u.groups] for u in structure.units]
    rows += [[c.name, c.kind, c.in_dense, c.out_dense, c.k, c.groups, c.dense_params,
              c.out_space in units, c.in_space in units,
              [[d, s in units] for s, d in (c.in_cat or ())]] for c in structure.costs]
    rows.append(structure.const_params)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


@dataclass
class LatencyTable:
    """Measured per-layer latencies of one model on one device (see the module's docstring).

    ``meta``: device, torch version, batch, dtype, channels_last, input size, threads, the
    model's structure fingerprint, grid and repeats.  ``grids``: one per distinct layer shape;
    ``layers``: {"name": module name, "grid": index into grids}.  ``dense_ms``: the dense
    network measured whole; the prediction is ``fixed_ms + scale · Σ layers`` (``fit="rest"``:
    scale 1, fixed_ms = dense_ms minus the layers' sum at dense widths), or with ``anchors``
    (``fit="curve"``) Σ mapped through the line through the measured networks.  ``check``:
    measured networks at other widths against their predictions (or None).
    """

    meta: dict
    grids: list[Grid]
    layers: list[dict]
    dense_ms: float
    fixed_ms: float
    check: dict | None = None
    scale: float = 1.0
    anchors: list[list[float]] | None = None  # fit "curve": [[Σ, measured ms], ...], Σ rising
    _bound: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- the model it belongs to
    def check_structure(self, structure: Structure) -> None:
        """Raise ValueError if this table was built for another model."""
        mine = fingerprint(structure)
        if mine != self.meta.get("fingerprint"):
            raise ValueError(
                f"this latency table was built for another model (structure fingerprint "
                f"{self.meta.get('fingerprint')}, model {self.meta.get('model')!r}; this "
                f"model's is {mine}): build one for this model with "
                "paam_fast.latency.latency_table(model, ...)")

    def bind(self, structure: Structure) -> list[_Bound]:
        """The entries bound to ``structure``'s layer counts (checked to be this table's)."""
        key = id(structure)
        if key not in self._bound:
            self.check_structure(structure)
            costs = {c.name: c for c in structure.costs}
            self._bound[key] = (structure, [
                _Bound(costs[e["name"]], self.grids[e["grid"]],
                       bool(self.grids[e["grid"]].op.get("depthwise"))) for e in self.layers])
        return self._bound[key][1]

    def predict(self, structure: Structure, widths: dict[int, int] | None = None) -> float:
        """Predicted ms per forward at ``widths`` (default: dense)."""
        w = structure.widths() if widths is None else widths
        return self.ms_of(sum(b.ms(w) for b in self.bind(structure)))

    def ms_of(self, layers_ms: float) -> float:
        """The network's predicted ms when its timed layers sum to ``layers_ms``."""
        if not self.anchors:
            return self.fixed_ms + self.scale * layers_ms
        xs = [a[0] for a in self.anchors]
        j, t = _segment(xs, layers_ms)
        lo, hi = self.anchors[j][1], self.anchors[j + 1][1]
        return lo + t * (hi - lo)

    def layers_for(self, ms: float) -> float:
        """The inverse of :meth:`ms_of`: the layers' sum at which the network is predicted to
        take ``ms`` (the prediction increases with the sum)."""
        if not self.anchors:
            return (ms - self.fixed_ms) / self.scale
        ys = [a[1] for a in self.anchors]
        j, t = _segment(ys, ms)
        lo, hi = self.anchors[j][0], self.anchors[j + 1][0]
        return lo + t * (hi - lo)

    def mismatch(self, round_to: int) -> str | None:
        """Why this table does not serve a selection at ``round_to`` well, or None: built for
        widths on multiples of 8 only, it reads the slower widths in between as if aligned."""
        mine = self.meta.get("round_to")
        if mine is None or mine % 8 or not round_to % 8:
            return None
        return (f"the latency table was built for round_to={mine} (widths on multiples of 8) and "
                f"this selection has round_to={round_to}: widths off the multiples of 8 are read "
                "as fast as the aligned ones around them (build the table with "
                f"round_to={round_to})")

    def refit(self, fit: str) -> LatencyTable:
        """A copy fitted as ``fit`` says ("rest", "scale" or "curve"), from the measurements
        this table holds (the dense network and, for "scale" and "curve", the narrower ones);
        its check's predictions follow.  The layers' grids are shared."""
        t = copy.copy(self)
        t.meta, t.check, t._bound = dict(self.meta), copy.deepcopy(self.check), {}
        _apply_fit(t, fit)
        return t

    # ---- files
    def to_json(self) -> dict:
        return {"format": FORMAT, **self.meta, "dense_ms": self.dense_ms,
                "fixed_ms": self.fixed_ms, "scale": self.scale, "check": self.check,
                "anchors": self.anchors, "layers": self.layers,
                "grids": [g.to_json() for g in self.grids]}

    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        tmp = path + ".part"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def from_json(cls, d: dict) -> LatencyTable:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a paam_fast latency table (format "
                             f"{d.get('format') if isinstance(d, dict) else None!r}, expected "
                             f"{FORMAT!r})")
        body = ("format", "dense_ms", "fixed_ms", "scale", "check", "anchors", "layers",
                "grids")
        try:
            grids = [Grid(g["op"], [int(x) for x in g["ins"]], [int(x) for x in g["outs"]],
                          [[float(v) for v in row] for row in g["ms"]],
                          tuple(g.get("align", (0, 0)))) for g in d["grids"]]
            return cls(meta={k: v for k, v in d.items() if k not in body}, grids=grids,
                       layers=list(d["layers"]), dense_ms=float(d["dense_ms"]),
                       fixed_ms=float(d["fixed_ms"]), check=d.get("check"),
                       scale=float(d.get("scale", 1.0)),
                       anchors=[[float(x), float(y)] for x, y in d["anchors"]]
                       if d.get("anchors") else None)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"a malformed latency table ({type(e).__name__}: {e})") from e

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | Structure | None = None
             ) -> LatencyTable:
        """Read a table saved by :meth:`save`; with ``model`` (paamified) or a structure,
        refuse (ValueError) a table built for another model."""
        try:
            with open(os.fspath(path)) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {os.fspath(path)} as a latency table: {e}") from e
        table = cls.from_json(d)
        if model is not None:
            table.check_structure(_structure_of(model))
        return table

    def describe(self) -> str:
        m = self.meta
        return (f"latency table: {len(self.layers)} layers in {len(self.grids)} shapes, dense "
                f"{self.dense_ms:.3f} ms ("
                + (f"through {len(self.anchors)} measured networks, " if self.anchors else
                   f"fixed {self.fixed_ms:.3f} ms, scale {self.scale:.3f}, ")
                + f"fit {m.get('fit', 'rest')}) on {m.get('device')}, batch {m.get('batch')}, "
                f"{m.get('dtype')}, {m.get('threads')} threads, {m.get('clock', 'wall')} clock")


def _structure_of(model) -> Structure:
    if isinstance(model, Structure):
        return model
    from .paamify import controller

    return controller(model).structure


def predict_ms(model: nn.Module, table: LatencyTable) -> float:
    """The table's prediction for a paamified model at its current widths (masks or kept)."""
    from .paamify import controller

    ctrl = controller(model)
    return table.predict(ctrl.structure, ctrl.widths())


# ----------------------------------------------------------------------------- what to time
def _act_of(node: fx.Node, mods: dict) -> tuple[str, bool] | None:
    if node.op == "call_module":
        name = _ACT_MODULES.get(type(mods[node.target]))
        return None if name is None else (name, bool(getattr(mods[node.target], "inplace",
                                                             False)))
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        ip = bool(node.kwargs.get("inplace", False)) or node.target in (F.relu_, torch.relu_)
        return _ACT_FUNCTIONS[node.target], ip
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[node.target], node.target.endswith("_")
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _in_shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.args[0].meta["tensor_meta"].shape)


def _ops(gm: fx.GraphModule, structure: Structure) -> list[tuple[str, dict]]:
    """(module name, op) for every layer timed, in graph order.  An op is what one measurement
    builds (JSON-able): kind, dense widths, which vary, kernel, stride, ..., input spatial size,
    and the BN / activation timed with it."""
    units = {u.id: u for u in structure.units}
    costs = {c.name: c for c in structure.costs}
    mods = dict(gm.named_modules())
    absorbed: set[str] = set()
    out: list[tuple[str, dict]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in costs:
            continue
        c, m = costs[node.target], mods[node.target]
        out_var = c.out_space in units
        cat_var = any(s in units for s, _ in (c.in_cat or ()))
        in_var = c.in_space in units or cat_var
        if c.kind == "bn":
            if out_var and node.target not in absorbed:
                h, w_ = _in_shape(node)[2:]
                out.append((node.target, {"kind": "bn", "out": c.out_dense, "out_lo":
                                          units[c.out_space].groups, "hw": [h, w_]}))
            continue
        if c.kind not in ("conv", "dwconv", "linear") or not (out_var or in_var):
            continue
        if in_var and cat_var:  # the gated segments at their smallest, the others whole
            in_lo = sum(units[s].groups if s in units else d for s, d in c.in_cat)
            in_step = 1
        elif in_var:
            in_lo = in_step = units[c.in_space].groups
        else:
            in_lo = in_step = 1
        op: dict = {"kind": "linear" if c.kind == "linear" else "conv", "in": c.in_dense,
                    "out": c.out_dense, "in_var": bool(in_var and c.kind != "dwconv"),
                    "out_var": bool(out_var), "in_lo": in_lo, "in_step": in_step,
                    "out_lo": units[c.out_space].groups if out_var else c.out_dense,
                    "bias": m.bias is not None, "bn": False, "act": None, "inplace": False}
        shape = _in_shape(node)
        if c.kind == "linear":
            op.update(k=c.k, lead=list(shape[1:-1]))
        else:
            op.update(depthwise=c.kind == "dwconv", groups=m.groups,
                      kernel=list(m.kernel_size), stride=list(m.stride),
                      padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                      dilation=list(m.dilation), padding_mode=m.padding_mode,
                      hw=list(shape[2:]))
        nxt = _only_user(node) if out_var else None
        if nxt is not None and c.kind != "linear" and nxt.op == "call_module" \
                and isinstance(mods[nxt.target], nn.BatchNorm2d) and nxt.target in costs:
            op["bn"] = True
            absorbed.add(nxt.target)
            nxt = _only_user(nxt)
        act = _act_of(nxt, mods) if nxt is not None else None
        if act is not None:
            op["act"], op["inplace"] = act
        out.append((node.target, op))
    return out


def _axis(lo: int, hi: int, step: int, grid, unaligned: bool = False) -> tuple[list[int], int]:
    """(widths measured along one axis, q): lo and hi (dense) and the grid's points between
    them, multiples of ``step`` (a grouped unit's widths).  Interior points sit on multiples of
    q = lcm(8, step) whenever one fits: vector units run fastest there, and a point at an odd
    width is slower than its aligned neighbours (measured: a 16-channel CIFAR conv at 11 input
    channels slower than at 16), which would bend the interpolation for every aligned width
    around it (selections with ``round_to=8`` have only such widths).  A narrow axis then gets
    fewer points than ``grid`` asks for (every multiple of 8 it has).  With ``unaligned`` (a
    table for selections whose widths need not be multiples of 8) every interior point p also
    gets its neighbour p + step (and an aligned dense width hi gets hi − step), and q is
    returned: the axis then holds two families (:class:`Grid`'s ``align``); otherwise q is 0."""
    if hi <= lo:
        return [hi], 0
    if isinstance(grid, int):
        fr = [k / (grid - 1) for k in range(1, grid - 1)]
        pts = [lo + f * (hi - lo) for f in fr]
    else:
        pts = [f * hi for f in grid]
    q = math.lcm(step, 8)
    if not any(lo < k * q < hi for k in range(1, hi // q + 1)):
        q = step
    inner = {p for p in {int(round(p / q)) * q for p in pts} if lo < p < hi}
    if not unaligned or q % 8 or step % 8 == 0 or not inner:
        return sorted({lo, hi} | inner), 0
    # the neighbours, and the one below an aligned dense width (else the unaligned widths
    # above the last neighbour would be read toward dense's aligned speed)
    near = {p + step for p in inner if p + step < hi} | ({hi - step} if hi % q == 0 else set())
    return sorted({lo, hi} | inner | {p for p in near if p > lo}), q


def _op_axes(op: dict, grid, unaligned: bool = False
             ) -> tuple[list[int], list[int], tuple[int, int]]:
    """(input widths, output widths, Grid.align) measured for one layer shape."""
    if op["kind"] == "bn":
        outs, q = _axis(op["out_lo"], op["out"], op["out_lo"], grid, unaligned)
        return [op["out"]], outs, (0, q)
    ins, qi = (_axis(op["in_lo"], op["in"], op["in_step"], grid, unaligned) if op["in_var"]
               else ([op["in"]], 0))
    outs, qo = (_axis(op["out_lo"], op["out"], op["out_lo"], grid, unaligned) if op["out_var"]
                else ([op["out"]], 0))
    return ins, outs, (qi, qo)


def _runner(op: dict, i: int, o: int, batch: int, device, dtype, channels_last: bool
            ) -> Callable[[], object]:
    """A forward of the layer ``op`` at widths (i, o): fresh random weights and input."""
    kw = {"device": device, "dtype": dtype}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if op["kind"] == "bn":
        mod = nn.BatchNorm2d(o, **kw).eval()
        x = torch.randn(batch, o, *op["hw"], **kw).contiguous(memory_format=fmt)
    elif op["kind"] == "linear":
        mod = nn.Linear(i * op["k"], o, bias=op["bias"], **kw).eval()
        x = torch.randn(batch, *op["lead"], i * op["k"], **kw)
    else:
        if op["depthwise"]:
            i, groups = o, o
        else:
            groups = op["groups"]
        pad = op["padding"] if isinstance(op["padding"], str) else tuple(op["padding"])
        layers = [nn.Conv2d(i, o, tuple(op["kernel"]), tuple(op["stride"]), pad,
                            tuple(op["dilation"]), groups, op["bias"], op["padding_mode"], **kw)]
        if op["bn"]:
            layers.append(nn.BatchNorm2d(o, **kw))
        mod = nn.Sequential(*layers).eval().to(memory_format=fmt)
        x = torch.randn(batch, i, *op["hw"], **kw).contiguous(memory_format=fmt)
    act = _ACT_FN[op["act"]] if op.get("act") else None
    inplace = bool(op.get("inplace"))

    def run():
        with torch.inference_mode():
            y = mod(x)
            return act(y, inplace) if act is not None else y

    return run


# ----------------------------------------------------------------------------- measuring
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from .provenance import _cpu_model

    return f"cpu: {_cpu_model()} ({platform.machine()})"


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return model(x)

    return run


def _input(batch: int, input_size, device, dtype, channels_last: bool) -> torch.Tensor:
    x = torch.randn(batch, *input_size[1:], device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _prepare(model: nn.Module, device, dtype, channels_last: bool) -> nn.Module:
    model = model.to(device=device, dtype=dtype).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def measure_latency(model: nn.Module, input_size, batch: int = 1, device="cpu",
                    dtype: torch.dtype = torch.float32, channels_last: bool = False,
                    repeats: int = 11, warmup: int = 2, min_ms: float = 1.0,
                    clock: str = "wall") -> dict:
    """Median (and p20 / p80) ms of one eval forward of a plain ``model`` (e.g.
    :func:`paam_fast.export`'s) on ``device`` at ``batch``, as the table measures the dense one.
    The model is moved to ``device`` / ``dtype`` in place."""
    model = _prepare(model, device, dtype, channels_last)
    x = _input(batch, input_size, device, dtype, channels_last)
    return wall_ms(_forward(model, x), device=device, warmup=warmup, reps=repeats, min_ms=min_ms,
                   clock=clock)


def measure_like(table: LatencyTable, models: dict[str, nn.Module], device=None,
                 rounds: int = 11, warmup: int = 2) -> dict[str, dict]:
    """{name: {"median_ms", "p20_ms", "p80_ms", "samples"}} of plain ``models`` (moved to
    ``device`` in place; default: the table's device kind) measured as ``table`` was: its
    batch, dtype, memory format, input size and clock; interleaved round by round."""
    m = table.meta
    device = torch.device(device if device is not None else m.get("device_kind", "cpu"))
    dtype = getattr(torch, m["dtype"])
    x = _input(m["batch"], m["input_size"], device, dtype, m["channels_last"])
    fns = {k: _forward(_prepare(v, device, dtype, m["channels_last"]), x)
           for k, v in models.items()}
    return compare_ms(fns, device=device, warmup=warmup, rounds=rounds,
                      clock=m.get("clock", "wall"))


def _fraction_alive(units, frac: float) -> dict[str, torch.Tensor]:
    """Every unit at ``frac`` of its width (rounded up, the same number in every group)."""
    out = {}
    for u in units:
        g = u.groups
        m = torch.zeros(g, u.width // g, dtype=torch.bool)
        m[:, : max(1, math.ceil(u.width // g * frac))] = True
        out[u.name] = m.flatten()
    return out


FITS = ("rest", "scale", "curve")
# the networks measured with check=True (every unit at that fraction of its width); "curve" is
# fitted to all but five sixteenths and five eighths (left out, to check it), "scale" to the
# half one
CHECKED = (("eighth", 0.125), ("quarter", 0.25), ("five_sixteenths", 0.3125),
           ("three_eighths", 0.375), ("half", 0.5), ("five_eighths", 0.625),
           ("three_quarter", 0.75))
CURVE = ("eighth", "quarter", "three_eighths", "half", "three_quarter")


def _curve(table: LatencyTable) -> tuple[list[list[float]] | None, str | None]:
    """fit="curve": the anchors [[Σ, ms], ...] (the dense network and CURVE's), or None and
    why not."""
    check = table.check or {}
    missing = [n for n in CURVE if n not in check]
    if missing:
        return None, f"no measurement of the {', '.join(missing)}-width network(s)"
    pts = sorted([[check[n]["layers_ms"], check[n]["measured_ms"]] for n in CURVE]
                 + [[table.meta["layers_dense_ms"], table.dense_ms]])
    if any(b[0] <= a[0] or b[1] <= a[1] for a, b in zip(pts, pts[1:])):
        return None, ("measured networks not increasing with their layers' sum (noise?): "
                      + ", ".join(f"{x:.3g} -> {y:.3g} ms" for x, y in pts))
    return pts, None


def _apply_fit(table: LatencyTable, fit: str) -> None:
    """Set ``fixed_ms`` and ``scale`` from the dense measurement (and, for "scale" and
    "curve", the half-width one), ``anchors`` for "curve", and the check's predictions."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    dense_sum = table.meta["layers_dense_ms"]
    table.scale, table.fixed_ms = 1.0, table.dense_ms - dense_sum
    table.anchors = None
    table.meta["fit"] = fit
    table.meta.pop("fit_refused", None)
    table.meta.pop("warning", None)
    if table.fixed_ms < 0:  # isolated layers cannot take longer than the network they are in
        table.meta["warning"] = (
            f"the timed layers sum to more than the measured dense network ({dense_sum:.3f} > "
            f"{table.dense_ms:.3f} ms): measurement noise (a machine busy with other work? "
            "clock='cpu' counts only this process's time, on one CPU thread); do not trust "
            "this table's predictions")
    if fit in ("scale", "curve"):
        half = (table.check or {}).get("half")
        if half is None:
            raise ValueError(f"fit={fit!r} needs the half-width network's measurement "
                             "(latency_table(..., check=True))")
        ds = dense_sum - half["layers_ms"]
        scale = (table.dense_ms - half["measured_ms"]) / ds if ds > 0 else math.nan
        if 0.5 <= scale <= 2:
            table.scale = scale
            table.fixed_ms = table.dense_ms - scale * dense_sum
            table.meta["fit"] = "scale"
        else:  # a measurement too noisy to fit: keep the plain rest, and say so
            table.meta["fit"] = "rest"
            table.meta["fit_refused"] = f"fitted scale {scale:.3f} outside [0.5, 2]"
    if fit == "curve":
        table.anchors, why = _curve(table)
        if table.anchors is not None:
            table.meta["fit"] = "curve"
            table.meta.pop("fit_refused", None)
        else:  # the line through dense and half width (or the plain rest), and say why
            table.meta["fit_refused"] = f"curve: {why}"
    fitted = {"scale": ("half",), "curve": CURVE}.get(table.meta["fit"], ())
    for name, c in (table.check or {}).items():
        if isinstance(c, dict):
            c["predicted_ms"] = table.ms_of(c["layers_ms"])
            c["error"] = c["measured_ms"] / c["predicted_ms"] - 1
            c["fitted"] = name in fitted


def _check_args(grid, batch, repeats, fit, check) -> None:
    if isinstance(grid, bool) or not ((isinstance(grid, int) and grid >= 2) or (
            not isinstance(grid, int) and len(grid) > 0 and all(0 < f <= 1 for f in grid))):
        raise ValueError(f"grid must be an int ≥ 2 or fractions in (0, 1], got {grid!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if fit is not None and fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if fit in ("scale", "curve") and not check:
        raise ValueError(f"fit={fit!r} fits to the narrower networks that check=True measures")


def _dense_copy(model: nn.Module, input_size, coupling: str):
    """A paamified copy of ``model`` with every filter alive, and the (N, C, H, W) input size."""
    from .paamify import apply_masks, controller, is_paamified, paamify

    if is_paamified(model):
        ctrl = controller(model)
        if ctrl.compacted:
            raise ValueError("latency_table needs the dense network: this model is compacted "
                             "(build the table before the selection, or from a fresh model)")
        work = copy.deepcopy(model)
        apply_masks(work, {u.name: torch.ones(u.width, dtype=torch.bool) for u in ctrl.units})
        input_size = tuple(input_size or ctrl.structure.input_size)
    else:
        if input_size is None:
            raise ValueError("latency_table of a plain model needs input_size")
        input_size = tuple(input_size)
        work = paamify(copy.deepcopy(model), coupling=coupling,
                       input_size=(1, *input_size[-3:]))
    if len(input_size) == 3:
        input_size = (1, *input_size)
    return work, input_size


def _shapes(ops) -> tuple[list[dict], list[dict]]:
    """The distinct layer shapes, and per layer its name and shape index: identical shapes
    share one measurement."""
    keys: dict[str, int] = {}
    shapes: list[dict] = []
    layers = []
    for name, op in ops:
        k = json.dumps(op, sort_keys=True)
        if k not in keys:
            keys[k] = len(shapes)
            shapes.append(op)
        layers.append({"name": name, "grid": keys[k]})
    return shapes, layers


def _measure_grids(shapes, axes, timer, progress, batch, device, dtype, channels_last, warmup,
                   repeats, clock) -> list[Grid]:
    """Every shape timed at every (input width, output width) point of its axes."""
    bar = None
    if progress and timer is None and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=sum(len(a) * len(b) for a, b, _ in axes), desc="latency table",
                   leave=False)
    grids = []
    try:
        for op, (ins, outs, align) in zip(shapes, axes):
            ms = []
            for i in ins:
                row = []
                for o in outs:
                    if timer is not None:
                        row.append(float(timer(op, i, o)))
                    else:
                        fn = _runner(op, i, o, batch, device, dtype, channels_last)
                        row.append(wall_ms(fn, device=device, warmup=warmup, reps=repeats,
                                           min_ms=0.5, clock=clock)["median_ms"])
                    if bar is not None:
                        bar.update(1)
                ms.append(row)
            grids.append(Grid(op, ins, outs, ms, align))
    finally:
        if bar is not None:
            bar.close()
    return grids


def _measure_networks(table, work, structure, dense, check, batch, input_size, device, dtype,
                      channels_last, warmup, repeats, clock) -> None:
    """The whole dense network (and, with ``check``, the ones at CHECKED's fractions of every
    unit's width) measured interleaved, into ``table.dense_ms`` and ``table.check``."""
    from .export import export
    from .paamify import apply_masks, controller

    x = _input(batch, input_size, device, dtype, channels_last)
    fns = {"dense": _forward(dense, x)}
    sums = {"dense": table.meta["layers_dense_ms"]}
    widths = {}
    if check:
        for name, frac in CHECKED:
            apply_masks(work, _fraction_alive(structure.units, frac))
            fns[name] = _forward(_prepare(export(work), device, dtype, channels_last), x)
            w = controller(work).widths()
            sums[name] = table.predict(structure, w)
            widths[name] = sorted({w[u.id] for u in structure.units})
    got = compare_ms(fns, device=device, warmup=warmup, rounds=max(2 * repeats + 1, 7),
                     clock=clock)
    table.dense_ms = got["dense"]["median_ms"]
    if check:
        table.check = {"dense_p20_p80_ms": [got["dense"]["p20_ms"], got["dense"]["p80_ms"]]}
        for name, _ in CHECKED:
            table.check[name] = {"layers_ms": sums[name], "measured_ms": got[name]["median_ms"],
                                 "widths": widths[name],
                                 "p20_p80_ms": [got[name]["p20_ms"], got[name]["p80_ms"]]}


def latency_table(model: nn.Module, input_size: Sequence[int] | None = None, batch: int = 1,
                  device="cpu", dtype: torch.dtype = torch.float32, channels_last: bool = False,
                  grid: int | Sequence[float] = 8, repeats: int = 5, warmup: int = 2,
                  progress: bool = True, coupling: str = "internal", check: bool = True,
                  clock: str = "wall", fit: str | None = None, round_to: int = 1,
                  timer: Callable[[dict, int, int], float] | None = None) -> LatencyTable:
    """Measure a latency table for ``model`` on ``device``.

    Args:
        model: a paamified model before its selection (masks are ignored: the dense network is
            timed) or a plain one (analysed here with ``coupling``).  Not modified.
        input_size: (N, C, H, W) or (C, H, W) of one input (N is replaced by ``batch``);
            default: the paamified model's analysis size.
        batch, device, dtype, channels_last: how the network will run.
        grid: points per width axis (an int ≥ 2, 1 and dense included) or fractions of the
            dense width (1 and dense are added).
        repeats, warmup: timed samples (median) and untimed calls per measurement.
        progress: a tqdm bar, on a terminal only.
        check: also measure the network with every unit at CHECKED's fractions (an eighth to
            three quarters) of its width, against the table's predictions
            (``LatencyTable.check``).
        fit: "rest" (fixed = the dense network minus the layers' sum, scale 1), "scale"
            (ours: fixed and scale fitted to the dense and the half-width networks; needs
            ``check``) or "curve" (ours: piecewise linear through the dense and the eighth-,
            quarter-, three-eighths-, half- and three-quarter-width networks; needs
            ``check``); see the module's docstring.
            Default (None): "curve" with ``check``, "rest" without.
        round_to: the ``round_to`` of the selections the table will serve; one that is not a
            multiple of 8 (the default 1) also times the widths just past each aligned grid
            point (see :class:`Grid`'s ``align``).
        clock: "wall" (default) or "cpu": the process's CPU time, for one CPU thread on a
            machine shared with other work (time spent descheduled is not counted).
        timer: ``(op, in_width, out_width) -> ms`` used instead of measuring (tests); then
            nothing is measured, ``dense_ms`` is the layers' sum and ``fixed_ms`` is 0.
    Returns:
        a :class:`LatencyTable`.
    """
    from .export import export
    from .graph import _trace
    from .paamify import controller

    _check_args(grid, batch, repeats, fit, check)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    device = torch.device(device)
    if timer is None:
        from .bench.harness import _clock

        _clock(clock, device)  # refuses clock="cpu" where it would not mean latency
    work, input_size = _dense_copy(model, input_size, coupling)
    structure = controller(work).structure
    dense = _prepare(export(work), device, dtype, channels_last)
    gm = _trace(dense, _input(1, input_size, device, dtype, channels_last))
    ops = _ops(gm, structure)

    shapes, layers = _shapes(ops)
    # round_to not a multiple of 8: widths off the multiples of 8, timed as a family of their own
    axes = [_op_axes(op, grid, unaligned=round_to % 8 != 0) for op in shapes]
    n_points = sum(len(a) * len(b) for a, b, _ in axes)
    t0 = time.time()
    grids = _measure_grids(shapes, axes, timer, progress, batch, device, dtype, channels_last,
                           warmup, repeats, clock)
    table_s = time.time() - t0
    meta = {"device": _device_name(device), "device_kind": device.type,
            "torch": torch.__version__, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
            "channels_last": bool(channels_last), "input_size": [batch, *input_size[1:]],
            "threads": torch.get_num_threads(), "fingerprint": fingerprint(structure),
            "model": type(model).__name__, "coupling": controller(work).coupling,
            "grid": grid if isinstance(grid, int) else list(grid), "repeats": repeats,
            "warmup": warmup, "clock": clock, "fit": "rest", "points": n_points,
            "round_to": round_to,
            "measure_s": round(table_s, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "measured": timer is None}
    table = LatencyTable(meta, grids, layers, dense_ms=0.0, fixed_ms=0.0)
    dense_sum = table.predict(structure)
    table.meta["layers_dense_ms"] = dense_sum
    if timer is not None:
        table.dense_ms = dense_sum
        return table
    _measure_networks(table, work, structure, dense, check, batch, input_size, device, dtype,
                      channels_last, warmup, repeats, clock)
    _apply_fit(table, fit or ("curve" if check else "rest"))
    table.meta["measure_s"] = round(time.time() - t0, 1)
    if "warning" in table.meta:
        import warnings

        warnings.warn(table.meta["warning"], stacklevel=2)
    return table
