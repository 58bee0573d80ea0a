"""Classifier registry: build a model from a small config, with BatchNorm or GroupNorm.

* ``resnet18-cifar``: torchvision's ResNet-18 with the CIFAR-style stem the
  method uses at 28 px (3x3 conv, stride 1, no max pool);
* ``resnet18``: torchvision's ResNet-18 as is (224 px), input channels adapted;
* ``small-cnn``: a small, fast CNN for CPU presets and tests;
* ``scatternet``: a fixed wavelet scattering front end (kymatio, J=2, L=8, not
  part of the state) and a small CNN head, for small DP sites (Tramer & Boneh
  2021); its scattering normalisation is GroupNorm whatever ``norm`` says.

DP training replaces BatchNorm with GroupNorm through Opacus's own
``ModuleValidator.fix`` (validate, then fix, before DP), so the architecture
name stays the same and the norm is recorded separately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from functools import cache
from typing import Any

import torch
from torch import nn

from .scatternet import ScatterNet

__all__ = ["ClassifierConfig", "ARCHITECTURES", "build_classifier", "has_batchnorm"]


@dataclass(frozen=True)
class ClassifierConfig:
    architecture: str = "small-cnn"
    in_channels: int = 1
    num_classes: int = 2
    norm: str = "batch"          # "batch" | "group" (what Opacus's fix produces)


def _group_norm(channels: int) -> nn.GroupNorm:
    # Opacus's fix uses min(32, channels) groups; keep the same so both paths agree.
    return nn.GroupNorm(min(32, channels), channels)


def _norm(kind: str) -> Callable[[int], nn.Module]:
    return nn.BatchNorm2d if kind == "batch" else _group_norm


@cache
def _basic_block() -> type:
    """torchvision's BasicBlock with an out-of-place residual add.

    ``out += identity`` modifies in place the output of a layer whose backward
    Opacus hooks, which autograd refuses under DP; the arithmetic is the same.
    Defined on first use: torchvision (and through it torch._dynamo and SymPy)
    is imported only when a ResNet is built.  It is reachable as the module
    attribute ``_BasicBlock`` (module ``__getattr__``), so models that hold it
    pickle as torch.save and Opacus's copies need.
    """
    from torchvision.models.resnet import BasicBlock

    class _BasicBlock(BasicBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    _BasicBlock.__module__, _BasicBlock.__qualname__ = __name__, "_BasicBlock"
    return _BasicBlock


def __getattr__(name: str) -> Any:
    if name == "_BasicBlock":
        return _basic_block()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resnet18(num_classes: int, norm_layer: Callable[[int], nn.Module]) -> Any:
    """torchvision's ResNet-18 layout ([2, 2, 2, 2] basic blocks), built from the block above."""
    from torchvision.models.resnet import ResNet

    return ResNet(_basic_block(), [2, 2, 2, 2], num_classes=num_classes, norm_layer=norm_layer)


def _resnet18_cifar(cfg: ClassifierConfig) -> nn.Module:
    model = resnet18(num_classes=cfg.num_classes, norm_layer=_norm(cfg.norm))
    model.conv1 = nn.Conv2d(cfg.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _resnet18(cfg: ClassifierConfig) -> nn.Module:
    model = resnet18(num_classes=cfg.num_classes, norm_layer=_norm(cfg.norm))
    model.conv1 = nn.Conv2d(cfg.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


class SmallCNN(nn.Module):
    """conv-norm-relu-pool x 3, global average pool, linear: about 100k parameters."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        norm = _norm(cfg.norm)
        widths = (cfg.in_channels, 32, 64, 128)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm(c_out), nn.ReLU(inplace=False), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 128, H/8, W/8)
        return self.head(x.mean(dim=(2, 3)))  # (N, 128) -> (N, classes)


ARCHITECTURES: dict[str, Callable[[ClassifierConfig], nn.Module]] = {
    "resnet18-cifar": _resnet18_cifar,
    "resnet18": _resnet18,
    "small-cnn": SmallCNN,
    "scatternet": ScatterNet,
}


def build_classifier(cfg: ClassifierConfig) -> nn.Module:
    """A freshly initialised classifier.  Raises ``ValueError`` for unknown names (configs are validated earlier)."""
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.architecture!r}; known: {sorted(ARCHITECTURES)}")
    if cfg.norm not in ("batch", "group"):
        raise ValueError("norm must be 'batch' or 'group'")
    model = ARCHITECTURES[cfg.architecture](cfg)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            # torchvision's in-place ReLU modifies the views Opacus's backward hooks return (a RuntimeError under DP).
            module.inplace = False
    return model


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
