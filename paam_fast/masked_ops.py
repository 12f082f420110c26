"""Mask-aware compacted conv / BN / linear: the pure-PyTorch references of the C++ ops in
``csrc/masked_ops.cpp`` (same signatures, same semantics).

Full-size parameters, compact activations: the parameters are gathered to the alive channels,
the activations are never gathered, and autograd scatters the parameters' gradients back into
full-size tensors with exact zeros at the dead entries.  Used by ``after_select="masked"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_conv2d", "masked_batch_norm", "masked_linear", "check_index"]


def check_index(idx: torch.Tensor, size: int, arg: str, param: torch.Tensor) -> None:
    """The checks of the C++ op, in Python (ValueError instead of RuntimeError)."""
    if idx.dim() != 1 or idx.dtype != torch.long:
        raise ValueError(f"{arg} must be a 1-D int64 index tensor")
    if idx.device != param.device:
        raise ValueError(f"{arg} is on {idx.device} but the parameters are on {param.device}")
    if idx.numel() == 0:
        raise ValueError(f"{arg} is empty: a unit keeps at least one alive channel")
    c = idx.cpu()
    if int(c[0]) < 0 or int(c[-1]) >= size:
        raise ValueError(f"{arg} holds indices outside [0, {size})")
    if c.numel() > 1 and not bool((c[1:] > c[:-1]).all()):
        raise ValueError(f"{arg} must be sorted ascending without duplicates")


def masked_conv2d(x, weight, bias, gate, out_idx, in_idx, stride, padding, dilation, groups,
                  check=True):
    """conv2d(x, (g·W)[out_idx][:, in_idx], (g·b)[out_idx]); x (N, C_alive_in, H, W)."""
    depthwise = groups > 1 and groups == weight.shape[0] and weight.shape[1] == 1
    w, g_eff = weight, groups
    if out_idx is not None:
        if check:
            check_index(out_idx, weight.shape[0], "out_idx", weight)
        w = w.index_select(0, out_idx)
        if depthwise:
            g_eff = out_idx.numel()
    if in_idx is not None:
        if check:
            check_index(in_idx, weight.shape[1], "in_idx", weight)
        w = w.index_select(1, in_idx)
    b = None if bias is None else (bias if out_idx is None else bias.index_select(0, out_idx))
    if gate is not None:
        g = (gate if out_idx is None else gate.index_select(0, out_idx)).to(w.dtype)
        w = w * g[:, None, None, None]
        b = None if b is None else b * g
    return F.conv2d(x, w, b, stride, padding, dilation, g_eff)


def masked_batch_norm(x, weight, bias, running_mean, running_var, gate, idx, training, momentum,
                      eps, check=True):
    """Batch norm of the compact channels ``idx``; dead channels' running statistics untouched."""
    def pick(t):
        return None if t is None else (t if idx is None else t.index_select(0, idx))

    if idx is not None and check:
        ref = weight if weight is not None else running_mean
        check_index(idx, ref.shape[0], "idx", ref)
    w, b = pick(weight), pick(bias)
    if gate is not None:
        g = pick(gate).to(x.dtype)
        w = g if w is None else w * g
        b = None if b is None else b * g
    rm, rv = pick(running_mean), pick(running_var)
    y = F.batch_norm(x, rm, rv, w, b, training or running_mean is None, momentum, eps)
    if training and running_mean is not None and idx is not None:
        with torch.no_grad():
            running_mean.index_copy_(0, idx, rm)
            running_var.index_copy_(0, idx, rv)
    return y


def masked_linear(x, weight, bias, in_idx, check=True):
    """linear(x, W[:, in_idx], b); x (N, len(in_idx))."""
    if in_idx is not None:
        if check:
            check_index(in_idx, weight.shape[1], "in_idx", weight)
        weight = weight.index_select(1, in_idx)
    return F.linear(x, weight, bias)
