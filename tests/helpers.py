"""Shared helpers for the tests (no fixtures with hidden state)."""

from __future__ import annotations

import math

import torch
from torch import nn

import paam_fast as pf


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random BN statistics/affine and a random scoring head (so gates are not all 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
        if pf.is_paamified(model):
            for g in model.paam.groups:
                # e = H·w + b of order 1: spread gates, not a few exp(-10) outliers
                g.w.copy_((torch.randn(g.w.shape, generator=gen) / g.w.shape[-1] ** 0.5)
                          .to(g.w.dtype))
                g.b.copy_((torch.randn(g.b.shape, generator=gen) * 0.3).to(g.b.dtype))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def hand_count(model: nn.Module, input_size) -> dict[str, int]:
    """Params from the tensors; MACs from each conv/linear's own shapes on a traced forward."""
    params = sum(p.numel() for p in model.parameters())
    shapes = {}

    def hook(name):
        def f(m, i, o):
            shapes.setdefault(name, []).append(tuple(o.shape))
        return f

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
          if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.randn(input_size))
    for h in hs:
        h.remove()
    macs = 0
    mods = dict(model.named_modules())
    for n, outs in shapes.items():
        m = mods[n]
        for o in outs:
            if isinstance(m, nn.Conv2d):
                kh, kw = m.weight.shape[2:]
                macs += o[0] * o[2] * o[3] * m.weight.shape[0] * m.weight.shape[1] * kh * kw
            else:  # (N, ..., F): a token / channels-last MLP layer runs at every position
                macs += math.prod(o[:-1]) * m.weight.shape[0] * m.weight.shape[1]
    return {"params": params, "flops": macs}


def max_filter_cost(model: nn.Module, per_group: bool = False) -> int:
    """The largest parameter cost of one selection step of any unit, at dense widths: one
    filter, or with ``per_group`` one filter per group for a unit a grouped conv reads or
    writes (such a unit is selected in equal steps across its groups)."""
    ctrl = model.paam
    w = ctrl.structure.widths()
    best = 0
    for u in ctrl.units:
        cs = ctrl.structure.costs_touching(u.id)
        w2 = dict(w)
        w2[u.id] -= u.groups if per_group else 1
        best = max(best, sum(c.params(w) for c in cs) - sum(c.params(w2) for c in cs))
    return best
