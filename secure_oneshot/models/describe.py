"""Architecture descriptions: every tensor a declared model defines (name, shape, dtype, role), without weights.

The export gate and the server classify tensors by *structure*: a tensor is a
classifier weight, a BatchNorm running statistic or a generator weight because
the declared architecture defines a tensor of that name, shape and dtype in
that role -- never because of how its name ends.  Models are built on
``torch.device("meta")``: no memory for weights, a few milliseconds each, and
descriptions are cached per config.

Roles:

* ``"parameter"`` -- a trainable parameter (``model.named_parameters()``);
* ``"bn_statistics"`` -- a buffer of a BatchNorm module (``running_mean``,
  ``running_var``, ``num_batches_tracked``): computed from the site's records;
* ``"buffer"`` -- any other persistent buffer (none in the models built here);
* ``"statistic"`` -- a released statistic that is no model's state (the DP label
  histogram).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .classifier import ClassifierConfig
    from .generator import GeneratorConfig

__all__ = ["TensorSpec", "describe_module", "describe_classifier", "describe_generator", "describe_label_counts", "feature_layers"]


@dataclass(frozen=True)
class TensorSpec:
    """What the architecture defines for one state-dict entry."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    role: str  # "parameter" | "bn_statistics" | "buffer" | "statistic"


def describe_module(model: nn.Module) -> dict[str, TensorSpec]:
    """Every ``state_dict`` entry of ``model`` with its role (see the module docstring)."""
    parameters = {name for name, _ in model.named_parameters()}
    bn_buffers = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, _ in module.named_buffers(recurse=False)
    }
    specs = {}
    for name, tensor in model.state_dict().items():
        role = "parameter" if name in parameters else "bn_statistics" if name in bn_buffers else "buffer"
        specs[name] = TensorSpec(tuple(tensor.shape), tensor.dtype, role)
    return specs


@lru_cache(maxsize=32)
def _classifier_on_meta(cfg: ClassifierConfig) -> nn.Module:
    from .classifier import build_classifier

    with torch.device("meta"):
        return build_classifier(cfg)


@lru_cache(maxsize=32)
def describe_classifier(cfg: ClassifierConfig) -> dict[str, TensorSpec]:
    """The classifier's tensors.  Raises ``ValueError`` for an unknown architecture or norm."""
    return describe_module(_classifier_on_meta(cfg))


@lru_cache(maxsize=8)
def describe_generator(cfg: GeneratorConfig) -> dict[str, TensorSpec]:
    """The generator's (UNet's) tensors; imports diffusers, so only call it when a generator is declared."""
    from .generator import build_generator

    with torch.device("meta"):
        return describe_module(build_generator(cfg))


def describe_label_counts(num_classes: int) -> dict[str, TensorSpec]:
    """The DP label histogram: one float32 tensor ``counts`` of ``num_classes`` entries (noisy, unclamped)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, not {num_classes!r}")
    return {"counts": TensorSpec((num_classes,), torch.float32, "statistic")}


@lru_cache(maxsize=32)
def feature_layers(cfg: ClassifierConfig) -> dict[str, int]:
    """Normalisation layers whose inputs DP feature statistics may summarise: layer name -> channels.

    The same layer types as ``client.feature_stats.DEFAULT_LAYER_TYPES`` (GroupNorm, BatchNorm2d); each
    such layer ``L`` defines the statistics ``L.mean`` and ``L.var``, float32 vectors of ``channels`` entries.
    """
    layers = {}
    for name, module in _classifier_on_meta(cfg).named_modules():
        if isinstance(module, nn.GroupNorm):
            layers[name] = module.num_channels
        elif isinstance(module, nn.BatchNorm2d):
            layers[name] = module.num_features
    return layers
