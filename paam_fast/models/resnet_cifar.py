"""CIFAR ResNets of He et al. 2016 (§4.2): 6n+2 layers, 16/32/64 filters, option-A shortcuts
(identity, with stride-2 subsampling and zero-padded channels where the shape changes), so the
parameter counts match the literature: resnet20 0.27M, resnet32 0.46M, resnet44 0.66M,
resnet56 0.85M, resnet110 1.7M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "PadShortcut", "resnet20", "resnet32", "resnet44", "resnet56",
           "resnet110"]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``pad`` channels on each side.
    (N, C, H, W) -> (N, C + 2·pad, ⌈H/2⌉, ⌈W/2⌉). Parameter-free.

    Pruning removes channels on either side on its own (paam_fast's grouped coupling: the
    narrower stage's channels and the wider stage's are two units): :meth:`keep_in` and
    :meth:`keep_out` then record which input channel each output channel copies (``gather``, a
    buffer outside the state_dict, rebuilt from a saved plan); that needs ``in_channels``.
    """

    def __init__(self, pad: int, in_channels: int | None = None) -> None:
        super().__init__()
        self.pad = pad
        self.in_channels = in_channels
        # output channel d copies input channel gather[d]; gather[d] == in_channels: zero
        self.register_buffer("gather", None, persistent=False)

    @property
    def out_channels(self) -> int | None:
        if self.gather is not None:
            return int(self.gather.numel())
        return None if self.in_channels is None else self.in_channels + 2 * self.pad

    def channel_map(self, device=None) -> torch.Tensor:
        """``gather``: for each output channel, the input channel it copies (in_channels for a
        zero channel)."""
        if self.gather is not None:
            return self.gather if device is None else self.gather.to(device)
        if self.in_channels is None:
            raise ValueError("a PadShortcut without in_channels cannot be pruned")
        c, p = self.in_channels, self.pad
        dense = torch.cat([torch.full((p,), c), torch.arange(c), torch.full((p,), c)])
        return dense if device is None else dense.to(device)

    def reindex_inputs(self, gather: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``gather`` (input channels of this shortcut) for an input holding only channels
        ``idx`` (sorted): positions in it, and len(idx) (zero) for a channel not there."""
        n = int(idx.numel())
        pos = torch.full((self.in_channels + 1,), n, dtype=torch.long, device=idx.device)
        pos[idx] = torch.arange(n, device=idx.device)
        return pos[gather]

    def keep_in(self, idx: torch.Tensor) -> None:
        """Keep input channels ``idx`` (sorted): an output that copied a removed one is zero."""
        self.gather = self.reindex_inputs(self.channel_map(idx.device), idx)
        self.in_channels = int(idx.numel())

    def keep_out(self, idx: torch.Tensor) -> None:
        """Keep output channels ``idx`` (sorted)."""
        self.gather = self.channel_map(idx.device)[idx]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        if self.gather is None:
            return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))
        return gather_channels(x, self.gather)


def gather_channels(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """Output channel d = x's channel gather[d], or zero where gather[d] == x.shape[1] (a gather
    from x and one zero channel: Concat + Gather in ONNX)."""
    zero = x.new_zeros(x.shape[0], 1, *x.shape[2:])
    y = torch.cat([x, zero], 1).index_select(1, gather)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)  # keep the layout of the add
    return y


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = PadShortcut((cout - cin) // 2, cin) if stride != 1 or cin != cout \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs. Input (N, 3, 32, 32) -> logits (N, num_classes)."""

    input_size = (1, 3, 32, 32)

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, num_classes)
