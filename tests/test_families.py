"""Drop-in on grouped convolutions, squeeze-excitation, concatenations and timm models (issue 12).

Every family: paamify at 64×64, random BN statistics and scoring head, select(keep=0.5) lands
within one selection step of the budget, masked == exported, the count is the hand count, no unit
is empty, grouped convs keep their groups, and compact keeps an SGD optimizer's state for the
kept rows.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import hand_count, max_filter_cost, randomize, rel
from torch import nn

import paam_fast as pf

SIZE = (1, 3, 64, 64)


def _tv(name, **kw):
    import torchvision

    return lambda: torchvision.models.get_model(name, weights=None, num_classes=10, **kw)


def _timm(name):
    pytest.importorskip("timm")
    return lambda: pf.models.get_model(f"timm:{name}")


def _scored(model_fn, coupling):
    """(dense model, paamified copy with its weights, random BN statistics and a first
    forward done, the input)."""
    dense = model_fn()
    model = pf.paamify(model_fn(), coupling=coupling, input_size=SIZE)
    model.load_state_dict(dense.state_dict(), strict=False)
    randomize(model)
    model.eval()
    x = torch.randn(2, *SIZE[1:])
    model(x)
    return dense, model, x


def check_prunes_to_half(model_fn, coupling):
    """The truths of PAAM_METHOD.md §7 on one model; returns (paamified model, export)."""
    dense, model, x = _scored(model_fn, coupling)
    dense_params = pf.count(model, SIZE)["params"]
    sel = pf.select(model, keep=0.5)
    for i, u in enumerate(model.paam.units):
        per_group = model.paam.mask(i).view(u.groups, -1).sum(1)
        assert int(per_group.min()) >= 1, u.name
        assert bool((per_group == per_group[0]).all()), f"{u.name}: unequal groups {per_group}"
    y_masked = model(x)
    plain = pf.export(model)
    assert rel(plain(x), y_masked) <= 1e-5
    counted = pf.count(plain, SIZE)
    assert counted == hand_count(plain, SIZE)
    assert counted["params"] == sel.params and counted["flops"] == sel.flops
    budget = 0.5 * dense_params
    assert budget - max_filter_cost(model, per_group=True) <= counted["params"] <= budget
    dense_mods = dict(dense.named_modules())
    for n, m in plain.named_modules():
        d = dense_mods.get(n)
        if isinstance(m, nn.Conv2d) and d.groups == d.in_channels == d.out_channels > 1:
            assert m.groups == m.in_channels == m.out_channels, n  # depthwise stays depthwise
        elif isinstance(m, nn.Conv2d):
            assert m.groups == d.groups, n
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, n
            assert m.weight.shape[1] == m.in_channels // m.groups, n

    # compact with SGD: the optimizer's state follows the kept rows.  Setting every momentum
    # buffer to its parameter makes "sliced like the parameter" an equality after compaction.
    work = copy.deepcopy(model)
    opt = torch.optim.SGD(pf.param_groups(work), lr=0.1, momentum=0.9)
    net_params = opt.param_groups[0]["params"]
    for p in net_params:
        opt.state[p]["momentum_buffer"] = p.detach().clone()
    pf.compact(work, optimizer=opt)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {
        id(p) for p in work.parameters()}
    for p in opt.param_groups[0]["params"]:
        assert torch.equal(opt.state[p]["momentum_buffer"], p.detach())
    assert rel(work(x), y_masked) <= 1e-5
    return model, plain


def _pruned(plain, dense_fn, names):
    dense = dict(dense_fn().named_modules())
    mods = dict(plain.named_modules())
    return [n for n in names if mods[n].weight.shape != dense[n].weight.shape]


TORCHVISION = [
    ("resnext50_32x4d", "internal", "grouped"),
    ("regnet_x_400mf", "internal", "grouped"),
    ("regnet_y_400mf", "internal", "se"),
    ("regnet_y_400mf", "grouped", "se"),
    ("efficientnet_b0", "internal", "se"),
    ("googlenet", "internal", "cat"),
    ("convnext_tiny", "internal", "mlp"),
]


@pytest.mark.parametrize("name,coupling,family", TORCHVISION)
def test_torchvision_family_prunes_to_half(name, coupling, family):
    fn = _tv(name, **({"init_weights": False} if name == "googlenet" else {}))
    model, plain = check_prunes_to_half(fn, coupling)
    units = model.paam.units
    mods = dict(model.named_modules())
    if family == "grouped":  # the grouped convs' own channels and their inputs are gated
        grouped = [n for n, m in mods.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert any(n in u.producers for u in units for n in grouped)
        assert any(n == c for u in units for c, _ in u.consumers for n in grouped)
        assert _pruned(plain, fn, grouped)
    elif family == "se":  # an SE's expand conv loses the rows of the channels it rescales
        scales = [s for u in units for s in u.scales]
        assert scales and _pruned(plain, fn, scales)
    elif family == "mlp":  # the hidden features of a channels-last MLP (Linear, GELU, Linear)
        lin = [n for u in units for n in u.producers if isinstance(mods[n], nn.Linear)]
        assert lin and _pruned(plain, fn, lin)
    elif family == "cat":  # inception branches are gated, the concat's consumers sliced
        cats = model.paam.structure.cats
        assert cats
        segs = {sid for c in cats for sid, _ in c.segments}
        assert any(u.id in segs for u in units)
        assert _pruned(plain, fn, [n for c in cats for n, _ in c.consumers])


TIMM = [
    ("resnet50d", "internal"),
    ("resnext50_32x4d", "internal"),
    ("efficientnet_b0", "internal"),
    ("regnety_016", "internal"),
    ("mobilenetv3_large_100", "internal"),
    ("cspresnet50", "internal"),
    ("dla34", "internal"),
    ("repvgg_a0", "grouped"),
]


@pytest.mark.parametrize("name,coupling", TIMM)
def test_timm_model_prunes_to_half(name, coupling):
    check_prunes_to_half(_timm(name), coupling)


def test_timm_repvgg_internal_is_refused_by_name():
    with pytest.raises(ValueError, match=r"no unit.*stem\.conv_1x1\.conv: feeds a residual add"):
        pf.paamify(_timm("repvgg_a0")(), input_size=SIZE)


def test_get_model_timm_unknown_name():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        pf.models.get_model("timm:no_such_net")


class Mixed(nn.Module):
    """Small: a grouped conv, a squeeze-excitation, an inception-style concat, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.g = nn.Conv2d(16, 24, 3, padding=1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.fc1 = nn.Conv2d(24, 6, 1)
        self.fc2 = nn.Conv2d(6, 24, 1)
        self.a = nn.Conv2d(24, 8, 1, bias=False)
        self.bna = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(24, 12, 3, padding=1, bias=False)
        self.bnb = nn.BatchNorm2d(12)
        self.head = nn.Linear(20 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.g(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = x * s
        x = torch.cat([F.relu(self.bna(self.a(x))), F.relu(self.bnb(self.b(x)))], 1)
        x = F.max_pool2d(x, 2)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))


def test_small_mixed_model_units():
    model = pf.paamify(Mixed(), input_size=(1, 3, 16, 16))
    units = {u.name: u for u in model.paam.units}
    assert set(units) == {"stem", "g", "fc1", "a", "b"}
    assert units["stem"].groups == 4 and units["g"].groups == 4
    assert units["g"].scales == ["fc2"]
    assert [c for c, _ in model.paam.structure.cats[0].consumers] == ["head"]


@pytest.mark.parametrize("round_to", [1, 8])
def test_small_mixed_model_prunes_trains_and_compacts(round_to):
    torch.manual_seed(0)
    model = pf.paamify(Mixed(), input_size=(1, 3, 16, 16)).double()
    randomize(model)
    opt = torch.optim.SGD(pf.param_groups(model), lr=0.05, momentum=0.9)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    for _ in range(2):  # non-trivial momentum
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model(x)
    sel = pf.select(model, mass=0.5, round_to=round_to)
    for u in model.paam.units:
        w = sel.widths[u.name]
        assert w % u.groups == 0
        assert w % math.lcm(u.groups, round_to) == 0 or w == u.width
    # masked, compact execution in train mode: training goes on through the pruned layers
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    g = model.get_submodule("g")
    m_old = opt.state[g.weight]["momentum_buffer"].clone()
    kept_in = torch.nonzero(model.paam.mask(0)).flatten()
    kept_out = torch.nonzero(model.paam.mask(1)).flatten()
    model.eval()
    y_eval = model(x)
    model.train()
    masked = copy.deepcopy(model)
    y_train = masked(x)
    pf.compact(model, optimizer=opt)
    model.eval()
    assert rel(model(x), y_eval) <= 1e-10
    model.train()
    assert rel(model(x), y_train) <= 1e-10
    g = model.get_submodule("g")
    pos = (kept_in % 4).view(4, -1)  # kept inputs per group, positions in the group
    want = torch.stack([m_old[o, pos[o // 6]] for o in range(24)])[kept_out]
    assert torch.equal(opt.state[g.weight]["momentum_buffer"], want)
    assert g.groups == 4 and g.in_channels == kept_in.numel()


def test_concat_feeding_batchnorm_keeps_segments_ungated():
    # DenseNet-style: a BN reads the concat, so a gated-off channel would not stay zero
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            self.c = nn.Conv2d(16, 4, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = self.bn(torch.cat([self.a(x), self.b(x)], 1))
            return self.head(torch.flatten(F.adaptive_avg_pool2d(self.c(x), 1), 1))

    model = pf.paamify(Dense(), input_size=(1, 3, 8, 8))
    assert [u.name for u in model.paam.units] == ["c"]
    assert any("concatenated by 'cat', whose result is read by 'bn'" in r
               for _, r in model.paam.structure.ungated)


def test_every_channel_tied_to_a_concat_output_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return torch.cat([self.a(x), x], 1)

    with pytest.raises(ValueError, match=r"found no unit.*a: concatenated by 'cat', whose "
                                         r"result reaches the model output"):
        pf.paamify(Tied(), input_size=(1, 3, 8, 8))


def test_grouped_unit_filter_cost_is_per_filter():
    # stem: its row (3·3·3) + bn0 (γ, β) + one input channel of the groups=4 conv 'g', i.e.
    # a quarter of g's 24 rows (6 rows · 3·3)
    model = pf.paamify(Mixed(), input_size=(1, 3, 16, 16))
    assert model.paam.units[0].name == "stem"
    assert model.paam.filter_costs("params")[0] == 27 + 2 + 6 * 9


def test_concat_of_flattened_features_stays_ungated():
    # features flattened from channels (C·H·W per sample) are not channels: no offsets to slice
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(2 * 4 * 4, 2)

        def forward(self, x):
            x = F.adaptive_avg_pool2d(x, 2)
            return self.head(torch.cat([torch.flatten(self.a(x), 1),
                                        torch.flatten(self.b(x), 1)], 1))

    with pytest.raises(ValueError, match="consumed by unsupported operation 'cat'"):
        pf.paamify(Flat(), input_size=(1, 3, 8, 8))


def test_paam_train_takes_a_timm_arch(tmp_path):
    pytest.importorskip("timm")
    import json
    import os

    from paam_fast.train import main

    out = str(tmp_path / "run")
    assert main(["--epochs", "2", "--select-epoch", "1", "--arch", "timm:test_efficientnet",
                 "--keep", "0.5", "--out", out, "--quiet"]) == 0
    with open(os.path.join(out, "report.json")) as f:
        rep = json.load(f)
    assert rep["arch"] == "timm:test_efficientnet"
    assert rep["params_final"] <= 0.5 * rep["params_dense"]


class SELayer(nn.Module):
    """The hand-written SE of many repositories: Linear layers, view and expand_as."""

    def __init__(self, c, r=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c, c // r, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(c // r, c, bias=True), nn.Sigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.se = SELayer(16)
        self.conv2 = nn.Conv2d(16, 12, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        x = self.se(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_plain_op_se_with_linear_layers_prunes():
    model = pf.paamify(SENet(), input_size=SIZE)
    unit = model.paam.units[0]
    assert unit.name == "conv1" and unit.scales == ["se.fc.2"]
    _, plain = check_prunes_to_half(SENet, "internal")
    assert plain.se.fc[2].out_features == plain.conv1.out_channels < 16
    assert plain.se.fc[0].in_features == plain.conv1.out_channels


class TokenMLP(nn.Module):
    """Channels-last MLP blocks (ConvNeXt / transformer style) and a pooling over positions."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.fc1 = nn.Linear(8, 96)
        self.fc2 = nn.Linear(96, 8)
        self.fc3 = nn.Linear(8, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        x = F.relu(self.fc3(x)).mean((1, 2))  # pooled over positions: not elementwise
        return self.head(x)


def test_channels_last_mlp_hidden_features_are_units():
    model = pf.paamify(TokenMLP(), input_size=SIZE)
    units = {u.name: u for u in model.paam.units}
    assert set(units) == {"fc1"} and units["fc1"].sites == ["fc1"]  # gate folds into fc1
    assert any(n == "fc3" and "read by 'mean'" in r for n, r in model.paam.structure.ungated)
    _, plain = check_prunes_to_half(TokenMLP, "internal")
    assert plain.fc1.out_features == plain.fc2.in_features < 96


class MixConv(nn.Module):
    """MixNet's mixed-kernel conv (timm MixedConv2d): split the channels, run convs of different
    kernel sizes per chunk, concatenate."""

    def __init__(self, cin, cout, kernels, depthwise=False):
        super().__init__()
        k = len(kernels)
        ins = [cin // k + (cin % k if i == 0 else 0) for i in range(k)]
        outs = [cout // k + (cout % k if i == 0 else 0) for i in range(k)]
        self.splits = ins
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, ks, padding=ks // 2, groups=i if depthwise else 1, bias=False)
            for i, o, ks in zip(ins, outs, kernels))

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([c(parts[i]) for i, c in enumerate(self.convs)], 1)


class MixBlock(nn.Module):
    """An inverted residual of MixNet (timm mixnet_s blocks.5.1): plain 1×1 expand, mixed
    depthwise 3×3/5×5, mixed 1×1 project whose concatenation feeds the residual add (through
    its BN)."""

    def __init__(self, c, e):
        super().__init__()
        self.pw = nn.Conv2d(c, e, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(e)
        self.dw = MixConv(e, e, [3, 5], depthwise=True)
        self.bn2 = nn.BatchNorm2d(e)
        self.pwl = MixConv(e, c, [1, 1])
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.pw(x)))
        y = F.relu(self.bn2(self.dw(y)))
        return x + self.bn3(self.pwl(y))


class MixNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(MixBlock(16, 48), MixBlock(16, 32))
        self.head_conv = nn.Conv2d(16, 24, 1, bias=False)
        self.bn_head = nn.BatchNorm2d(24)
        self.mix = MixConv(24, 32, [3, 5])  # its concatenation is read by the classifier only
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn0(self.stem(x))))
        x = self.mix(F.relu(self.bn_head(self.head_conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))


@pytest.mark.parametrize("coupling", ["internal", "grouped"])
def test_split_concat_into_residual_add_prunes_exactly(coupling):
    # timm mixnet_s (issue 19): a residual add joins the stem's channels to the concatenation
    # of split convs.  The segments are not sliced to follow a gate on the add's channels, so
    # those channels stay ungated, with the reason; the rest prunes exactly (masked == exported).
    model, plain = check_prunes_to_half(MixNetLike, coupling)
    units = {u.name for u in model.paam.units}
    assert units == {"mix.convs.0", "mix.convs.1"}  # segments read by the classifier: gated
    reasons = dict(model.paam.structure.ungated)
    want = "concatenation 'cat"  # names the concatenation (node cat_N) joined to the add
    assert want in reasons["stem"], reasons["stem"]
    assert plain.fc.in_features < 32


@pytest.mark.parametrize("coupling", ["internal", "grouped"])
def test_timm_mixnet_s_prunes_exactly(coupling):
    # issue 19: the forward after selection raised "x has 200 channels but 10 are alive".  Its
    # split convs leave over half the parameters ungated, so keep=0.5 is out of reach: 0.75.
    dense, model, x = _scored(_timm("mixnet_s"), coupling)
    sel = pf.select(model, keep=0.75)
    y_masked = model(x)
    plain = pf.export(model)
    assert rel(plain(x), y_masked) <= 1e-5
    assert pf.count(plain, SIZE)["params"] == sel.params <= 0.75 * pf.count(dense, SIZE)["params"]
    assert "concatenation 'cat" in dict(model.paam.structure.ungated)["blocks.5.0.conv_pwl"]
