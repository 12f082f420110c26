"""Model-level truths on every supported architecture (PAAM_METHOD.md §7)."""

import pytest
import torch
from helpers import hand_count, max_filter_cost, randomize, rel

import paam_fast as pf

CASES = [
    ("resnet20", "internal", 32),
    ("resnet56", "internal", 32),
    ("resnet18", "internal", 64),
    ("resnet18", "grouped", 64),
    ("resnet50", "internal", 64),
    ("resnet50", "grouped", 64),
    ("vgg11_bn", "internal", 64),
    ("vgg11_bn", "grouped", 64),
    ("mobilenet_v2", "internal", 64),
    ("mobilenet_v2", "grouped", 64),
]


def build(name, coupling, size):
    m = pf.models.get_model(name)
    return pf.paamify(m, coupling=coupling, input_size=(1, 3, size, size))


@pytest.mark.parametrize("name,coupling,size", CASES)
def test_gates_start_at_one_and_change_nothing(name, coupling, size):
    dense = pf.models.get_model(name)
    model = pf.models.get_model(name)
    model.load_state_dict(dense.state_dict())
    pf.paamify(model, coupling=coupling, input_size=(1, 3, size, size))
    x = torch.randn(2, 3, size, size)
    for mode in ("train", "eval"):
        dense.train(mode == "train")
        model.train(mode == "train")
        torch.manual_seed(1)  # dropout draws the same mask for both
        y = model(x)
        torch.manual_seed(1)
        assert torch.equal(y, dense(x))
    for g in pf.scores(model).values():
        assert torch.equal(g, torch.ones_like(g))


@pytest.mark.parametrize("name,coupling,size", CASES)
def test_masked_equals_exported_at_half_params(name, coupling, size):
    model = build(name, coupling, size)
    randomize(model)
    model.eval()
    x = torch.randn(2, 3, size, size)
    model(x)
    dense_params = pf.count(model, (1, 3, size, size))["params"]
    sel = pf.select(model, keep=0.5)
    y_masked = model(x)
    plain = pf.export(model)
    assert not any(type(m).__module__.startswith("paam_fast.nn") or type(m).__name__ ==
                   "PaamController" for m in plain.modules())
    assert rel(plain(x), y_masked) <= 1e-5
    counted = pf.count(plain, (1, 3, size, size))
    assert counted == hand_count(plain, (1, 3, size, size))
    assert counted["params"] == sel.params and counted["flops"] == sel.flops
    budget = 0.5 * dense_params
    assert budget - max_filter_cost(model) <= counted["params"] <= budget
    assert all(w >= 1 for w in sel.widths.values())
    # the model itself is still the masked one, untouched by export
    assert rel(model(x), y_masked) == 0.0


def test_selection_by_flops_holds_the_flops_budget():
    model = build("resnet56", "internal", 32)
    randomize(model)
    model(torch.randn(2, 3, 32, 32))
    dense = pf.count(model, (1, 3, 32, 32))
    sel = pf.select(model, keep=0.6, cost="flops")
    got = pf.count(pf.export(model), (1, 3, 32, 32))
    assert got["flops"] == sel.flops <= 0.6 * dense["flops"]


def test_internal_coupling_never_touches_residual_channels():
    model = build("resnet18", "internal", 64)
    randomize(model)
    model(torch.randn(2, 3, 64, 64))
    pf.select(model, keep=0.5)
    plain = pf.export(model)
    dense = pf.models.get_model("resnet18")
    for (n, a), (_, b) in zip(plain.named_modules(), dense.named_modules()):
        if n.endswith("conv2") or n.endswith("downsample.0") or n == "conv1":
            assert a.weight.shape[0] == b.weight.shape[0], n


def test_mass_mode_min_keep_and_round_to():
    model = build("resnet56", "internal", 32)
    randomize(model, seed=3)
    model(torch.randn(2, 3, 32, 32))
    sel = pf.select(model, mass=0.6, min_keep=0.25, round_to=4)
    for u in model.paam.units:
        w = sel.widths[u.name]
        assert w >= max(1, -(-u.width // 4)) and (w % 4 == 0 or w == u.width)
    g = torch.cat([v for v in pf.scores(model).values()])
    # every kept filter outranks... at least the shortest prefix reaching the mass is kept
    kept = g[g > 0]
    assert kept.sum() >= 0.6 * torch.cat(
        [s for s in model.paam.unit_gates()]).sum() - 1e-6


def test_budget_keeps_the_best_filters_globally():
    model = build("resnet20", "internal", 32)
    randomize(model, seed=5)
    model(torch.randn(2, 3, 32, 32))
    before = pf.scores(model)
    pf.select(model, keep=0.7, min_keep=0.0)
    after = pf.scores(model)
    dropped = torch.cat([before[k][after[k] == 0] for k in before])
    kept = torch.cat([before[k][after[k] > 0] for k in before])
    # filters are taken in global order of g (each unit's floor of one filter aside)
    floors = torch.stack([before[k].max() for k in before])
    assert dropped.numel() > 0
    assert dropped.max() <= kept[~torch.isin(kept, floors)].min() + 1e-7
