"""Every bad input gets a clear error naming what is wrong, and leaves the model as it was."""

import math

import pytest
import torch
from helpers import randomize
from torch import nn

import paam_fast as pf


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v) or (v.is_floating_point() and
                                          torch.equal(now[k].isnan(), v.isnan())), k


def _ready():
    model = pf.paamify(pf.models.get_model("resnet20"))
    randomize(model)
    model(torch.randn(2, 3, 32, 32))
    return model


def test_paamify_twice():
    model = pf.paamify(pf.models.get_model("resnet20"))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already paamified"):
        pf.paamify(model)
    _same(model, snap)


@pytest.mark.parametrize("kw,msg", [({"coupling": "tied"}, "coupling"), ({"dim": 0}, "dim"),
                                    ({"normalize": "sum"}, "normalize"),
                                    ({"leak": -1.0}, "leak")])
def test_paamify_bad_options(kw, msg):
    model = pf.models.get_model("resnet20")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=msg):
        pf.paamify(model, **kw)
    _same(model, snap)
    assert not pf.is_paamified(model)


def test_select_before_any_forward():
    model = pf.paamify(pf.models.get_model("resnet20"))
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="run a forward pass"):
        pf.select(model, keep=0.5)
    _same(model, snap)


@pytest.mark.parametrize("keep", [0, 0.0, -0.5, 1.5, math.nan, "half", True])
def test_keep_out_of_range(keep):
    model = _ready()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="keep must be a fraction in \\(0, 1\\]"):
        pf.select(model, keep=keep)
    _same(model, snap)


def test_keep_below_what_ungated_parameters_need():
    model = _ready()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="parts no selection can remove need"):
        pf.select(model, keep=0.001)
    _same(model, snap)
    with pytest.raises(ValueError, match="min_keep=0.05 .* alone needs"):
        pf.select(model, keep=0.05)
    _same(model, snap)


@pytest.mark.parametrize("mass", [0, 1.01, -1, math.inf])
def test_mass_out_of_range(mass):
    model = _ready()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="mass must be a fraction"):
        pf.select(model, mass=mass)
    _same(model, snap)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scores(bad):
    model = pf.paamify(pf.models.get_model("resnet20"))
    with torch.no_grad():
        model.paam.groups[0].b.fill_(bad)
    model(torch.randn(2, 3, 32, 32))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="non-finite scores"):
        pf.select(model, keep=0.5)
    _same(model, snap)


def test_model_on_meta_device():
    with torch.device("meta"):
        model = pf.models.get_model("resnet20")
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="meta device"):
        pf.paamify(model)
    assert list(model.state_dict()) == keys and not pf.is_paamified(model)


@pytest.mark.parametrize("size", [(1, 3, 7), (1, 4, 32, 32), "32x32", (1, 3, 0, 32)])
def test_count_wrong_input_size(size):
    model = _ready()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="input_size|does not fit"):
        pf.count(model, size)
    _same(model, snap)


def test_untraceable_model_is_refused_by_name():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            if x.sum() > 0:  # control flow on values: fx cannot trace it
                return self.conv(x)
            return self.conv(-x)

    with pytest.raises(TypeError, match="could not trace DataDependent"):
        pf.paamify(DataDependent(), input_size=(1, 3, 8, 8))


def test_unsupported_module_is_listed_not_skipped_silently():
    class Odd(nn.Module):  # a module paam_fast does not know, between two convs
        def forward(self, x):
            return x * 2 + 1

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), Odd(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 2))
    pf.paamify(model, input_size=(1, 3, 16, 16))
    assert [u.name for u in model.paam.units] == ["0", "6"]
    reasons = dict(model.paam.structure.ungated)
    assert "3" in reasons and "mul" in reasons["3"]


def test_model_with_nothing_to_gate():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match="no unit it can gate"):
        pf.paamify(model, input_size=(1, 3, 8, 8))
