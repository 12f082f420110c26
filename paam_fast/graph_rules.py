"""The walk over the fx graph that assigns every tensor a channel space (PAAM_METHOD.md §2).

One rule per kind of operation (a conv, a BN, an add, a concat, ...), in the table ``RULES``.
:func:`walk` visits the nodes in graph order; :func:`classify` names the rule of each node and
the rule records what the operation does to channels in the shared :class:`Walk` state.  A rule
may decline a node that does not have the pattern it handles (a broadcast add, a multiply that is
not a squeeze-excitation, ...); a declined or unknown operation is handled in one place,
:func:`unsupported`, which fixes the spaces it reads and records why.  Adding an operation kind
means adding one rule here (its matchers and its handler).

:mod:`paam_fast.graph` turns the raw spaces of a :class:`Walk` into :class:`~paam_fast.graph.Space`
objects, places the gates and builds the cost model.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .models.resnet_cifar import PadShortcut

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
# what a last-dim (channels-last) space may pass through: see _keeps_last
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish,
                          F.leaky_relu, F.elu, F.mish, torch.tanh, F.dropout}
_ELEMENTWISE_METHODS = {"relu", "relu_", "contiguous", "clone", "tanh"}


def _is_scale_module(m: nn.Module) -> bool:
    return isinstance(m, _SCALE_MODULES) or type(m).__name__ in _SCALE_NAMES


def _is_drop_module(m: nn.Module) -> bool:
    return type(m).__name__ in _DROP_NAMES


def _is_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape")


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _is_depthwise(m: nn.Conv2d) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _label(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


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


# ------------------------------------------------------------------------- the shared state
@dataclass
class Walk:
    """What the rules record while walking the graph.  Space ids are *raw* (before the union
    of residual adds); ``uf`` joins them.

    ``role``: (kind, module name, raw space) with kind "producer" (output rows), "consumer"
    (input columns), "cw" (BN), "dw" (depthwise conv), "scale" (an SE's expand conv), "shift"
    (an option-A shortcut's output channels) or "const" (an unsupported module with
    parameters; space -1).
    """

    mods: dict[str, nn.Module]
    skip: tuple[str, ...] = ()
    uf: _UnionFind = field(default_factory=_UnionFind)
    space_of: dict[fx.Node, int] = field(default_factory=dict)  # tensor node -> raw space id
    width: dict[int, int] = field(default_factory=dict)
    fixed: dict[int, list[str]] = field(default_factory=dict)  # raw space -> why not gateable
    role: list[tuple[str, str, int]] = field(default_factory=list)
    linear_in: dict[str, tuple[int, int]] = field(default_factory=dict)  # -> (space, features)
    calls: dict[str, int] = field(default_factory=dict)  # module -> calls in the graph
    adds: list[int] = field(default_factory=list)  # spaces joined by a residual add
    group_req: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # (groups, conv)
    cat_segs: dict[int, list[int]] = field(default_factory=dict)  # concat -> its segments
    cat_name: dict[int, str] = field(default_factory=dict)
    scale_raw: set[int] = field(default_factory=set)  # outputs of scale activations (reshaped)
    # spaces whose channels are the *last* dim: the hidden features of a Linear applied to
    # (N, ..., C) tensors (a transformer / ConvNeXt MLP); only elementwise ops keep them
    last_raw: set[int] = field(default_factory=set)

    def new_space(self, w: int, reason: str | None = None) -> int:
        s = self.uf.new()
        self.width[s] = w
        self.fixed[s] = [reason] if reason else []
        return s

    def fix(self, nodes, reason: str) -> None:
        for a in nodes:
            if isinstance(a, fx.Node) and a in self.space_of:
                self.fixed[self.space_of[a]].append(reason)

    def skipped(self, name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in self.skip)


@dataclass
class Op:
    """One node as the rules see it: ``ins`` its inputs that carry a space (in order), ``src``
    the first one's space, ``shape`` its output shape (None for a non-tensor result)."""

    node: fx.Node
    ins: list[fx.Node]
    src: int | None
    shape: tuple[int, ...] | None

    @classmethod
    def of(cls, w: Walk, node: fx.Node) -> Op:
        ins = [a for a in node.all_input_nodes if a in w.space_of]
        return cls(node, ins, w.space_of[ins[0]] if ins else None,
                   _shape(node) if _is_tensor(node) else None)

    @property
    def out_w(self) -> int:
        """The output's channels (dim 1), 1 for a scalar or a vector."""
        return self.shape[1] if len(self.shape) >= 2 else 1

    @property
    def label(self) -> str:
        return _label(self.node.target)

    def module(self, w: Walk) -> nn.Module:
        return w.mods[self.node.target]

    def keep(self, w: Walk, space: int | None = None) -> bool:
        """The output carries the space of the first input (or ``space``)."""
        w.space_of[self.node] = self.src if space is None else space
        return True


# ------------------------------------------------------------------------------ the table
Handler = Callable[[Walk, Op], bool]


@dataclass(frozen=True)
class Rule:
    """The rule of one operation kind: what it matches and its handler.  The handler returns
    False when the node is not the pattern it handles (then it is unsupported)."""

    kind: str
    handle: Handler
    modules: tuple[type, ...] = ()  # module classes (isinstance)
    module_names: frozenset[str] = frozenset()  # module class names (timm's own classes)
    functions: frozenset = frozenset()  # call_function targets
    methods: frozenset[str] = frozenset()  # call_method names
    labels: frozenset[str] = frozenset()  # functions / methods by name (drop_path)

    def matches_module(self, m: nn.Module) -> bool:
        return isinstance(m, self.modules) or type(m).__name__ in self.module_names


RULES: dict[str, Rule] = {}
# node kinds decided before the operation's own rule (no matchers)
_NODE_KINDS = ("output", "non_tensor", "last_dim", "placeholder", "get_attr", "skipped")


def rule(kind: str, *, modules: tuple[type, ...] = (), module_names=(), functions=(),
         methods=(), labels=()) -> Callable[[Handler], Handler]:
    """Register ``handler`` as the rule of ``kind``.  Module rules are tried in registration
    order (the first class that matches wins); a function / method / label names one rule."""

    def register(handler: Handler) -> Handler:
        new = Rule(kind, handler, tuple(modules), frozenset(module_names), frozenset(functions),
                   frozenset(methods), frozenset(labels))
        for r in RULES.values():
            if r.functions & new.functions or r.methods & new.methods or r.labels & new.labels:
                raise ValueError(f"rule '{kind}' matches a target of rule '{r.kind}'")
        RULES[kind] = new
        return handler

    return register


def classify(w: Walk, op: Op) -> str | None:
    """The kind of rule that handles ``op`` (None: unsupported)."""
    node = op.node
    if node.op == "output":
        return "output"
    if op.shape is None:
        return "non_tensor"
    if any(w.space_of[a] in w.last_raw for a in op.ins) and not _keeps_last(node, op.ins, w.mods):
        return "last_dim"
    if node.op in ("placeholder", "get_attr"):
        return node.op
    if node.op == "call_module":
        if w.skipped(node.target):
            return "skipped"
        m = op.module(w)
        return next((r.kind for r in RULES.values() if r.modules or r.module_names
                     if r.matches_module(m)), None)
    t = node.target
    for r in RULES.values():
        if (t in r.methods if node.op == "call_method" else t in r.functions):
            return r.kind
    label = op.label
    return next((r.kind for r in RULES.values() if label in r.labels), None)


def visit(w: Walk, node: fx.Node) -> None:
    """Apply the rule of ``node`` (or :func:`unsupported`)."""
    op = Op.of(w, node)
    kind = classify(w, op)
    if node.op == "call_module" and kind not in _NODE_KINDS:
        w.calls[node.target] = w.calls.get(node.target, 0) + 1
    if kind is None or not RULES[kind].handle(w, op):
        unsupported(w, op)


def walk(gm: fx.GraphModule, mods: dict[str, nn.Module], skip: tuple[str, ...] = ()) -> Walk:
    """Every tensor of ``gm`` (shape-propagated) assigned a raw channel space."""
    w = Walk(mods=mods, skip=skip)
    for node in gm.graph.nodes:
        visit(w, node)
    # A module called more than once shares weights between places: leave its spaces alone.
    for _, name, s in w.role:
        if w.calls.get(name, 0) > 1 and s >= 0:
            w.fixed[s].append(f"'{name}' is called {w.calls[name]} times")
    return w


def unsupported(w: Walk, op: Op) -> None:
    """The one place for operations no rule handles: the spaces they read are fixed, and their
    output is a new fixed space, each with the reason."""
    if op.node.op == "call_module":
        name = op.node.target
        m = op.module(w)
        w.fix(op.ins, f"consumed by unsupported module '{name}' ({type(m).__name__})")
        w.space_of[op.node] = w.new_space(op.out_w, f"produced by unsupported module '{name}' "
                                                    f"({type(m).__name__})")
        if any(True for _ in m.parameters(recurse=False)):
            w.role.append(("const", name, -1))
        return
    w.fix(op.ins, f"consumed by unsupported operation '{op.label}' (node {op.node.name})")
    w.space_of[op.node] = w.new_space(op.out_w, f"produced by unsupported operation '{op.label}'")


# --------------------------------------------------------------------- node-level rules
@rule("output")
def _output(w: Walk, op: Op) -> bool:
    w.fix(op.ins, "reaches the model output")
    return True


@rule("non_tensor")
def _non_tensor(w: Walk, op: Op) -> bool:
    # Non-tensor results (sizes, tuples): a tuple of tensors is opaque to us.
    node = op.node
    if node.op != "placeholder" and node.meta.get("tensor_meta") is not None:
        w.fix(node.all_input_nodes, f"consumed by '{_label(node.target)}' (node {node.name}), "
              "which returns several tensors")
    return True


@rule("last_dim")
def _last_dim(w: Walk, op: Op) -> bool:
    node = op.node
    w.fix(op.ins, f"its last-dim channels are read by '{op.label}' (node {node.name})")
    w.space_of[node] = w.new_space(op.out_w, f"produced by '{op.label}'")
    return True


@rule("placeholder")
def _placeholder(w: Walk, op: Op) -> bool:
    w.space_of[op.node] = w.new_space(op.out_w, "carries the model input")
    return True


@rule("get_attr")
def _get_attr(w: Walk, op: Op) -> bool:
    w.space_of[op.node] = w.new_space(
        op.out_w, f"a tensor attribute '{op.node.target}' used directly")
    return True


@rule("skipped")
def _skipped(w: Walk, op: Op) -> bool:
    return True  # not part of the network: its output carries no space


# ------------------------------------------------------------------------ module rules
@rule("conv", modules=(nn.Conv2d,))
def _conv(w: Walk, op: Op) -> bool:
    name, m, src = op.node.target, op.module(w), op.src
    if _is_depthwise(m):
        w.role.append(("dw", name, src))
        return op.keep(w)
    w.role.append(("consumer", name, src))
    out = w.new_space(op.out_w)
    if m.groups > 1:
        # Grouped conv: channel-mixing within each of its groups.  Its input and output spaces
        # are pruned group-consistently (same count per group).
        w.group_req.setdefault(src, []).append((m.groups, name))
        w.group_req.setdefault(out, []).append((m.groups, name))
    w.role.append(("producer", name, out))
    return op.keep(w, out)


@rule("pad_shortcut", modules=(PadShortcut,))
def _pad_shortcut(w: Walk, op: Op) -> bool:
    """The CIFAR ResNets' option-A shortcut: it reads its input space (sliced in pairs, like a
    conv's input) and writes a new space (every output channel copies one input channel or is
    zero), so the two stages it links are pruned each on its own; the output side's dropped
    channels are zeroed on it by the unit's mask (``Space.shifts``)."""
    m = op.module(w)
    if m.in_channels is None or len(op.ins) != 1 or _shape(op.ins[0])[1] != m.in_channels:
        return False
    name = op.node.target
    w.role.append(("consumer", name, op.src))
    out = w.new_space(op.out_w)
    w.role.append(("shift", name, out))
    return op.keep(w, out)


@rule("batchnorm", modules=(nn.BatchNorm2d,))
def _batchnorm(w: Walk, op: Op) -> bool:
    w.role.append(("cw", op.node.target, op.src))
    return op.keep(w)


@rule("linear", modules=(nn.Linear,))
def _linear(w: Walk, op: Op) -> bool:
    name, src = op.node.target, op.src
    in_shape = _shape(op.ins[0])
    if len(in_shape) == 2:  # a classifier on (N, features)
        w.role.append(("consumer", name, src))
        w.linear_in[name] = (src, in_shape[1])
        return op.keep(w, w.new_space(op.out_w, f"features of Linear '{name}'"))
    # (N, ..., C): a token / channels-last MLP layer.  It reads a last-dim space as a
    # channel-mixing consumer, and its own outputs are one (a unit when an elementwise chain
    # takes them to another such Linear).
    if src in w.last_raw:
        w.role.append(("consumer", name, src))
        w.linear_in[name] = (src, in_shape[-1])
    else:
        w.fix(op.ins, f"read by Linear '{name}' along its last dimension")
    out = w.new_space(op.shape[-1])
    w.last_raw.add(out)
    w.role.append(("producer", name, out))
    return op.keep(w, out)


@rule("flatten_module", modules=(nn.Flatten,))
def _flatten_module(w: Walk, op: Op) -> bool:
    name, m = op.node.target, op.module(w)
    if m.start_dim == 1 and len(op.shape) == 2:
        return op.keep(w)
    w.fix(op.ins, f"reshaped by '{name}'")
    return op.keep(w, w.new_space(op.out_w, f"reshaped by '{name}'"))


@rule("channelwise", modules=_PASS_MODULES, module_names=_DROP_NAMES, functions=_PASS_FUNCTIONS,
      methods=_PASS_METHODS, labels=_DROP_FUNCTION_NAMES)
def _channelwise(w: Walk, op: Op) -> bool:
    """Activations with f(0) = 0, pooling, dropout, drop-path: channels kept."""
    if len(op.ins) != 1:
        return False
    if op.node.op != "call_module" and _shape(op.ins[0])[:2] != op.shape[:2]:
        return False
    return op.keep(w)


@rule("scale", modules=_SCALE_MODULES, module_names=_SCALE_NAMES, functions=_SCALE_FUNCTIONS,
      methods=_SCALE_METHODS)
def _scale(w: Walk, op: Op) -> bool:
    """A sigmoid-like activation (f(0) != 0): its output may only be an SE block's scale."""
    if len(op.ins) != 1:
        return False
    w.fix(op.ins, f"feeds the scale activation '{op.label}' (f(0) != 0)")
    out = w.new_space(op.out_w, f"produced by the scale activation '{op.label}'")
    w.scale_raw.add(out)
    return op.keep(w, out)


# ---------------------------------------------------------------- function / method rules
@rule("add", functions=_ADD_FUNCTIONS, methods=_ADD_METHODS)
def _add(w: Walk, op: Op) -> bool:
    """A residual add of two same-shape tensors joins their spaces."""
    node, ins = op.node, op.ins
    if len(ins) != 2 or any(not isinstance(a, fx.Node) for a in node.args) or node.kwargs \
            or not _shape(ins[0]) == _shape(ins[1]) == op.shape \
            or (w.space_of[ins[0]] in w.last_raw) != (w.space_of[ins[1]] in w.last_raw):
        return False
    s = w.uf.union(w.space_of[ins[0]], w.space_of[ins[1]])
    w.adds.append(s)
    return op.keep(w, s)


@rule("mul", functions=_MUL_FUNCTIONS, methods=_MUL_METHODS)
def _mul(w: Walk, op: Op) -> bool:
    """x * scale of a squeeze-excitation keeps x's space; the scale's conv follows it."""
    if len(op.ins) != 2 or op.node.kwargs:
        return False
    se = _se_scale(op.node, op.ins, w.mods)
    if se is None:
        return False
    x, conv = se
    w.role.append(("scale", conv, w.space_of[x]))
    return op.keep(w, w.space_of[x])


@rule("cat", functions=_CAT_FUNCTIONS)
def _cat(w: Walk, op: Op) -> bool:
    """A concat along channels: a new space made of its parts' segments (see graph._concats)."""
    node, shape = op.node, op.shape
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    # (each part's dim 1 must be its channels: not features flattened from them)
    if not (isinstance(parts, (list, tuple)) and parts and len(shape) >= 2
            and dim in (1, 1 - len(shape))
            and all(isinstance(a, fx.Node) and a in w.space_of for a in parts)
            and all(_shape(a)[1] == w.width[w.space_of[a]] for a in parts)):
        return False
    c = w.new_space(op.out_w)
    segs: list[int] = []
    for a in parts:
        segs.extend(w.cat_segs.get(w.space_of[a], [w.space_of[a]]))
    w.cat_segs[c], w.cat_name[c] = segs, node.name
    return op.keep(w, c)


@rule("reshape", functions=_FLATTEN_FUNCTIONS, methods=_VIEW_METHODS | _SCALE_SHAPE_METHODS)
def _reshape(w: Walk, op: Op) -> bool:
    """A reshape of an SE scale on its way to the multiply, or a flatten (N, C, H, W) ->
    (N, C·H·W) that keeps channel-major order (channel c owns a block of H·W)."""
    node, t, shape, ins = op.node, op.node.target, op.shape, op.ins
    if t in _SCALE_SHAPE_METHODS and node.args and isinstance(node.args[0], fx.Node) \
            and w.space_of.get(node.args[0]) in w.scale_raw:
        # other inputs (expand_as(x)) only give the shape
        out = w.new_space(op.out_w, f"a reshaped scale ('{op.label}')")
        w.scale_raw.add(out)
        return op.keep(w, out)
    if len(ins) == 1 and len(shape) == 2 and len(_shape(ins[0])) >= 2 \
            and shape[0] == _shape(ins[0])[0] and shape[1] == math.prod(_shape(ins[0])[1:]) \
            and (t in _FLATTEN_FUNCTIONS or t in _VIEW_METHODS):
        return op.keep(w)
    return False


@rule("mean", functions=_MEAN, methods={"mean"})
def _mean(w: Walk, op: Op) -> bool:
    """A mean over positions keeps the channels."""
    if len(op.ins) == 1 and len(op.shape) >= 2 and op.shape[:2] == _shape(op.ins[0])[:2]:
        return op.keep(w)
    return False


# ------------------------------------------------------------------------------ patterns
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
