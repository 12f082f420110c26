"""Gated modules: where a unit's gate g is applied (PAAM_METHOD.md §4).

A gate before a BN is cancelled by it, so the gate multiplies the BN output by folding into BN's
affine (γ' = g·γ, β' = g·β), or, where no BN ends the unit, into the conv (W' = g·W, b' = g·b).
The folded tensors are fresh each step: the Parameters are never written and no extra pass over
the activations is made.

``GatedBatchNorm2d`` and ``GatedConv2d`` are what :func:`paam_fast.paamify` swaps in at the gate
sites it finds.  ``GatedConv2d`` and ``GatedConvBN2d`` are also drop-in modules for people who
write their own models: they compute exactly what ``nn.Conv2d`` (+ ``nn.BatchNorm2d``) computes
until :func:`paam_fast.paamify` gives them a gate, and they declare where the gate goes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models.resnet_cifar import PadShortcut, gather_channels

__all__ = ["GateBox", "GatedBatchNorm2d", "GatedConv2d", "GatedConvBN2d", "GatedLinear",
           "MaskedPadShortcut"]


class GateBox:
    """Holds one unit's gate for the current forward (a tensor in the autograd graph).

    It is shared by the unit's gate sites.  Copies and pickles come out empty, because a
    non-leaf tensor cannot be deep-copied and the gate of an old forward means nothing to a copy.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __deepcopy__(self, memo) -> GateBox:
        return GateBox()

    def __getstate__(self):
        return None

    def __setstate__(self, state) -> None:
        self.value = None


class _Gated:
    """Mixin: the gate of this site, from the frozen buffer ``paam_gate`` (after compaction)
    or from the unit's GateBox (while the scoring network runs); None means g = 1."""

    _paam_box: GateBox | None = None
    _paam_alive: torch.Tensor | None = None  # (F,) bool, for masked mode's frozen BN stats
    # Compact execution of masked mode: alive output / input channel indices (None: all).
    _paam_out_idx: torch.Tensor | None = None
    _paam_in_idx: torch.Tensor | None = None
    # The namespace of masked_* ops to call (C++ or reference), chosen when the masks change, so
    # the forward does no backend lookup (and torch.compile traces straight through it).
    _paam_ops = None
    # (γ', β') of this BN site for the current forward, folded for all sites at once by the
    # controller (a handful of launches for the whole model instead of two per site).
    _paam_fold: GateBox | None = None

    def current_gate(self) -> torch.Tensor | None:
        frozen = self._buffers.get("paam_gate")
        if frozen is not None:
            return frozen
        box = self._paam_box
        return None if box is None else box.value


class GatedBatchNorm2d(_Gated, nn.BatchNorm2d):
    """BatchNorm2d whose affine is scaled by the unit's gate: y = g·(γ·x̂ + β).

    Input (N, C, H, W) -> output (N, C, H, W); gate (C,).  In masked training the running
    statistics of dead channels (``_paam_alive`` False) are left as they were.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_stats = not self.training or self.track_running_stats
        weight, bias = self.weight, self.bias
        g = self.current_gate()
        fold = None if self._paam_fold is None else self._paam_fold.value
        if fold is not None and "paam_gate" not in self._buffers:
            weight, bias, g = fold[0], fold[1], None  # already g·γ and g·β
        if self._paam_out_idx is not None:  # compact activations: alive channels only
            return self._paam_ops.masked_batch_norm(
                input, weight, bias, self.running_mean if use_stats else None,
                self.running_var if use_stats else None, g, self._paam_out_idx, bn_training,
                factor, self.eps, False)
        if g is not None:
            g = g.to(weight.dtype) if weight is not None else g
            weight = g if weight is None else weight * g
            bias = None if bias is None else bias * g
        alive = self._paam_alive
        mean = self.running_mean if use_stats else None
        var = self.running_var if use_stats else None
        freeze = alive is not None and self.training and mean is not None
        if freeze:
            # Update copies, then take only the alive channels' new statistics: dead channels
            # keep theirs.  (The copies, not the buffers, are what backward may have saved.)
            mean, var = mean.clone(), var.clone()
        out = F.batch_norm(input, mean, var, weight, bias, bn_training, factor, self.eps)
        if freeze:
            with torch.no_grad():
                self.running_mean.copy_(torch.where(alive, mean, self.running_mean))
                self.running_var.copy_(torch.where(alive, var, self.running_var))
        return out


class GatedConv2d(_Gated, nn.Conv2d):
    """Conv2d with the unit's gate folded into its output filters: W' = g·W, b' = g·b.

    Same constructor as ``nn.Conv2d``.  Input (N, C_in, H, W) -> (N, C_out, H', W'); gate
    (C_out,).  Use it where no BatchNorm follows the conv: a BN after it would cancel the gate in
    training (``paamify`` warns).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        g = self.current_gate()
        if self._paam_out_idx is not None or self._paam_in_idx is not None:
            if self.padding_mode != "zeros" or isinstance(self.padding, str):
                raise NotImplementedError("masked compact execution supports zero padding given "
                                          "as integers only")
            if self.groups > 1 and self.weight.shape[1] > 1:
                return self._grouped_compact(input, g)
            return self._paam_ops.masked_conv2d(
                input, self.weight, self.bias, g, self._paam_out_idx, self._paam_in_idx,
                list(self.stride), list(self.padding), list(self.dilation), self.groups, False)
        if g is None:
            return super().forward(input)
        g = g.to(self.weight.dtype)
        bias = None if self.bias is None else self.bias * g
        return self._conv_forward(input, self.weight * g[:, None, None, None], bias)


    def _grouped_compact(self, input: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """Grouped (not depthwise) conv on alive channels, in plain PyTorch: each output row
        reads the alive inputs of its own group (selection keeps as many in every group)."""
        from .surgery import group_gather

        w, b = self.weight, self.bias
        if self._paam_in_idx is not None:
            gather = group_gather(w.shape, self.groups, self._paam_in_idx)
            w = w.gather(1, gather[:, :, None, None].expand(-1, -1, *w.shape[2:]))
        out = self._paam_out_idx
        if out is not None:
            w = w.index_select(0, out)
            b = None if b is None else b.index_select(0, out)
        if g is not None:
            gg = (g if out is None else g.index_select(0, out)).to(w.dtype)
            w = w * gg[:, None, None, None]
            b = None if b is None else b * gg
        return F.conv2d(input, w, b, self.stride, self.padding, self.dilation, self.groups)


class GatedLinear(_Gated, nn.Linear):
    """nn.Linear reading only the alive input features in masked mode's compact execution
    (a classifier after flatten), or writing only the alive rows (a squeeze-excitation's expand
    layer).  Otherwise exactly nn.Linear."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        g = self.current_gate()
        out, inn = self._paam_out_idx, self._paam_in_idx
        if g is None and out is None:
            if inn is None:
                return super().forward(input)
            if input.dim() == 2:
                return self._paam_ops.masked_linear(input, self.weight, self.bias, inn, False)
        # a gated MLP layer (W' = g·W, b' = g·b), alive rows (an SE's expand layer, masked
        # mode) or inputs of an (N, ..., C) tensor: in plain PyTorch
        w, b = self.weight, self.bias
        if out is not None:
            w = w.index_select(0, out)
            b = None if b is None else b.index_select(0, out)
        if inn is not None:
            w = w.index_select(1, inn)
        if g is not None:
            gg = (g if out is None else g.index_select(0, out)).to(w.dtype)
            w = w * gg[:, None]
            b = None if b is None else b * gg
        return F.linear(input, w, b)


class MaskedPadShortcut(_Gated, PadShortcut):
    """The option-A shortcut inside a gated model: it carries no gate (its channels are copies
    of another stage's, with nothing to fold an analog scale into), but a channel its output
    unit dropped is zero on it too (``_paam_alive``), or, in masked mode's compact execution,
    it reads the alive input channels (``_paam_in_idx``) and writes the alive output ones
    (``_paam_out_idx``).  Unpruned and unmasked it is exactly :class:`PadShortcut`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out, inn, alive = self._paam_out_idx, self._paam_in_idx, self._paam_alive
        if out is None and inn is None:
            y = super().forward(input)
            return y if alive is None else y * alive.to(y.dtype)[:, None, None]
        gather = self.channel_map(input.device)
        if out is not None:
            gather = gather[out]
        if inn is not None:  # the input holds the alive channels only
            gather = self.reindex_inputs(gather, inn)
        return gather_channels(input[:, :, ::2, ::2], gather)


class GatedConvBN2d(nn.Module):
    """A conv followed by its BatchNorm, one PAAM unit whose gate folds into the BN.

    Arguments: ``nn.Conv2d``'s (bias defaults to False) followed by ``nn.BatchNorm2d``'s
    (``eps``, ``momentum``, ``affine``, ``track_running_stats``).  Input (N, C_in, H, W) ->
    (N, C_out, H', W').  Children ``conv`` and ``bn`` keep the usual parameter names.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              groups, bias, padding_mode, device=device, dtype=dtype)
        self.bn = GatedBatchNorm2d(out_channels, eps, momentum, affine, track_running_stats,
                                   device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def recast(m: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A module of class ``cls`` sharing ``m``'s Parameters and buffers (so an optimizer's state
    stays valid), without paam_fast's transient attributes or frozen gate.  Used to swap gated
    sites in (``paamify``) and out (``export``)."""
    new = cls.__new__(cls)
    new.__dict__ = {k: v for k, v in m.__dict__.items() if not k.startswith("_paam")}
    for k in ("_parameters", "_buffers", "_modules"):
        new.__dict__[k] = dict(m.__dict__[k])
    new._buffers.pop("paam_gate", None)
    return new
