"""paam_fast.nn's drop-in modules in a user's own model."""

import pytest
import torch
from helpers import randomize, rel
from torch import nn

import paam_fast as pf


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = pf.nn.GatedConvBN2d(3, 16, 3, padding=1)
        self.b = pf.nn.GatedConvBN2d(16, 24, 3, stride=2, padding=1)
        self.c = pf.nn.GatedConv2d(24, 32, 1, bias=True)  # no BN after: gate in the weights
        self.head = nn.Linear(32 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = torch.relu(self.c(x))
        x = nn.functional.adaptive_avg_pool2d(x, 2)
        return self.head(torch.flatten(x, 1))


def test_dropins_compute_plain_conv_bn_until_paamified():
    net = UserNet()
    conv, bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
    conv.load_state_dict(net.a.conv.state_dict())
    bn.load_state_dict(net.a.bn.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(net.a(x), bn(conv(x)))


def test_dropin_units_prune_and_export():
    net = pf.paamify(UserNet(), input_size=(1, 3, 16, 16))
    units = {u.name: u.sites for u in net.paam.units}
    assert units == {"a.conv": ["a.bn"], "b.conv": ["b.bn"], "c": ["c"]}
    randomize(net)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    net(x)
    pf.select(net, keep=0.5)
    y = net(x)
    plain = pf.export(net)
    assert rel(plain(x), y) <= 1e-5
    assert type(plain.c) is nn.Conv2d and type(plain.a) is nn.Sequential
    assert plain.head.in_features == plain.c.out_channels * 4


def test_gated_conv_feeding_batchnorm_is_warned():
    net = nn.Sequential(pf.nn.GatedConv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="feeds a BatchNorm, which cancels its gate"):
        pf.paamify(net, input_size=(1, 3, 12, 12))


def test_sequential_model_runs_after_paamify():
    # the controller is a child module: Sequential must pass through it unchanged
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(2, 3, 10, 10)
    y = net(x)
    pf.paamify(net, input_size=(1, 3, 10, 10))
    assert torch.equal(net(x), y)
