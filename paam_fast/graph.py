"""Gated units found from the model's graph (PAAM_METHOD.md §2).

The model is traced with ``torch.fx`` and run once on an example input (shapes only, eval mode,
no gradient).  Every tensor in the graph is assigned a *channel space*: the set of channels that
must be pruned together.  A channel-mixing conv starts a new space; channel-wise operations (BN,
activations with f(0) = 0, pooling, dropout, depthwise convs, flatten) keep it; a residual add
joins the spaces of its operands.  A space that reaches something we cannot slice (the model's
input or output, an unknown module or function) is *fixed* and stays ungated, with the reason
recorded so it can be listed.  Three structures are sliced with care (issue 12):

* a grouped conv (groups G > 1, not depthwise) mixes channels within each group: it consumes its
  input space and produces a new one, and both are selected group-consistently (``Space.groups``:
  the same number kept in each of G contiguous blocks), so it stays a valid ``nn.Conv2d``;
* a squeeze-excitation multiply x * sigmoid(conv(...)) keeps x's space: a dropped channel of x is
  zero whatever its scale, so the expand conv's rows go with x's channels (``Space.scales``);
* a concat along channels whose result is read only by channel-mixing consumers (``Cat``): its
  branches are gated, and the consumers sliced at each branch's offset.  A concat read by a BN,
  an add or the output keeps every branch fixed (a BN would turn a zero channel non-zero).

Why torch.fx and not Torch-Pruning's DependencyGraph: PAAM needs more than "which tensors must be
pruned together" — it needs where along each producer's channel-wise chain the gate sits (after
the *last* BN, so that BN cannot cancel it), and a proof that a dropped channel is exactly zero
where every consumer reads it (so the masked and the physically pruned network compute the same
thing).  Both come out of the same walk over the fx graph, with a reason for every space we
refuse, and no extra dependency.

The walk itself is one rule per operation kind in :mod:`paam_fast.graph_rules`; this module
merges its raw spaces, places the gates and builds the cost model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .graph_rules import (
    Walk,
    _is_depthwise,
    _is_drop_module,
    _is_scale_module,
    _UnionFind,
    walk,
)
from .models.resnet_cifar import PadShortcut

__all__ = ["Space", "Cat", "ModuleCost", "Structure", "analyse"]


@dataclass
class Space:
    """One channel space: channels pruned together.

    ``producers``: channel-mixing convs whose output rows are these channels (dim 0 sliced).
    ``channelwise``: BN / depthwise convs carrying them (dim 0 sliced).
    ``consumers``: (module name, block) of convs (block 1, dim 1 sliced) and Linear layers
    (block = input features per channel, dim 1 sliced in blocks) that read them.
    ``sites``: modules the gate folds into (a BN's affine, or a conv's weight and bias).
    ``fixed``: why this space cannot be gated (empty when it can).
    """

    id: int
    width: int
    producers: list[str] = field(default_factory=list)
    channelwise: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    has_add: bool = False
    # channels come in ``groups`` equal contiguous blocks (a grouped conv reads or writes them):
    # selection keeps the same number in every block, so the conv stays a valid nn.Conv2d.
    groups: int = 1
    # convs whose output rows are these channels but carry no gate: a squeeze-excitation's
    # expand conv (x * sigmoid(scale_conv(...))): a dropped channel of x is zero whatever its
    # scale, so the scale's row goes with it.
    scales: list[str] = field(default_factory=list)
    # ids of the concatenations (Structure.cats) these channels are a segment of
    cats: list[int] = field(default_factory=list)
    # parameter-free modules whose output channels are these channels, copied from another
    # space (the CIFAR ResNets' option-A shortcut, models.PadShortcut): no gate (no analog scale
    # to fold into anything), a dropped channel is zeroed on them by the unit's mask
    shifts: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.producers[0] if self.producers else f"space{self.id}"

    @property
    def writers(self) -> list[str]:
        """Modules whose output rows are these channels (sliced along dim 0 with them)."""
        return self.producers + self.scales + self.shifts

    @property
    def token_convs(self) -> list[str]:
        """Convs whose filters are the unit's tokens (§3): producers, then depthwise convs."""
        return self.producers + [n for n in self.channelwise if n in self._dw]

    _dw: set = field(default_factory=set, repr=False)

    def to_json(self) -> dict:
        return {"producers": self.producers, "channelwise": self.channelwise,
                "consumers": [list(c) for c in self.consumers], "dw": sorted(self._dw),
                "scales": self.scales, "shifts": self.shifts, "groups": self.groups}


@dataclass
class Cat:
    """A concatenation along channels whose consumers read every segment at an offset.

    ``segments``: (space id, dense width) in order; ``consumers``: (module name, block) of the
    convs / Linear layers reading the concatenated channels (dim 1 sliced at the segments'
    offsets).  A segment whose space is not gated is kept whole.
    """

    id: int
    name: str
    segments: list[tuple[int, int]]
    consumers: list[tuple[str, int]]

    def offsets(self) -> list[int]:
        out, o = [], 0
        for _, w in self.segments:
            out.append(o)
            o += w
        return out

    def index(self, kept: dict[int, torch.Tensor]) -> torch.Tensor:
        """Kept positions of the concatenated channels, given {space id: kept dense indices}
        (segments not in ``kept`` are whole)."""
        parts = []
        for (sid, w), off in zip(self.segments, self.offsets()):
            k = kept.get(sid)
            parts.append((torch.arange(w) if k is None else k.cpu().long()) + off)
        return torch.cat(parts)


@dataclass
class ModuleCost:
    """How one parameterised module's parameters and MACs depend on channel widths.

    ``kind``: "conv", "dwconv", "bn", "linear" or "const".  ``out_space``/``in_space``: the
    space ids of the output and input channels (None where the dimension is not prunable).
    ``per_call_macs``: MACs per sample at dense width, summed over the module's calls.
    """

    name: str
    kind: str
    out_space: int | None
    in_space: int | None
    dense_params: int
    k: int = 1  # kernel elements (kh*kw) for convs; block for linear inputs
    bias: bool = False
    out_dense: int = 0
    in_dense: int = 0
    groups: int = 1
    spatial: int = 0  # output H*W summed over calls (convs)
    # input read through a concatenation: its segments (space id, dense width)
    in_cat: tuple[tuple[int, int], ...] | None = None
    calls: int = 1  # linear layers: calls per sample in eval (0: only the training forward)

    def _in(self, w: dict[int, int]) -> int:
        if self.in_cat is not None:
            return sum(w.get(s, d) for s, d in self.in_cat)
        return w.get(self.in_space, self.in_dense) if self.in_space is not None else self.in_dense

    def touches(self, space_id: int) -> bool:
        return space_id in (self.out_space, self.in_space) or (
            self.in_cat is not None and any(s == space_id for s, _ in self.in_cat))

    def params(self, w: dict[int, int]) -> int:
        o = w.get(self.out_space, self.out_dense) if self.out_space is not None else self.out_dense
        i = self._in(w)
        if self.kind == "conv":
            return o * (i // self.groups) * self.k + (o if self.bias else 0)
        if self.kind == "dwconv":
            return o * self.k + (o if self.bias else 0)
        if self.kind == "bn":
            return 2 * o if self.bias else 0
        if self.kind == "linear":
            return o * i * self.k + (o if self.bias else 0)
        return self.dense_params

    def macs(self, w: dict[int, int]) -> int:
        o = w.get(self.out_space, self.out_dense) if self.out_space is not None else self.out_dense
        i = self._in(w)
        if self.kind == "conv":
            return o * (i // self.groups) * self.k * self.spatial
        if self.kind == "dwconv":
            return o * self.k * self.spatial
        if self.kind == "linear":
            return o * i * self.k * self.calls
        return 0


@dataclass
class Structure:
    """The result of :func:`analyse`: spaces, gateable units and the cost model."""

    spaces: dict[int, Space]
    units: list[Space]  # gateable spaces, in graph order
    ungated: list[tuple[str, str]]  # (space name, reason) of spaces with conv producers
    costs: list[ModuleCost]
    const_params: int  # parameters no width touches (not covered by a ModuleCost)
    input_size: tuple[int, ...]
    warnings: list[str] = field(default_factory=list)
    cats: list[Cat] = field(default_factory=list)

    def widths(self) -> dict[int, int]:
        return {s.id: s.width for s in self.spaces.values()}

    def params(self, w: dict[int, int] | None = None) -> int:
        w = self.widths() if w is None else w
        return self.const_params + sum(c.params(w) for c in self.costs)

    def macs(self, w: dict[int, int] | None = None) -> int:
        w = self.widths() if w is None else w
        return sum(c.macs(w) for c in self.costs)

    def costs_touching(self, space_id: int) -> list[ModuleCost]:
        return [c for c in self.costs if c.touches(space_id)]


class _Tracer(fx.Tracer):
    """Convs, BNs and Linear layers are leaves even when subclassed (our gated modules)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, PadShortcut)) \
                or _is_scale_module(m) or _is_drop_module(m):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many kinds; the user needs the cause, not the kind
        raise TypeError(
            f"paam_fast could not trace {type(model).__name__} with torch.fx ({e}). Gated units "
            "are "
            "found from the graph; models with data-dependent control flow are not supported."
        ) from e
    gm = fx.GraphModule(model, graph)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as e:
        raise ValueError(
            f"paam_fast could not run {type(model).__name__} on an input of size "
            f"{tuple(example.shape)}: {e}. Pass input_size= matching the model."
        ) from e
    finally:
        for m, t in modes.items():
            m.training = t
    return gm


def analyse(model: nn.Module, input_size: tuple[int, ...], coupling: str = "internal",
            forced_sites: dict[str, str] | None = None, skip: tuple[str, ...] = ()) -> Structure:
    """Find the gated units of ``model`` (PAAM_METHOD.md §2).

    Args:
        model: any fx-traceable CNN; not modified.
        input_size: (N, C, H, W) of an example input; FLOPs are counted at this size.
        coupling: "internal" (only channels consumed by mixing convs / the classifier) or
            "grouped" (channels tied by residual adds form one unit).
        forced_sites: {producer conv name: module the gate folds into} for drop-in modules.
        skip: names of submodules (and their children) that are not part of the network.
    """
    if coupling not in ("internal", "grouped"):
        raise ValueError(f"coupling must be 'internal' or 'grouped', got {coupling!r}")
    forced_sites = forced_sites or {}
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    example = torch.randn(*input_size, dtype=dtype, device=device)
    gm = _trace(model, example)
    mods = dict(model.named_modules())
    # MACs are counted as the model computes in eval mode (paam_fast.count's convention): a
    # branch only the training forward takes (GoogLeNet's aux classifiers) costs no FLOPs.
    spatial, linear_calls = _eval_calls(model, example)
    w = walk(gm, mods, skip)  # every tensor gets a raw channel space (graph_rules.py)

    spaces = _spaces(w)
    uf = w.uf
    cats = _concats(w.cat_segs, w.cat_name, uf, spaces)
    node_space = {n: uf.find(s) for n, s in w.space_of.items()}
    warnings = _gate(spaces, coupling, gm, node_space, mods, forced_sites)
    ungated = [(sp.name, "; ".join(sp.fixed)) for sp in spaces.values()
               if sp.producers and sp.fixed]
    residual = [sp for sp in spaces.values() if sp.has_add]
    if coupling == "grouped" and residual and all(sp.fixed for sp in residual):
        # e.g. an option-A shortcut written inline (a strided slice and a zero pad, which the
        # walk cannot slice; models.PadShortcut is the sliceable one): asking for grouped
        # changes nothing, and the user should know
        warnings.append("coupling='grouped' gates no residual space of this model (each is "
                        "fixed: see structure.ungated), so its units are coupling='internal''s")

    # a concat whose segment is not gated after all (fixed while placing gates) keeps it whole
    costs, covered = _cost_model(mods, w.role, uf, spaces, w.linear_in, spatial, cats)
    for c in costs:
        if c.kind == "linear":
            c.calls = linear_calls.get(c.name, 0)
    total = sum(p.numel() for n, p in model.named_parameters()
                if not any(n.startswith(s + ".") for s in skip))
    return Structure(spaces=spaces, units=_units_in_order(gm, mods, w, spaces), ungated=ungated,
                     costs=costs, const_params=total - covered, input_size=tuple(input_size),
                     warnings=warnings, cats=cats)


def _spaces(w: Walk) -> dict[int, Space]:
    """The raw spaces of the walk merged into spaces (one per union-find root), with their
    fixed reasons, residual adds, group constraints and the modules in each role."""
    uf = w.uf
    spaces: dict[int, Space] = {}
    for s in range(len(uf.parent)):
        r = uf.find(s)
        sp = spaces.setdefault(r, Space(id=r, width=w.width[r]))
        sp.fixed.extend(x for x in w.fixed[s] if x not in sp.fixed)
    for s in w.adds:
        spaces[uf.find(s)].has_add = True
    for s, reqs in w.group_req.items():
        sp = spaces[uf.find(s)]
        for g, conv in reqs:
            sp.groups = math.lcm(sp.groups, g)
            if sp.width % sp.groups:
                sp.fixed.append(f"grouped conv '{conv}' (groups={g}) does not divide it evenly")
            elif sp.groups == sp.width:
                sp.fixed.append(f"grouped conv '{conv}' (groups={g}) has one channel per group")
    for kind, name, s in w.role:
        if s < 0:
            continue
        sp = spaces[uf.find(s)]
        if kind == "producer":
            sp.producers.append(name)
        elif kind in ("cw", "dw"):
            sp.channelwise.append(name)
            if kind == "dw":
                sp._dw.add(name)
        elif kind == "scale":
            sp.scales.append(name)
        elif kind == "shift":
            sp.shifts.append(name)
        elif kind == "consumer":
            if name in w.linear_in:
                block = w.linear_in[name][1] // sp.width
                if block * sp.width != w.linear_in[name][1]:
                    sp.fixed.append(f"Linear '{name}' features are not a multiple of channels")
                sp.consumers.append((name, block))
            else:
                sp.consumers.append((name, 1))
    return spaces


def _gate(spaces: dict[int, Space], coupling: str, gm: fx.GraphModule, node_space: dict,
          mods: dict, forced_sites: dict[str, str]) -> list[str]:
    """Place the gate of every space with producers that is not fixed (the coupling may still
    fix it); returns the warnings."""
    warnings: list[str] = []
    for sp in spaces.values():
        if sp.fixed or not sp.producers:
            continue
        if coupling == "internal":
            if sp.has_add:
                sp.fixed.append("feeds a residual add (use coupling='grouped' to gate it)")
                continue
            if len(sp.producers) > 1:
                sp.fixed.append("has several producers")
                continue
        _place_gates(sp, gm, node_space, mods, forced_sites, warnings)
    return warnings


def _units_in_order(gm: fx.GraphModule, mods: dict, w: Walk,
                    spaces: dict[int, Space]) -> list[Space]:
    """The gateable spaces, in the graph order of their first conv / Linear."""
    units = [spaces[w.uf.find(w.space_of[n])] for n in gm.graph.nodes
             if n.op == "call_module" and n.target in mods
             and isinstance(mods[n.target], (nn.Conv2d, nn.Linear))
             and n in w.space_of]
    seen: set[int] = set()
    ordered: list[Space] = []
    for sp in units:
        if sp.id not in seen and not sp.fixed and sp.producers:
            seen.add(sp.id)
            ordered.append(sp)
    return ordered


def _eval_calls(model: nn.Module, example: torch.Tensor):
    """{conv: output H·W summed over its calls}, {linear: calls} in one eval forward (on the
    example input already drawn: the global random stream is left as one draw moved it)."""
    spatial: dict[str, int] = {}
    linear: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(m, i, o):
        n = names[m]
        if isinstance(m, nn.Conv2d):
            spatial[n] = spatial.get(n, 0) + math.prod(o.shape[2:])
        else:
            linear[n] = linear.get(n, 0) + math.prod(o.shape[1:-1])

    hs = [m.register_forward_hook(hook) for m in model.modules()
          if isinstance(m, (nn.Conv2d, nn.Linear))]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in hs:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return spatial, linear


def _concats(cat_segs: dict[int, list[int]], cat_name: dict[int, str], uf: _UnionFind,
             spaces: dict[int, Space]) -> list[Cat]:
    """Concatenations whose result is read only by channel-mixing consumers (through
    zero-preserving ops): their segments can be gated, the consumers sliced at offsets.
    Otherwise (a BN, an add, the output, ... reads the concat) every segment stays fixed, and
    so does the concat's result where a residual add joins it to other producers' channels
    (MixNet's mixed convs, issue 19): a gate on those channels would need the fixed segments'
    rows sliced with them, which nothing does."""
    cats: list[Cat] = []
    joined: dict[int, str] = {}  # space with producers -> the first concat it carries
    for c, segs in cat_segs.items():
        sp = spaces[uf.find(c)]
        why = None
        if sp.fixed:
            why = sp.fixed[0]
        elif sp.channelwise:
            why = f"is read by '{sp.channelwise[0]}' (BatchNorm / depthwise conv)"
        elif sp.has_add or sp.producers:
            why = "joins a residual add"
        elif sp.groups > 1:
            why = "is read by a grouped conv"
        if why is not None:
            for r in segs:
                seg = spaces[uf.find(r)]
                msg = f"concatenated by '{cat_name[c]}', whose result {why}"
                if msg not in seg.fixed:
                    seg.fixed.append(msg)
            if sp.producers and not sp.fixed:
                joined.setdefault(sp.id, cat_name[c])
            continue
        if not sp.consumers:
            continue  # only read by another concat: that one carries the segments
        cat = Cat(id=len(cats), name=cat_name[c],
                  segments=[(uf.find(r), spaces[uf.find(r)].width) for r in segs],
                  consumers=list(sp.consumers))
        cats.append(cat)
        for r in dict.fromkeys(uf.find(r) for r in segs):
            spaces[r].cats.append(cat.id)
    for sid, name in joined.items():
        spaces[sid].fixed.append(f"joins the result of concatenation '{name}', whose segments "
                                 "cannot be pruned with it")
    return cats


def _place_gates(sp: Space, gm: fx.GraphModule, node_space: dict, mods: dict,
                 forced: dict[str, str], warnings: list[str]) -> None:
    """Choose where the gate folds in, and check that a gated-off channel is exactly zero
    wherever it leaves the space (so the masked network equals the pruned one)."""
    members = [n for n, s in node_space.items() if s == sp.id]
    paramd = {n for n in members if n.op == "call_module" and n.target in mods
              and (n.target in sp.producers or n.target in sp.channelwise)}

    forced_here = [forced[p] for p in sp.producers if p in forced]
    if forced_here:
        for p in sp.producers:
            if p in forced and forced[p] == p and any(isinstance(mods[c], nn.BatchNorm2d)
                                                      for c in sp.channelwise):
                warnings.append(f"GatedConv2d '{p}' feeds a BatchNorm, which cancels its gate in "
                                "training; use GatedConvBN2d")
        sp.sites = sorted(set(forced_here))
        if len(forced_here) == len(sp.producers):
            return

    def downstream(start: fx.Node) -> set[fx.Node]:
        seen, stack = set(), [start]
        while stack:
            for u in stack.pop().users:
                if node_space.get(u) == sp.id and u not in seen:
                    seen.add(u)
                    stack.append(u)
        return seen

    sites = {n for n in paramd if not (downstream(n) & paramd)}
    # a shift's dropped channels are zeroed by the mask: it writes "gated" channels
    shifts = {n for n in members if n.op == "call_module" and n.target in sp.shifts}
    label: dict[fx.Node, bool] = {n: True for n in shifts}  # True: after the gate
    for n in gm.graph.nodes:
        if n not in members:
            # a node outside the space reading it: must read gated channels
            for a in n.all_input_nodes:
                if node_space.get(a) == sp.id and not label.get(a, False):
                    sp.fixed.append(f"'{n.name}' reads its channels before the last BatchNorm")
                    return
            continue
        if n in paramd:
            label[n] = n in sites
            continue
        if n in shifts:
            continue
        ins = [a for a in n.all_input_nodes if node_space.get(a) == sp.id]
        vals = [label.get(a, False) for a in ins]
        if len(set(vals)) > 1:
            sp.fixed.append(f"'{n.name}' joins gated and ungated paths")
            return
        label[n] = bool(vals) and vals[0]
    sp.sites = sorted(set(sp.sites) | {n.target for n in sites})


def _cost_model(mods, role, uf, spaces, linear_in, spatial,
                cats) -> tuple[list[ModuleCost], int]:
    out_of: dict[str, int] = {}
    in_of: dict[str, int] = {}
    cat_in: dict[str, tuple[tuple[int, int], ...]] = {}
    for cat in cats:
        for name, _ in cat.consumers:
            cat_in[name] = tuple(cat.segments)
    for kind, name, s in role:
        if s < 0:
            continue
        r = uf.find(s)
        if kind in ("producer", "scale"):
            out_of[name] = r
        elif kind in ("cw", "dw"):
            out_of[name] = in_of[name] = r
        elif kind == "consumer":
            in_of[name] = r
    costs: list[ModuleCost] = []
    covered = 0
    for name in dict.fromkeys(n for _, n, _ in role):
        m = mods[name]
        dense = sum(p.numel() for p in m.parameters(recurse=False))
        o, i = out_of.get(name), in_of.get(name)
        # A space that cannot be gated keeps its dense width; treat it as not prunable.
        if o is not None and spaces[o].fixed:
            o = None
        if i is not None and spaces[i].fixed:
            i = None
        seg = cat_in.get(name)
        if seg is not None:
            # segments that are not gated keep their dense width (never in a widths dict
            # with another value), so they can stay in the tuple
            i = None
        if isinstance(m, nn.Conv2d):
            kind = "dwconv" if _is_depthwise(m) else "conv"
            c = ModuleCost(name, kind, o, i, dense, k=math.prod(m.kernel_size),
                           bias=m.bias is not None, out_dense=m.out_channels,
                           in_dense=m.in_channels, groups=m.groups, spatial=spatial.get(name, 0),
                           in_cat=seg)
        elif isinstance(m, nn.BatchNorm2d):
            c = ModuleCost(name, "bn", o, i, dense, bias=m.affine, out_dense=m.num_features,
                           in_dense=m.num_features)
        elif isinstance(m, nn.Linear):
            width = (spaces[uf.find(linear_in[name][0])].width if name in linear_in
                     else m.in_features)
            c = ModuleCost(name, "linear", o, i, dense, k=m.in_features // max(width, 1),
                           bias=m.bias is not None, out_dense=m.out_features, in_dense=width)
            if name not in linear_in:
                c.kind, c.k, c.in_dense = "linear", 1, m.in_features
            elif seg is not None:
                c.in_cat = tuple((s, d) for s, d in seg)  # k = features per channel
        else:
            continue
        costs.append(c)
        covered += dense
    return costs, covered
