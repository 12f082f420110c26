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
thing).  Both come out of the same walk over the fx graph below, with a reason for every space we
refuse, in ~300 lines and no extra dependency.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["Space", "Cat", "ModuleCost", "Structure", "analyse"]

# Channel-wise activations with f(0) = 0: a zero channel stays zero through them.
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardtanh,
                nn.Mish, nn.ELU, nn.Tanh)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_MODULES = _ACT_MODULES + _POOL_MODULES + (nn.Dropout, nn.Dropout2d, nn.Identity)
_PASS_FUNCTIONS = {
    F.relu, torch.relu, torch.relu_, F.relu_, F.relu6, F.hardtanh, F.hardswish, F.silu, F.gelu,
    F.leaky_relu, F.elu, F.mish, torch.tanh, F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
_PASS_METHODS = {"relu", "relu_", "contiguous", "clone", "tanh"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_FLATTEN_FUNCTIONS = {torch.flatten}
_VIEW_METHODS = {"view", "reshape", "flatten"}
_MEAN = {torch.mean}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
_CAT_FUNCTIONS = {torch.cat, torch.concat}
# The gate of a squeeze-excitation block: f(0) != 0, so allowed only as the scale operand of a
# multiply (x * sigmoid(fc2(...))), where a dropped channel of x stays zero whatever the scale.
_SCALE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_SCALE_NAMES = {"Sigmoid", "Hardsigmoid", "HardSigmoid", "HardSigmoidMe", "GateSigmoid"}
_SCALE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_SCALE_METHODS = {"sigmoid", "sigmoid_"}
# Per-sample drop of the whole residual branch (0 stays 0): identity in eval.
_DROP_NAMES = {"StochasticDepth", "DropPath", "DropBlock2d"}
_DROP_FUNCTION_NAMES = {"stochastic_depth", "drop_path"}
# reshapes of an SE scale on its way to the multiply: y.view(b, c, 1, 1), y.expand_as(x)
_SCALE_SHAPE_METHODS = {"view", "reshape", "expand_as", "expand", "unsqueeze"}


def _is_scale_module(m: nn.Module) -> bool:
    return isinstance(m, _SCALE_MODULES) or type(m).__name__ in _SCALE_NAMES


def _is_drop_module(m: nn.Module) -> bool:
    return type(m).__name__ in _DROP_NAMES


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

    @property
    def name(self) -> str:
        return self.producers[0] if self.producers else f"space{self.id}"

    @property
    def token_convs(self) -> list[str]:
        """Convs whose filters are the unit's tokens (§3): producers, then depthwise convs."""
        return self.producers + [n for n in self.channelwise if n in self._dw]

    _dw: set = field(default_factory=set, repr=False)

    def to_json(self) -> dict:
        return {"producers": self.producers, "channelwise": self.channelwise,
                "consumers": [list(c) for c in self.consumers], "dw": sorted(self._dw),
                "scales": self.scales, "groups": self.groups}


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
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) or _is_scale_module(m) \
                or _is_drop_module(m):
            return True
        return super().is_leaf_module(m, qualname)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)


def _is_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape")


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _is_depthwise(m: nn.Conv2d) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


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

    uf = _UnionFind()
    space_of: dict[fx.Node, int] = {}  # tensor node -> raw space id
    width: dict[int, int] = {}
    fixed: dict[int, list[str]] = {}
    role: list[tuple[str, str, int]] = []  # (kind, module name, raw space): producer/cw/dw/consumer
    linear_in: dict[str, tuple[int, int]] = {}  # linear name -> (raw space, in features)
    calls: dict[str, int] = {}
    # MACs are counted as the model computes in eval mode (paam_fast.count's convention): a
    # branch only the training forward takes (GoogLeNet's aux classifiers) costs no FLOPs.
    spatial, linear_calls = _eval_calls(model, example)
    adds: list[int] = []
    group_req: dict[int, list[tuple[int, str]]] = {}  # raw space -> (groups, conv) constraints
    cat_segs: dict[int, list[int]] = {}  # raw space of a concat -> raw spaces of its segments
    cat_name: dict[int, str] = {}
    scale_raw: set[int] = set()  # raw spaces of scale activations' outputs (and their reshapes)
    # raw spaces whose channels are the *last* dim: the hidden features of a Linear applied to
    # (N, ..., C) tensors (a transformer / ConvNeXt MLP); only elementwise ops keep them
    last_raw: set[int] = set()

    def new_space(w: int, reason: str | None = None) -> int:
        s = uf.new()
        width[s] = w
        fixed[s] = [reason] if reason else []
        return s

    def fix(node_arg, reason: str) -> None:
        for a in node_arg:
            if isinstance(a, fx.Node) and a in space_of:
                fixed[space_of[a]].append(reason)

    def tensor_args(node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in space_of]

    for node in gm.graph.nodes:
        if node.op == "output":
            fix(node.all_input_nodes, "reaches the model output")
            continue
        if not _is_tensor(node):
            # Non-tensor results (sizes, tuples): a tuple of tensors is opaque to us.
            if node.op != "placeholder" and node.meta.get("tensor_meta") is not None:
                fix(node.all_input_nodes,
                    f"consumed by '{node.target}', which returns several tensors")
            continue
        shape = _shape(node)
        out_w = shape[1] if len(shape) >= 2 else 1
        ins = tensor_args(node)
        src = space_of[ins[0]] if ins else None
        if any(space_of[a] in last_raw for a in ins) and not _keeps_last(node, ins, mods):
            fix(ins, f"its last-dim channels are read by '{node.target}' (node {node.name})")
            space_of[node] = new_space(out_w, f"produced by '{node.target}'")
            continue
        if node.op == "placeholder":
            space_of[node] = new_space(out_w, "carries the model input")
            continue
        if node.op == "get_attr":
            space_of[node] = new_space(out_w, f"a tensor attribute '{node.target}' used directly")
            continue
        if node.op == "call_module":
            name = node.target
            if any(name == s or name.startswith(s + ".") for s in skip):
                continue
            m = mods[name]
            calls[name] = calls.get(name, 0) + 1
            if isinstance(m, nn.Conv2d):
                if _is_depthwise(m):
                    role.append(("dw", name, src))
                    space_of[node] = src
                elif m.groups == 1:
                    role.append(("consumer", name, src))
                    space_of[node] = new_space(out_w)
                    role.append(("producer", name, space_of[node]))
                else:
                    # Grouped conv: channel-mixing within each of its groups.  Its input and
                    # output spaces are pruned group-consistently (same count per group).
                    role.append(("consumer", name, src))
                    group_req.setdefault(src, []).append((m.groups, name))
                    space_of[node] = new_space(out_w)
                    group_req.setdefault(space_of[node], []).append((m.groups, name))
                    role.append(("producer", name, space_of[node]))
                continue
            if isinstance(m, nn.BatchNorm2d):
                role.append(("cw", name, src))
                space_of[node] = src
                continue
            if isinstance(m, nn.Linear):
                in_shape = _shape(ins[0])
                if len(in_shape) == 2:
                    role.append(("consumer", name, src))
                    linear_in[name] = (src, in_shape[1])
                    space_of[node] = new_space(out_w, f"features of Linear '{name}'")
                    continue
                # (N, ..., C): a token / channels-last MLP layer.  It reads a last-dim space
                # as a channel-mixing consumer, and its own outputs are one (a unit when an
                # elementwise chain takes them to another such Linear).
                if src in last_raw:
                    role.append(("consumer", name, src))
                    linear_in[name] = (src, in_shape[-1])
                else:
                    fix(ins, f"read by Linear '{name}' along its last dimension")
                space_of[node] = new_space(shape[-1])
                last_raw.add(space_of[node])
                role.append(("producer", name, space_of[node]))
                continue
            if isinstance(m, nn.Flatten):
                if m.start_dim == 1 and len(shape) == 2:
                    space_of[node] = src
                else:
                    fix(ins, f"reshaped by '{name}'")
                    space_of[node] = new_space(out_w, f"reshaped by '{name}'")
                continue
            if (isinstance(m, _PASS_MODULES) or _is_drop_module(m)) and len(ins) == 1:
                space_of[node] = src
                continue
            if _is_scale_module(m) and len(ins) == 1:
                fix(ins, f"feeds the scale activation '{name}' (f(0) != 0)")
                space_of[node] = new_space(out_w, f"produced by the scale activation '{name}'")
                scale_raw.add(space_of[node])
                continue
            fix(ins, f"consumed by unsupported module '{name}' ({type(m).__name__})")
            space_of[node] = new_space(out_w, f"produced by unsupported module '{name}' "
                                              f"({type(m).__name__})")
            if any(True for _ in m.parameters(recurse=False)):
                role.append(("const", name, -1))
            continue
        # call_function / call_method
        t = node.target
        label = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        nontensor_args = [a for a in node.args if not isinstance(a, fx.Node)]
        if (t in _ADD_FUNCTIONS or t in _ADD_METHODS) and len(ins) == 2 and not nontensor_args \
                and not node.kwargs and _shape(ins[0]) == _shape(ins[1]) == shape \
                and (space_of[ins[0]] in last_raw) == (space_of[ins[1]] in last_raw):
            s = uf.union(space_of[ins[0]], space_of[ins[1]])
            adds.append(s)
            space_of[node] = s
            continue
        if (t in _PASS_FUNCTIONS or t in _PASS_METHODS or label in _DROP_FUNCTION_NAMES) \
                and len(ins) == 1 and _shape(ins[0])[:2] == shape[:2]:
            space_of[node] = src
            continue
        if (t in _SCALE_FUNCTIONS or t in _SCALE_METHODS) and len(ins) == 1:
            fix(ins, f"feeds the scale activation '{label}' (f(0) != 0)")
            space_of[node] = new_space(out_w, f"produced by the scale activation '{label}'")
            scale_raw.add(space_of[node])
            continue
        if t in _SCALE_SHAPE_METHODS and node.args and isinstance(node.args[0], fx.Node) \
                and space_of.get(node.args[0]) in scale_raw:
            # a reshape / expand of a scale: other inputs (expand_as(x)) only give the shape
            space_of[node] = new_space(out_w, f"a reshaped scale ('{label}')")
            scale_raw.add(space_of[node])
            continue
        if (t in _MUL_FUNCTIONS or t in _MUL_METHODS) and len(ins) == 2 and not node.kwargs:
            se = _se_scale(node, ins, mods)
            if se is not None:
                x, conv = se
                space_of[node] = space_of[x]
                role.append(("scale", conv, space_of[x]))
                continue
        if t in _CAT_FUNCTIONS:
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if isinstance(parts, (list, tuple)) and parts and len(shape) >= 2 \
                    and dim in (1, 1 - len(shape)) \
                    and all(isinstance(a, fx.Node) and a in space_of for a in parts) \
                    and all(_shape(a)[1] == width[space_of[a]] for a in parts):
                # (each part's dim 1 must be its channels: not features flattened from them)
                c = new_space(out_w)
                segs: list[int] = []
                for a in parts:
                    segs.extend(cat_segs.get(space_of[a], [space_of[a]]))
                cat_segs[c], cat_name[c] = segs, node.name
                space_of[node] = c
                continue
        if len(ins) == 1 and len(shape) == 2 and len(_shape(ins[0])) >= 2 \
                and shape[0] == _shape(ins[0])[0] and shape[1] == math.prod(_shape(ins[0])[1:]) \
                and (t in _FLATTEN_FUNCTIONS or t in _VIEW_METHODS):
            # Flatten of (N, C, H, W) keeps channel-major order: channel c owns a block of H*W.
            space_of[node] = src
            continue
        if (t in _MEAN or t == "mean") and len(ins) == 1 and len(shape) >= 2 \
                and shape[:2] == _shape(ins[0])[:2]:
            space_of[node] = src
            continue
        fix(ins, f"consumed by unsupported operation '{label}' (node {node.name})")
        space_of[node] = new_space(out_w, f"produced by unsupported operation '{label}'")

    # A module called more than once shares weights between places: leave its spaces alone.
    for _, name, s in role:
        if calls.get(name, 0) > 1 and s >= 0:
            fixed[s].append(f"'{name}' is called {calls[name]} times")

    # ----- merge raw spaces into spaces ---------------------------------------------------
    spaces: dict[int, Space] = {}
    for s in range(len(uf.parent)):
        r = uf.find(s)
        sp = spaces.setdefault(r, Space(id=r, width=width[r]))
        sp.fixed.extend(x for x in fixed[s] if x not in sp.fixed)
    for s in adds:
        spaces[uf.find(s)].has_add = True
    for s, reqs in group_req.items():
        sp = spaces[uf.find(s)]
        for g, conv in reqs:
            sp.groups = math.lcm(sp.groups, g)
            if sp.width % sp.groups:
                sp.fixed.append(f"grouped conv '{conv}' (groups={g}) does not divide it evenly")
            elif sp.groups == sp.width:
                sp.fixed.append(f"grouped conv '{conv}' (groups={g}) has one channel per group")
    for kind, name, s in role:
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
        elif kind == "consumer":
            if name in linear_in:
                block = linear_in[name][1] // sp.width
                if block * sp.width != linear_in[name][1]:
                    sp.fixed.append(f"Linear '{name}' features are not a multiple of channels")
                sp.consumers.append((name, block))
            else:
                sp.consumers.append((name, 1))

    cats = _concats(cat_segs, cat_name, uf, spaces)
    node_space = {n: uf.find(s) for n, s in space_of.items()}
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

    units = [spaces[uf.find(space_of[n])] for n in gm.graph.nodes
             if n.op == "call_module" and n.target in mods
             and isinstance(mods[n.target], (nn.Conv2d, nn.Linear))
             and n in space_of]
    seen: set[int] = set()
    ordered: list[Space] = []
    for sp in units:
        if sp.id not in seen and not sp.fixed and sp.producers:
            seen.add(sp.id)
            ordered.append(sp)
    ungated = [(sp.name, "; ".join(sp.fixed)) for sp in spaces.values()
               if sp.producers and sp.fixed]

    # a concat whose segment is not gated after all (fixed while placing gates) keeps it whole
    costs, covered = _cost_model(mods, role, uf, spaces, linear_in, spatial, cats)
    for c in costs:
        if c.kind == "linear":
            c.calls = linear_calls.get(c.name, 0)
    total = sum(p.numel() for n, p in model.named_parameters()
                if not any(n.startswith(s + ".") for s in skip))
    return Structure(spaces=spaces, units=ordered, ungated=ungated, costs=costs,
                     const_params=total - covered, input_size=tuple(input_size),
                     warnings=warnings, cats=cats)


_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish,
                          F.leaky_relu, F.elu, F.mish, torch.tanh, F.dropout}
_ELEMENTWISE_METHODS = {"relu", "relu_", "contiguous", "clone", "tanh"}


def _keeps_last(node: fx.Node, ins: list[fx.Node], mods: dict) -> bool:
    """Whether ``node`` may read a last-dim space: a Linear, an add, an elementwise activation
    with f(0) = 0 or dropout (channels stay the last dim and a zero channel stays zero)."""
    if node.op == "call_module":
        m = mods[node.target]
        return isinstance(m, (nn.Linear, nn.Dropout, nn.Identity) + _ACT_MODULES) \
            or _is_drop_module(m)
    t = node.target
    if t in _ADD_FUNCTIONS or t in _ADD_METHODS:
        return True
    label = t if isinstance(t, str) else getattr(t, "__name__", "")
    return len(ins) == 1 and (t in _ELEMENTWISE_FUNCTIONS or t in _ELEMENTWISE_METHODS
                              or label in _DROP_FUNCTION_NAMES)


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


def _se_scale(node: fx.Node, ins: list[fx.Node], mods: dict) -> tuple[fx.Node, str] | None:
    """If ``node`` is the multiply of a squeeze-excitation block, x * act(fc(...)) with act a
    sigmoid-like gate of one value per (sample, channel) of x (shape (N, C, 1, 1), or (N, C)
    reshaped / expanded to it) read only here, and fc a 1×1 conv or a Linear, return
    (x, fc's name)."""
    for x, s in ((ins[0], ins[1]), (ins[1], ins[0])):
        xs = _shape(x)
        if len(xs) != 4 or _shape(node) != xs or len(s.users) != 1:
            continue
        while s.op == "call_method" and s.target in _SCALE_SHAPE_METHODS and s.args \
                and isinstance(s.args[0], fx.Node) and len(s.args[0].users) == 1:
            s = s.args[0]
        ss = _shape(s) if _is_tensor(s) else ()
        if len(ss) < 2 or ss[:2] != xs[:2] or math.prod(ss[2:]) != 1:
            continue
        is_act = (s.op == "call_module" and _is_scale_module(mods[s.target])) or (
            s.op in ("call_function", "call_method") and (s.target in _SCALE_FUNCTIONS
                                                          or s.target in _SCALE_METHODS))
        if not is_act or len(s.all_input_nodes) != 1:
            continue
        c = s.all_input_nodes[0]
        m = mods.get(c.target) if c.op == "call_module" else None
        if ((isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear)) \
                and len(c.users) == 1:
            return x, c.target
    return None


def _concats(cat_segs: dict[int, list[int]], cat_name: dict[int, str], uf: _UnionFind,
             spaces: dict[int, Space]) -> list[Cat]:
    """Concatenations whose result is read only by channel-mixing consumers (through
    zero-preserving ops): their segments can be gated, the consumers sliced at offsets.
    Otherwise (a BN, an add, the output, ... reads the concat) every segment stays fixed."""
    cats: list[Cat] = []
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
            continue
        if not sp.consumers:
            continue  # only read by another concat: that one carries the segments
        cat = Cat(id=len(cats), name=cat_name[c],
                  segments=[(uf.find(r), spaces[uf.find(r)].width) for r in segs],
                  consumers=list(sp.consumers))
        cats.append(cat)
        for r in dict.fromkeys(uf.find(r) for r in segs):
            spaces[r].cats.append(cat.id)
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
    label: dict[fx.Node, bool] = {}  # True: after the gate
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
