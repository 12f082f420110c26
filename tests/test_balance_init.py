"""The scoring head's starting bias (init_bias) and the penalty's balance across units."""

import copy
import math

import pytest
import torch
from torch import nn

import paam_fast as pf


class Tiny(nn.Module):
    """Two gated units of different widths (4 and 8) feeding channel-mixing consumers."""

    input_size = (1, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _tiny(**kw):
    torch.manual_seed(0)
    return pf.paamify(Tiny(), **kw)


@pytest.mark.parametrize("b0", [-3.0, -2.0, -0.5])
def test_negative_init_bias_is_exactly_dense_at_init_under_max(b0):
    torch.manual_seed(0)
    plain = pf.models.resnet20()
    gated = pf.paamify(copy.deepcopy(plain), init_bias=b0)
    assert all(float(g.b.detach().min()) == b0 == float(g.b.detach().max())
               for g in gated.paam.groups)
    x = torch.randn(4, 3, 32, 32)
    for mode in ("eval", "train"):
        a, b = copy.deepcopy(plain), copy.deepcopy(gated)
        getattr(a, mode)()
        getattr(b, mode)()
        with torch.no_grad():
            ya, yb = a(x), b(x)
        assert torch.equal(ya, yb), mode  # exactly the ungated model
        assert all(bool((g == 1).all()) for g in pf.scores(b).values())
    # and on the exp branch: every filter starts at e = b0 < 0, not on the kink at 0
    ctrl = gated.paam
    assert all(float(g.w.abs().max()) == 0.0 for g in ctrl.groups)


def test_init_bias_under_normalize_none_starts_at_leaky_exp_of_b0():
    model = _tiny(init_bias=-1.0, normalize="none")
    model(torch.randn(2, 3, 8, 8))
    for g in pf.scores(model).values():
        assert torch.allclose(g, torch.full_like(g, math.exp(-1.0)))


def test_default_init_bias_is_minus_two_under_max_and_zero_under_none():
    from paam_fast.train_options import build_parser, resolve

    for normalize, b0 in (("max", -2.0), ("none", 0.0)):
        model = _tiny(normalize=normalize)
        assert all(bool((g.b == b0).all()) for g in model.paam.groups), normalize
        args = resolve(build_parser().parse_args(["--normalize", normalize]))
        assert args.init_bias == b0, normalize
    # an explicit b0 wins over the default, 0 included
    assert all(bool((g.b == 0).all()) for g in _tiny(init_bias=0).paam.groups)
    assert resolve(build_parser().parse_args(["--init-bias", "0"])).init_bias == 0.0
    # and under "none" the default start is exactly dense (leaky_exp(0) = 1)
    model = _tiny(normalize="none")
    model(torch.randn(2, 3, 8, 8))
    assert all(bool((g == 1).all()) for g in pf.scores(model).values())


def test_init_bias_is_checked():
    for bad in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="init_bias"):
            _tiny(init_bias=bad)


def _set_unit_gates(model, values):
    """normalize="none", w = 0: every filter of unit l gets g = exp(b_l) (b_l ≤ 0)."""
    ctrl = model.paam
    with torch.no_grad():
        for grp, idx in zip(ctrl.groups, ctrl.group_units):
            for row, i in enumerate(idx):
                grp.b[row] = math.log(values[ctrl.units[i].width])
    model(torch.randn(2, 3, 8, 8))


def test_penalty_balance_filter_unit_budget_by_hand():
    model = _tiny(normalize="none")
    assert sorted(u.width for u in model.paam.units) == [4, 8]
    g4, g8 = 0.2, 0.6
    _set_unit_gates(model, {4: g4, 8: g8})
    filt = (4 * g4 + 8 * g8) / 12
    unit = (g4 + g8) / 2
    assert float(pf.penalty(model)) == pytest.approx(filt, rel=1e-6)
    assert float(pf.penalty(model, balance="filter")) == pytest.approx(filt, rel=1e-6)
    assert float(pf.penalty(model, balance="unit")) == pytest.approx(unit, rel=1e-6)
    assert float(pf.penalty(model, balance="budget", budget=0.3)) == pytest.approx(
        abs(filt - 0.3), rel=1e-6)
    assert float(pf.penalty(model, balance="budget", budget=0.9)) == pytest.approx(
        abs(filt - 0.9), rel=1e-6)
    # with per-filter costs c_l: unit = Σ c_l ḡ_l / Σ c_l, filter = Σ c_l F_l g_l / Σ c_l F_l
    c = dict(zip([u.width for u in model.paam.units], model.paam.filter_costs("params")))
    assert c[4] > 0 and c[8] > 0
    assert float(pf.penalty(model, "params", balance="unit")) == pytest.approx(
        (c[4] * g4 + c[8] * g8) / (c[4] + c[8]), rel=1e-6)
    assert float(pf.penalty(model, "params")) == pytest.approx(
        (4 * c[4] * g4 + 8 * c[8] * g8) / (4 * c[4] + 8 * c[8]), rel=1e-6)


def test_penalty_balance_unit_counts_alive_filters_only():
    model = _tiny(normalize="none")
    g4, g8 = 0.5, 0.25
    _set_unit_gates(model, {4: g4, 8: g8})
    ctrl = model.paam
    alive = {}
    for u in ctrl.units:
        m = torch.ones(u.width, dtype=torch.bool)
        m[: u.width // 2] = False  # half of each unit dead: 2 and 4 alive
        alive[u.name] = m
    pf.apply_masks(model, alive)
    model(torch.randn(2, 3, 8, 8))
    assert float(pf.penalty(model, balance="unit")) == pytest.approx((g4 + g8) / 2, rel=1e-6)
    assert float(pf.penalty(model)) == pytest.approx((2 * g4 + 4 * g8) / 6, rel=1e-6)


def test_penalty_balance_gradient_and_errors():
    model = _tiny(init_bias=-1.0)
    with torch.no_grad():
        for g in model.paam.groups:
            g.w.normal_()
    for bal in ("unit", "budget"):
        model(torch.randn(2, 3, 8, 8))
        model.zero_grad()
        pf.penalty(model, balance=bal, budget=0.3).backward()
        assert any(float(g.w.grad.abs().sum()) > 0 for g in model.paam.groups), bal
    with pytest.raises(ValueError, match="balance"):
        pf.penalty(model, balance="layer")
    with pytest.raises(ValueError, match="budget"):
        pf.penalty(model, balance="budget")
    with pytest.raises(ValueError, match="keep"):
        pf.penalty(model, balance="budget", budget=1.5)


def test_pruner_passes_the_balance_and_its_budget():
    model = _tiny(normalize="none")
    _set_unit_gates(model, {4: 0.2, 8: 0.6})
    filt = (4 * 0.2 + 8 * 0.6) / 12
    p = pf.Pruner(model, None, epochs=4, lam=2.0, keep=0.5, balance="budget")
    assert float(p.penalty()) == pytest.approx(2.0 * abs(filt - 0.5), rel=1e-6)
    p = pf.Pruner(model, None, epochs=4, lam=2.0, target=0.25, balance="budget")
    assert float(p.penalty()) == pytest.approx(2.0 * abs(filt - 0.25), rel=1e-6)
    p = pf.Pruner(model, None, epochs=4, lam=2.0, balance="unit")
    assert float(p.penalty()) == pytest.approx(2.0 * 0.4, rel=1e-6)
    with pytest.raises(ValueError, match="budget"):
        pf.Pruner(model, None, epochs=4, mass=0.9, balance="budget")
    with pytest.raises(ValueError, match="balance"):
        pf.Pruner(model, None, epochs=4, balance="units")
