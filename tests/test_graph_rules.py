"""The rules of paam_fast.graph_rules, each on its own: walk a small traced model up to one node
and call that node's rule directly."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from paam_fast.graph import _trace
from paam_fast.graph_rules import RULES, Op, Walk, classify, rule, unsupported, visit


def walk_to(model: nn.Module, size, name: str) -> tuple[Walk, Op]:
    """The walk state just before node ``name``, and that node's Op."""
    gm = _trace(model, torch.randn(size))
    w = Walk(mods=dict(model.named_modules()))
    for node in gm.graph.nodes:
        if node.name == name:
            return w, Op.of(w, node)
        visit(w, node)
    raise KeyError(name)


class Two(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=groups)

    def forward(self, x):
        y = self.a(x)
        z = self.b(y)
        return (z + y) + z.mean((2, 3), keepdim=True)


def test_every_kind_has_one_rule_and_targets_are_not_shared():
    assert all(k == r.kind for k, r in RULES.items())
    assert {"conv", "batchnorm", "linear", "add", "mul", "cat", "reshape", "mean", "scale",
            "channelwise", "output", "non_tensor", "last_dim"} <= set(RULES)
    with pytest.raises(ValueError, match="matches a target of rule 'add'"):
        rule("add_again", functions={operator.add})(lambda w, op: True)
    assert "add_again" not in RULES


def test_grouped_conv_rule_records_the_group_constraint_on_both_sides():
    w, op = walk_to(Two(groups=4), (1, 3, 8, 8), "b")
    assert classify(w, op) == "conv"
    assert RULES["conv"].handle(w, op)
    out = w.space_of[op.node]
    assert w.group_req == {op.src: [(4, "b")], out: [(4, "b")]}
    assert w.role[-2:] == [("consumer", "b", op.src), ("producer", "b", out)]


def test_add_rule_joins_equal_shapes_and_declines_a_broadcast():
    w, op = walk_to(Two(), (1, 3, 8, 8), "add")
    assert RULES["add"].handle(w, op)
    assert w.uf.find(w.space_of[op.ins[0]]) == w.uf.find(w.space_of[op.ins[1]])
    w, op = walk_to(Two(), (1, 3, 8, 8), "add_1")  # (N, C, H, W) + (N, C, 1, 1)
    assert classify(w, op) == "add" and not RULES["add"].handle(w, op)


def test_unsupported_fixes_what_it_reads_with_the_reason():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return F.interpolate(self.a(x), scale_factor=2.0)

    w, op = walk_to(Up(), (1, 3, 4, 4), "interpolate")
    assert classify(w, op) is None
    unsupported(w, op)
    assert w.fixed[op.src] == ["consumed by unsupported operation 'interpolate' (node interpolate)"]
    assert w.fixed[w.space_of[op.node]] == ["produced by unsupported operation 'interpolate'"]


def test_tuple_results_fix_their_input():
    class Chunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            u, v = torch.chunk(self.a(x), 2, 1)
            return u * v

    w, op = walk_to(Chunk(), (1, 3, 4, 4), "chunk")
    assert classify(w, op) == "non_tensor"
    RULES["non_tensor"].handle(w, op)
    assert w.fixed[op.src] == ["consumed by 'chunk' (node chunk), which returns several tensors"]


def test_op_of_a_placeholder_is_a_fixed_input_space():
    gm = fx.symbolic_trace(nn.Identity())
    w = Walk(mods={})
    node = next(iter(gm.graph.nodes))
    node.meta["tensor_meta"] = type("M", (), {"shape": (1, 3, 4, 4)})()
    op = Op.of(w, node)
    assert classify(w, op) == "placeholder" and op.out_w == 3
    RULES["placeholder"].handle(w, op)
    assert w.fixed[w.space_of[node]] == ["carries the model input"]


def test_grouped_coupling_says_so_when_it_can_gate_no_residual_space():
    """An option-A shortcut written inline (a strided slice and a zero pad, which the walk
    cannot slice) fixes the residual space: grouped coupling then gates exactly the internal
    units, and warns.  The library's own CIFAR ResNets (models.PadShortcut) and a torchvision
    ResNet have their residual spaces gated under grouped, without that warning."""
    import torchvision

    from paam_fast.graph import analyse
    from paam_fast.models.resnet_cifar import resnet20

    class InlineOptionA(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.c1, self.b1 = nn.Conv2d(4, 6, 3, 2, 1), nn.BatchNorm2d(6)
            self.c2, self.b2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = F.relu(self.bn0(self.stem(x)))
            y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            x = F.relu(y + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2)))
            return self.fc(x.mean((2, 3)))

    inline = analyse(InlineOptionA(), (1, 3, 8, 8), "grouped")
    assert [u.name for u in inline.units] == ["c1"]
    assert any("gates no residual space" in w for w in inline.warnings)
    for model, size in ((resnet20(), 32), (torchvision.models.resnet18(num_classes=10), 64)):
        s = analyse(model, (1, 3, size, size), "grouped")
        assert any(u.has_add for u in s.units)
        assert not any("gates no residual space" in w for w in s.warnings)
