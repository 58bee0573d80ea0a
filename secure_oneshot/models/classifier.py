"""Classifier registry: build a model from a small config, with BatchNorm or GroupNorm.

* ``resnet18-cifar``: torchvision's ResNet-18 with the CIFAR-style stem the
  method uses at 28 px (3x3 conv, stride 1, no max pool);
* ``resnet18``: torchvision's ResNet-18 as is (224 px), input channels adapted;
* ``resnet34-cifar`` / ``resnet34``: the same for torchvision's ResNet-34 ([3, 4, 6, 3] blocks);
* ``vgg11-bn``: torchvision's ``vgg11_bn`` feature layers (configuration "A" with
  BatchNorm, input channels adapted) without the last max pool, so 28 px inputs
  keep a 1x1 map, then a global average pool and one linear layer instead of
  the 4096-wide ImageNet head (the usual small-input VGG);
* ``wrn-16-2``: Wide ResNet 16-2 (Zagoruyko & Komodakis 2016; pre-activation
  blocks, widths 16/32/64/128, two blocks per group), about 0.7M parameters;
* ``small-cnn``: a small, fast CNN for CPU presets and tests;
* ``scatternet``: a fixed wavelet scattering front end (kymatio, J=2, L=8, not
  part of the state) and a small CNN head, for small DP sites (Tramer & Boneh
  2021); its scattering normalisation is GroupNorm whatever ``norm`` says.

DP training replaces BatchNorm with GroupNorm through Opacus's own
``ModuleValidator.fix`` (validate, then fix, before DP), so the architecture
name stays the same and the norm is recorded separately.  ``norm="group-ws"``
is GroupNorm with weight-standardised convolutions (Qiao et al. 2019; the
normalisation of De et al. 2022's DP Wide ResNets): every ``nn.Conv2d``
becomes a :class:`StandardizedConv2d`, which stores the same raw weight
(same state-dict names and shapes) and standardises it per output channel
in its forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from functools import cache
from typing import Any

import torch
from torch import nn

from .scatternet import ScatterNet
from .specs import NORMS, RESNET_BLOCKS, VGG11_LAYERS, WRN_BLOCKS, WRN_WIDTHS, config_default_architecture, default_architecture

__all__ = ["ClassifierConfig", "ARCHITECTURES", "NORMS", "StandardizedConv2d", "build_classifier", "config_default_architecture",
           "default_architecture", "has_batchnorm", "standardise_convolutions"]


@dataclass(frozen=True)
class ClassifierConfig:
    architecture: str = "small-cnn"
    in_channels: int = 1
    num_classes: int = 2
    norm: str = "batch"          # "batch" | "group" (what Opacus's fix produces) | "group-ws" (+ weight standardisation)


def _group_norm(channels: int) -> nn.GroupNorm:
    # Opacus's fix uses min(32, channels) groups; keep the same so both paths agree.
    return nn.GroupNorm(min(32, channels), channels)


def _norm(kind: str) -> Callable[[int], nn.Module]:
    return nn.BatchNorm2d if kind == "batch" else _group_norm


class StandardizedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is standardised per output channel (zero mean, unit variance over its fan-in) in
    the forward pass.  The parameter is the raw weight, so the state dict is ``nn.Conv2d``'s; under DP, Opacus has
    no registered per-sample-gradient rule for this type and computes them with functorch through the
    standardisation (per record, so the clipping and the accounting are unchanged)."""

    eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (w - mean) * torch.rsqrt(var + self.eps), self.bias)


def standardise_convolutions(model: nn.Module) -> nn.Module:
    """Every plain ``nn.Conv2d`` of ``model`` becomes a :class:`StandardizedConv2d` in place (same parameters)."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = StandardizedConv2d
    return model


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
    return _resnet(RESNET_BLOCKS["resnet18"], num_classes, norm_layer)


def _resnet(blocks: tuple[int, ...], num_classes: int, norm_layer: Callable[[int], nn.Module]) -> Any:
    from torchvision.models.resnet import ResNet

    return ResNet(_basic_block(), list(blocks), num_classes=num_classes, norm_layer=norm_layer)


def _resnet_builder(depth: str, cifar_stem: bool) -> Callable[[ClassifierConfig], nn.Module]:
    """A ResNet with the CIFAR stem (3x3 conv, stride 1, no max pool: 28 px) or torchvision's own (7x7, stride 2: 224 px)."""
    def build(cfg: ClassifierConfig) -> nn.Module:
        model = _resnet(RESNET_BLOCKS[depth], cfg.num_classes, _norm(cfg.norm))
        if cifar_stem:
            model.conv1 = nn.Conv2d(cfg.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        else:
            model.conv1 = nn.Conv2d(cfg.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model
    return build


class VGG11BN(nn.Module):
    """torchvision's ``vgg11_bn`` features (last max pool dropped), global average pool, linear (about 9.2M parameters)."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        norm = _norm(cfg.norm)
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for v in VGG11_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), norm(int(v)), nn.ReLU(inplace=False)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))  # (N, 512, h, w) -> (N, 512) -> (N, classes)


class _WideBlock(nn.Module):
    """Pre-activation wide basic block: norm-relu-conv3x3 (stride) -> norm-relu-conv3x3, plus a 1x1 shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.bn1 = norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if (c_in != c_out or stride != 1) else None
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        # As in the reference code: the projection shortcut reads the activated input, the identity the raw one.
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return out + identity  # out of place (Opacus hooks, see _basic_block)


class WideResNet(nn.Module):
    """WRN-16-2: conv 16, three groups of two wide blocks (32, 64, 128; strides 1, 2, 2), norm-relu, global pool, linear."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        norm = _norm(cfg.norm)
        self.conv1 = nn.Conv2d(cfg.in_channels, WRN_WIDTHS[0], 3, padding=1, bias=False)
        groups = []
        for c_in, c_out, stride in zip(WRN_WIDTHS, WRN_WIDTHS[1:], (1, 2, 2)):
            groups.append(nn.Sequential(*[_WideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, norm)
                                          for i in range(WRN_BLOCKS)]))
        self.block1, self.block2, self.block3 = groups
        self.bn = norm(WRN_WIDTHS[-1])
        self.relu = nn.ReLU(inplace=False)
        self.fc = nn.Linear(WRN_WIDTHS[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.relu(self.bn(x)).mean(dim=(2, 3)))


class SmallCNN(nn.Module):
    """conv-norm-pool-relu x 3, global average pool, linear: about 100k parameters.

    Max-pooling before the ReLU computes exactly what conv-norm-relu-pool computes (the ReLU is monotone, so
    ``max(relu(x)) == relu(max(x))``, and the gradients route to the same elements), with the ReLU and its
    backward on a quarter of the elements: 7 % less CPU time per forward+backward (batch 256, 28 px, one thread).
    """

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        norm = _norm(cfg.norm)
        widths = (cfg.in_channels, 32, 64, 128)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm(c_out), nn.MaxPool2d(2), nn.ReLU(inplace=False)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 128, H/8, W/8)
        return self.head(x.mean(dim=(2, 3)))  # (N, 128) -> (N, classes)


ARCHITECTURES: dict[str, Callable[[ClassifierConfig], nn.Module]] = {
    "resnet18-cifar": _resnet_builder("resnet18", cifar_stem=True),
    "resnet18": _resnet_builder("resnet18", cifar_stem=False),
    "resnet34-cifar": _resnet_builder("resnet34", cifar_stem=True),
    "resnet34": _resnet_builder("resnet34", cifar_stem=False),
    "vgg11-bn": VGG11BN,
    "wrn-16-2": WideResNet,
    "small-cnn": SmallCNN,
    "scatternet": ScatterNet,
}


def build_classifier(cfg: ClassifierConfig) -> nn.Module:
    """A freshly initialised classifier.  Raises ``ValueError`` for unknown names (configs are validated earlier)."""
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.architecture!r}; known: {sorted(ARCHITECTURES)}")
    if cfg.norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}")
    model = ARCHITECTURES[cfg.architecture](cfg)
    if cfg.norm == "group-ws":
        standardise_convolutions(model)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            # torchvision's in-place ReLU modifies the views Opacus's backward hooks return (a RuntimeError under DP).
            module.inplace = False
    return model


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
