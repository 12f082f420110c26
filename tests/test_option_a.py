"""The CIFAR ResNets' option-A shortcut under coupling="grouped": the residual stages are units.

The shortcut (subsample, zero-pad channels) reads one stage's channels and writes the next
stage's: each side is pruned on its own (a pair goes when either side drops it), and a dropped
channel of the wider stage is zeroed on the shortcut too by the unit's mask, so the masked, the
compacted, the exported and the reloaded network compute the same thing.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize, rel

import paam_fast as pf
from paam_fast.graph import analyse
from paam_fast.models import PadShortcut, resnet20


def test_pad_shortcut_keeps_pairs_when_either_side_is_sliced():
    m = PadShortcut(2, in_channels=3)  # 3 -> 7 channels: input c lands at c + 2
    x = torch.randn(2, 3, 4, 4)
    dense = m(x)
    assert dense.shape == (2, 7, 2, 2) and torch.equal(dense[:, 2:5], x[:, :, ::2, ::2])
    m.keep_in(torch.tensor([0, 2]))  # input channel 1 gone: output 3 reads zero
    m.keep_out(torch.tensor([1, 2, 3, 4]))  # outputs 0, 5, 6 gone
    y = m(x[:, [0, 2]])
    want = dense[:, [1, 2, 3, 4]].clone()
    want[:, 2] = 0
    assert y.shape == (2, 4, 2, 2) and torch.equal(y, want)
    assert m.in_channels == 2 and m.out_channels == 4


def test_grouped_gates_the_residual_stages_of_the_cifar_resnets():
    s = analyse(resnet20(), (1, 3, 32, 32), "grouped")
    internal = analyse(resnet20(), (1, 3, 32, 32), "internal")
    stages = [u for u in s.units if u.has_add]
    assert [u.width for u in stages] == [16, 32, 64]
    assert stages[0].producers == ["conv1", "layer1.0.conv2", "layer1.1.conv2",
                                   "layer1.2.conv2"]
    assert ("layer2.0.shortcut", 1) in stages[0].consumers
    assert stages[1].shifts == ["layer2.0.shortcut"] and stages[2].shifts == ["layer3.0.shortcut"]
    assert "layer2.0.shortcut" not in stages[1].sites  # masked, not gated (no analog scale)
    assert len(s.units) == len(internal.units) + 3 and not s.warnings
    assert all(not u.shifts for u in internal.units)  # internal coupling: as before


def _stage_masks(model):
    """Masks that cut every stage, covering each case of the shortcut: a stage-1 channel gone
    whose stage-2 target stays (5 -> 13), a stage-2 channel gone whose stage-1 source stays
    (2 -> 10), a zero-padded stage-2 channel gone (2, 40)."""
    ctrl = model.paam
    drop = {16: [0, 5, 9], 32: [2, 10, 20, 31], 64: [2, 40, 63]}
    for i, u in enumerate(ctrl.units):
        if u.has_add:
            m = torch.ones(u.width, dtype=torch.bool)
            m[drop[u.width]] = False
            ctrl._buffers[f"mask_{i}"] = m
    ctrl.masks_changed()


@pytest.mark.parametrize("masked_compute", ["compact", "dense"])
def test_masked_equals_compacted_exported_and_reloaded(tmp_path, masked_compute):
    torch.manual_seed(0)
    model = pf.paamify(resnet20(), coupling="grouped").double()
    randomize(model)
    model.paam.masked_compute = masked_compute
    opt = torch.optim.SGD(pf.param_groups(model), lr=0.05, momentum=0.9)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    F.cross_entropy(model(x), torch.tensor([1, 2, 3, 4])).backward()
    opt.step()
    model(x)
    pf.select(model, keep=0.6)
    _stage_masks(model)
    model.train()
    y_train = copy.deepcopy(model)(x)  # masked training forward (BN batch statistics)
    model.eval()
    y = model(x)
    exported = pf.export(model).double().eval()
    assert rel(exported(x), y) <= 1e-10
    pf.save(exported, tmp_path / "m.paam")
    again = pf.load(tmp_path / "m.paam", resnet20).eval()  # float32 weights
    assert rel(again.double()(x), y) <= 1e-5
    widths = pf.compact(model, opt)
    assert widths["conv1"] == 13 and widths["layer2.0.conv2"] == 28
    assert model.get_submodule("layer2.0.shortcut").out_channels == 28
    assert rel(model(x), y) <= 1e-10
    model.train()
    torch.manual_seed(0)
    assert rel(model(x), y_train) <= 1e-10
    F.cross_entropy(model(x), torch.tensor([1, 2, 3, 4])).backward()
    opt.step()  # training goes on with the same optimizer
