"""Physical removal of channels (PAAM_METHOD.md §6.3 "compact"): conv rows, BN entries,
depthwise filters, the consumers' input channels and the classifier's features through flatten,
with an optimizer's state sliced in place.

Each sliced parameter becomes a new Parameter object that takes the old one's place in the
module and in the optimizer's param groups, so the same optimizer object goes on; every state
tensor shaped like the parameter (SGD momentum, Adam's moments, ...) is sliced with it and
per-parameter scalars (Adam's ``step``) are kept.  References a user holds to the old Parameter
objects are stale after a compaction (as with any re-wrap, e.g. DDP).
"""

from __future__ import annotations

import torch
from torch import nn

from .models.resnet_cifar import PadShortcut

__all__ = ["slice_param", "slice_buffer", "slice_space", "slice_cats", "group_gather"]


def slice_param(m: nn.Module, name: str, dim: int, idx: torch.Tensor,
                optimizer: torch.optim.Optimizer | None = None) -> None:
    """Keep entries ``idx`` (sorted LongTensor) of parameter ``m.<name>`` along ``dim``.

    The parameter is replaced by a new Parameter object (a fresh autograd leaf: resizing the old
    one in place would leave autograd's cached shape of it stale while any graph that used it is
    alive), and the optimizer is pointed at the new one, its state sliced along.
    """
    idx = idx.to(m._parameters[name].device)
    _take_param(m, name, lambda t: t.index_select(dim, idx), optimizer)


def _take_param(m: nn.Module, name: str, take, optimizer) -> None:
    """Replace ``m.<name>`` by ``take(it)``; the gradient and every optimizer state tensor
    shaped like it go through the same ``take``."""
    p = m._parameters[name]
    if _channels_last(p):  # keep the layout: a compacted model must not fall back to NCHW
        inner = take
        take = lambda t: inner(t).contiguous(memory_format=torch.channels_last)  # noqa: E731
    new = nn.Parameter(take(p.detach()).clone(), requires_grad=p.requires_grad)
    if p.grad is not None:
        new.grad = take(p.grad).clone()
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new if q is p else q for q in group["params"]]
        state = optimizer.state.pop(p, None)
        if state is not None:
            optimizer.state[new] = {
                k: take(v).clone() if torch.is_tensor(v) and v.shape == p.shape
                else v for k, v in state.items()}
    m._parameters[name] = new


def _channels_last(t: torch.Tensor) -> bool:
    """A 4-d tensor stored channels_last (and not also plain contiguous, as 1×1 shapes are)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous()


def group_gather(weight_shape, groups: int, idx: torch.Tensor) -> torch.Tensor:
    """For a grouped conv of weight (C_out, C_in/G, kh, kw): the (C_out, k) positions inside
    each row's group of the kept input channels ``idx`` (sorted, k per group)."""
    cin_g = weight_shape[1]
    pos = (idx % cin_g).view(groups, -1)
    return pos.repeat_interleave(weight_shape[0] // groups, 0)


def slice_buffer(m: nn.Module, name: str, dim: int, idx: torch.Tensor) -> None:
    buf = m._buffers.get(name)
    if buf is not None:
        m._buffers[name] = buf.index_select(dim, idx.to(buf.device)).clone()


def _forget(m: nn.Module, *names: str) -> None:
    """Drop masked mode's per-module index attributes: the channels are gone now."""
    for n in names:
        m.__dict__.pop(n, None)


def _slice_out(m: nn.Module, idx: torch.Tensor, optimizer) -> None:
    """Keep output channels ``idx`` of a conv, depthwise conv or BN."""
    n = int(idx.numel())
    if isinstance(m, nn.Conv2d):
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        slice_param(m, "weight", 0, idx, optimizer)
        if m.bias is not None:
            slice_param(m, "bias", 0, idx, optimizer)
        m.out_channels = n
        if depthwise:
            m.in_channels = m.groups = n
    elif isinstance(m, nn.BatchNorm2d):
        for name in ("weight", "bias"):
            if m._parameters.get(name) is not None:
                slice_param(m, name, 0, idx, optimizer)
        slice_buffer(m, "running_mean", 0, idx)
        slice_buffer(m, "running_var", 0, idx)
        m.num_features = n
    elif isinstance(m, nn.Linear):  # a squeeze-excitation's expand layer
        slice_param(m, "weight", 0, idx, optimizer)
        if m.bias is not None:
            slice_param(m, "bias", 0, idx, optimizer)
        m.out_features = n
    elif isinstance(m, PadShortcut):  # the option-A shortcut: pairs whose output goes
        m.keep_out(idx)
    else:
        raise TypeError(f"cannot slice the output channels of {type(m).__name__}")
    slice_buffer(m, "paam_gate", 0, idx)
    _forget(m, "_paam_alive", "_paam_out_idx")


def _slice_in(m: nn.Module, idx: torch.Tensor, block: int, optimizer) -> None:
    """Keep input channels ``idx`` of a conv, or their ``block`` features each of a Linear."""
    if isinstance(m, nn.Conv2d) and m.groups > 1:
        # grouped conv: each output row reads the kept channels of its own group
        w = m.weight
        gather = group_gather(w.shape, m.groups, idx.to(w.device))
        full = gather[:, :, None, None].expand(-1, -1, *w.shape[2:])
        _take_param(m, "weight", lambda t: t.gather(1, full), optimizer)
        m.in_channels = int(idx.numel())
        _forget(m, "_paam_in_idx")
    elif isinstance(m, nn.Conv2d):
        slice_param(m, "weight", 1, idx, optimizer)
        m.in_channels = int(idx.numel())
        _forget(m, "_paam_in_idx")
    elif isinstance(m, PadShortcut):  # pairs whose input goes: those outputs are zero now
        m.keep_in(idx)
        _forget(m, "_paam_in_idx")
    elif isinstance(m, nn.Linear):
        feat = (idx[:, None] * block + torch.arange(block, device=idx.device)).flatten()
        slice_param(m, "weight", 1, feat, optimizer)
        m.in_features = int(feat.numel())
        _forget(m, "_paam_in_idx")
    else:
        raise TypeError(f"cannot slice the input channels of {type(m).__name__}")


def slice_space(mods: dict[str, nn.Module], producers: list[str], channelwise: list[str],
                consumers: list[tuple[str, int]], idx: torch.Tensor,
                optimizer: torch.optim.Optimizer | None = None) -> None:
    """Remove every channel of one space but ``idx`` from all the modules that carry it.

    Args:
        mods: name -> module of the model.
        producers / channelwise: modules whose output channels are the space (dim 0 sliced).
        consumers: (name, block) of convs (block 1) and Linear layers reading the space (dim 1).
        idx: kept channel indices, sorted, 1-D LongTensor, at least one.
    """
    if idx.numel() == 0:
        raise ValueError("cannot remove every channel of a unit")
    for name in list(producers) + list(channelwise):
        _slice_out(mods[name], idx, optimizer)
    for name, block in consumers:
        _slice_in(mods[name], idx, block, optimizer)


def slice_cats(mods: dict[str, nn.Module], cats, kept: dict[int, torch.Tensor],
               optimizer: torch.optim.Optimizer | None = None) -> None:
    """Slice the consumers of every concatenation (``graph.Cat``) one of whose segments lost
    channels: ``kept`` maps a pruned space id to its kept dense indices (sorted)."""
    for cat in cats:
        if not any(sid in kept for sid, _ in cat.segments):
            continue
        idx = cat.index(kept)
        for name, block in cat.consumers:
            _slice_in(mods[name], idx, block, optimizer)
