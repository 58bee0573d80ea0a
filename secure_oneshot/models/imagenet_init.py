"""ImageNet initialisation from a local file: the method's 224 px models start from ImageNet weights.

The method's public code initialises its 224 px ResNet-18 site models (and,
with ``--pretrained``, the student) from torchvision's ImageNet weights,
downloaded at run time.  Nothing is downloaded here: the weights must be
given as a local **safetensors** file holding torchvision's ``resnet18``
state dict (a ``.pth`` file is a pickle and is refused).  Make one once, on a
machine with internet access::

    python -c "import torchvision; from safetensors.torch import save_file; \\
    save_file(torchvision.models.resnet18(weights='IMAGENET1K_V1').state_dict(), 'resnet18-imagenet.safetensors')"

Loading follows the published code: every weight and BatchNorm statistic but
the classification head (``fc.*``), which keeps its fresh initialisation.  A
grey (1-channel) model gets the first convolution summed over the three RGB
filters, which gives the same response as the RGB model on a grey image
repeated in three channels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .classifier import ClassifierConfig, build_classifier

__all__ = ["IMAGENET_ARCHITECTURES", "initial_classifier", "load_imagenet_weights"]

IMAGENET_ARCHITECTURES = ("resnet18", "resnet34")   # torchvision's layouts (7x7 stem), as the 224 px method uses
HINT = ("ImageNet weights cannot be downloaded at run time: save torchvision's resnet18 state dict as safetensors on a "
        "machine with internet access and pass the file (see README, \"224 px\")")


def load_imagenet_weights(model: nn.Module, path: str | Path, architecture: str) -> nn.Module:
    """``model`` (built by :func:`~secure_oneshot.models.classifier.build_classifier`) with ImageNet weights from ``path``.

    Raises:
        ConfigError: a missing or non-safetensors file, an architecture without ImageNet weights, or weights that
            do not fit the model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if architecture not in IMAGENET_ARCHITECTURES:
        raise ConfigError(f"no ImageNet initialisation for architecture {architecture!r}",
                          hint=f"ImageNet weights fit {', '.join(IMAGENET_ARCHITECTURES)} (torchvision's 224 px layout)")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"ImageNet weights file not found: {file}", hint=HINT)
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{file} is not a safetensors file of weights ({str(e)[:120]})", hint=HINT) from e
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}   # the head is the task's own
    own = model.state_dict()
    conv = state.get("conv1.weight")
    if conv is not None and "conv1.weight" in own and conv.shape[1] != own["conv1.weight"].shape[1]:
        if own["conv1.weight"].shape[1] != 1:
            raise ConfigError(f"{file}: the first convolution takes {conv.shape[1]} channels, the model {own['conv1.weight'].shape[1]}")
        state["conv1.weight"] = conv.sum(dim=1, keepdim=True)
    wrong = sorted(k for k, v in state.items() if k not in own or own[k].shape != v.shape)
    missing = sorted(k for k in own if k not in state and not k.startswith("fc."))
    if wrong or missing:
        raise ConfigError(f"{file} does not fit {architecture} (unexpected or misshapen {wrong[:3]}, missing {missing[:3]})",
                          hint="the file must hold torchvision's state dict of the same architecture")
    with torch.no_grad():
        model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}})
    return model


def initial_classifier(cfg: ClassifierConfig, imagenet_weights: str | Path = "") -> nn.Module:
    """A fresh classifier, initialised from the ImageNet weights file when one is named ("" or None: random)."""
    model = build_classifier(cfg)
    return load_imagenet_weights(model, imagenet_weights, cfg.architecture) if imagenet_weights else model
