"""Models: the CIFAR ResNets, and torchvision's classifiers by name (randomly initialised)."""

from __future__ import annotations

from torch import nn

from .resnet_cifar import (
    CifarResNet,
    PadShortcut,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)

__all__ = ["CifarResNet", "PadShortcut", "resnet20", "resnet32", "resnet44", "resnet56",
           "resnet110", "get_model", "CIFAR_ARCHS", "TORCHVISION_ARCHS"]

CIFAR_ARCHS = {"resnet20": resnet20, "resnet32": resnet32, "resnet44": resnet44,
               "resnet56": resnet56, "resnet110": resnet110}
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg13_bn", "vgg16_bn",
                     "vgg19_bn", "mobilenet_v2")


def get_model(name: str, num_classes: int = 10) -> nn.Module:
    """A fresh model by name: CIFAR ResNets (32×32 inputs), a torchvision classifier, or
    ``"timm:<name>"`` for any timm model (``pip install paam_fast[timm]``); never pretrained
    weights (nothing is downloaded), ``input_size`` (1, 3, 224, 224) for the latter two."""
    if name in CIFAR_ARCHS:
        return CIFAR_ARCHS[name](num_classes)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as e:
            raise ValueError(f"arch {name!r} needs timm: pip install 'paam_fast[timm]'") from e
        arch = name[len("timm:"):]
        if arch not in timm.list_models():
            raise ValueError(f"timm has no model {arch!r} (timm.list_models() lists them)")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    import torchvision

    # the named ones are what the CLI lists; any other torchvision classifier works too
    if name in TORCHVISION_ARCHS or name in torchvision.models.list_models(
            module=torchvision.models):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise ValueError(f"unknown arch {name!r}; choose from {sorted(CIFAR_ARCHS)}, "
                     f"{list(TORCHVISION_ARCHS)} (or any torchvision classifier) or 'timm:<name>'")
