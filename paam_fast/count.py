"""Parameters and FLOPs counted on the real tensors (PAAM_METHOD.md §6.4).

FLOPs are multiply-accumulates of conv and linear layers at the given input size, the
convention of the pruning literature.  The scoring networks (``model.paam``) are not counted:
they leave the model at compaction.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["count"]


def _check_size(input_size) -> tuple[int, ...]:
    if not isinstance(input_size, (tuple, list)) or len(input_size) < 2 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_size):
        raise ValueError(f"input_size must be a tuple of positive ints like (1, 3, 32, 32), "
                         f"got {input_size!r}")
    return tuple(input_size)


def count(model: nn.Module, input_size=(1, 3, 224, 224)) -> dict[str, int]:
    """{"params": int, "flops": int} of ``model``; FLOPs (MACs) for one input of ``input_size``
    (N, C, H, W), the whole batch N included."""
    input_size = _check_size(input_size)
    ctrl = getattr(model, "paam", None)
    skip = {id(p) for p in ctrl.parameters()} if isinstance(ctrl, nn.Module) else set()
    params = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    macs = 0

    def conv_hook(m: nn.Conv2d, inp, out) -> None:
        nonlocal macs
        macs += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear_hook(m: nn.Linear, inp, out) -> None:
        nonlocal macs
        macs += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear) and not any(id(p) in skip for p in m.parameters()):
            handles.append(m.register_forward_hook(linear_hook))
    p = next(model.parameters())
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_size, dtype=p.dtype, device=p.device))
    except RuntimeError as e:
        raise ValueError(f"count: an input of size {input_size} does not fit the model: "
                         f"{str(e).splitlines()[0]}") from e
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return {"params": int(params), "flops": int(macs)}
