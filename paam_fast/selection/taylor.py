"""The Taylor key's values: each filter's first-order effect on the loss (PAAM_METHOD.md §6.2,
one of the candidate keys comparable across units).

For a filter f of a gated unit, with gate g_f multiplying its feature map,
``|g_f · ∂L/∂g_f|`` is the first-order change of the task loss L when the filter is removed
(g_f → 0; Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019,
at the channel's gate).  It is in loss units, so it compares across units whatever each unit's
gates look like (under ``normalize="max"`` g is relative to its unit's top filter; g·∂L/∂g is
not changed by rescaling g against γ).  Averaged over a few training batches; the penalty is not
part of L (it is what the selection replaces, not what it should preserve).

The pass runs the network in training mode on training batches and leaves the model exactly as
it found it: BN running statistics, parameters' gradients, training mode and the last forward's
gates are restored (the selection that follows reads them).  It runs the reference scoring path
(the fused Triton kernels do not keep the gates in the autograd graph as separate tensors).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F


@contextlib.contextmanager
def _reference_scoring():
    old = os.environ.get("PAAM_FAST_BACKEND")
    os.environ["PAAM_FAST_BACKEND"] = "reference"
    try:
        yield
    finally:
        if old is None:
            del os.environ["PAAM_FAST_BACKEND"]
        else:
            os.environ["PAAM_FAST_BACKEND"] = old


def _bn_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


def taylor_importance(model: nn.Module, batches: Iterable, loss_fn: Callable | None = None,
                      channels_last: bool = False) -> list[torch.Tensor]:
    """Per gated unit, an (F,) fp32 tensor: mean over ``batches`` of ``|g · ∂L/∂g|`` per filter
    (dead filters 0).

    Args:
        model: a paamified model before compaction, with attention scores (not frozen).
        batches: (inputs, targets) pairs, e.g. the first few batches of the training loader;
            moved to the model's device.
        loss_fn: the task loss of (outputs, targets); default cross-entropy.
        channels_last: convert inputs to channels_last (as the training does).
    """
    from ..paamify import controller

    ctrl = controller(model)
    if ctrl.frozen:
        raise ValueError("the Taylor key needs live gates: the model's gates are frozen "
                         "(compacted or frozen)")
    if ctrl.scorer != "attention":
        raise ValueError(f"the Taylor key needs PAAM's gates; this model's scorer is "
                         f"{ctrl.scorer!r}")
    loss_fn = loss_fn or F.cross_entropy
    dev = next(model.parameters()).device
    params = list(model.parameters())
    grads = [p.grad for p in params]
    bufs = _bn_buffers(model)
    last = ctrl._last.value
    was_training = model.training
    acc = [torch.zeros(u.width, dtype=torch.float64, device=dev) for u in ctrl.units]
    n = 0
    try:
        model.train()
        with _reference_scoring():
            for x, y in batches:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for p in params:
                    p.grad = None
                out = model(x)
                gates = ctrl._last.value
                for g in gates:
                    g.retain_grad()
                loss_fn(out, y).backward()
                for g, idx in zip(gates, ctrl.group_units):
                    if g.grad is None:
                        raise RuntimeError("the loss does not depend on the gates: no Taylor "
                                           "importance (is the model's output gated?)")
                    contrib = (g.detach() * g.grad).double().abs()
                    for row, i in enumerate(idx):
                        acc[i] += contrib[row] * ctrl.mask(i).to(torch.float64)
                n += 1
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in bufs:
                b.copy_(saved)
        ctrl._last.value = last
        model.train(was_training)
    if n == 0:
        raise ValueError("the Taylor key needs at least one batch")
    return [(a / n).float() for a in acc]
