"""ScatterNet classifier: a fixed wavelet scattering front end and a small trainable CNN head.

Tramer & Boneh (2021, "Differentially private learning needs better features
(or much more data)") show that a fixed ScatterNet front end -- a 2-D wavelet
scattering transform with ``J = 2`` scales and ``L = 8`` angles -- followed by
a small trainable head beats end-to-end CNNs under DP-SGD on small data: the
front end spends no privacy budget and the head has few parameters to noise.

Layout, for an input of ``C`` channels at ``H x W`` pixels:

* kymatio's ``Scattering2D(J=2, shape=(H, W), L=8)``: ``C * 81`` channels
  (1 zeroth-order, ``J*L = 16`` first-order and ``L*L*J*(J-1)/2 = 64``
  second-order coefficients per input channel) at ``H/4 x W/4``;
* GroupNorm over the scattering channels (27 groups, affine): the three orders
  live at very different scales, and Tramer & Boneh normalise them;
* conv 3x3 -> 64, norm, ReLU, max pool 2, conv 3x3 64 -> 64, norm, ReLU,
  global average pool, linear.

The front end is not part of the model's state.  Its filters depend on the
image size only, so they are built on the first forward pass at each input
size and device, kept in a cache that is *not* a registered submodule or
buffer: ``state_dict()``, ``parameters()``, ``named_buffers()``, Opacus's hooks
and the server's stacked ensemble see the head alone, and a bundle never
carries the filters.  The same model therefore runs at any image size (the
head ends in a global average pool), as the other classifiers do.

The scattering normalisation is always GroupNorm (its 81 channels per input
channel admit no ``GroupNorm(32, C)``, the form Opacus's ``ModuleValidator.fix``
gives a BatchNorm).  The head's two norms follow ``ClassifierConfig.norm`` like
every other architecture: BatchNorm for ``"batch"``, ``GroupNorm(32, 64)`` for
``"group"`` -- exactly what Opacus's fix makes of the BatchNorm head, so a DP
site (fixed) and the server (rebuilding with ``norm="group"``) agree, and a DP
ScatterNet has no BatchNorm (``has_batchnorm`` is false).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .classifier import ClassifierConfig

__all__ = ["ScatterNet", "SCATTERING_J", "SCATTERING_L", "SCATTERING_CHANNELS"]

SCATTERING_J = 2
SCATTERING_L = 8
SCATTERING_CHANNELS = 1 + SCATTERING_J * SCATTERING_L + SCATTERING_L ** 2 * SCATTERING_J * (SCATTERING_J - 1) // 2  # 81
_SCATTERING_GROUPS = 27   # divides C * 81 for every C; Tramer & Boneh's setting for CIFAR (243 channels)
_HEAD_WIDTH = 64


def _build_scattering(height: int, width: int) -> nn.Module:
    """kymatio's torch ``Scattering2D`` with a complex modulus that ``torch.func`` transforms accept.

    kymatio computes the modulus with a custom ``autograd.Function`` (``ModulusStable``) that has no
    ``setup_context``, which ``vmap`` refuses -- and the server runs a stacked ensemble of site models
    under ``vmap``.  ``torch.abs`` of the complex view is the same value, and its gradient at 0 is 0
    too (``sgn(0) = 0``), the stability ``ModulusStable`` exists for.
    """
    # kymatio.torch also imports the 3-D scattering, whose filter bank needs scipy.special.sph_harm
    # (removed in SciPy 1.17); the 2-D front end is the same class, imported from where it lives.
    from kymatio.scattering2d.backend.torch_backend import TorchBackend2D
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    class _Backend(TorchBackend2D):
        @classmethod
        def modulus(cls, x: torch.Tensor) -> torch.Tensor:
            cls.complex_contiguous_check(x)
            return torch.view_as_complex(x).abs()[..., None]

    return ScatteringTorch2D(J=SCATTERING_J, shape=(height, width), L=SCATTERING_L, backend=_Backend)


class _FrontEnds:
    """Scattering transforms by (height, width, device, dtype): constant filters, shared by deep copies."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[Any, ...], nn.Module] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> _FrontEnds:
        return self  # the filters never change: a copied model (an EMA, a frozen teacher) reuses them

    def get(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
        key = (height, width, device, dtype)
        front = self._by_key.get(key)
        if front is None:
            # Built outside inference mode (filters made there could never take part in a backward pass,
            # e.g. the server's input gradients) and outside any default-device context.
            with torch.inference_mode(False), torch.no_grad():
                front = _build_scattering(height, width).to(device=device, dtype=dtype)
            self._by_key[key] = front
        return front


def _head_norm(kind: str, channels: int) -> nn.Module:
    # Opacus's fix turns BatchNorm2d(C) into GroupNorm(min(32, C), C): "group" builds that same layer.
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(min(32, channels), channels)


class ScatterNet(nn.Module):
    """Scattering (J=2, L=8, fixed) -> GroupNorm -> two conv-norm-ReLU layers -> global average pool -> linear."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        channels = cfg.in_channels * SCATTERING_CHANNELS
        self.scattering_norm = nn.GroupNorm(_SCATTERING_GROUPS, channels)
        self.features = nn.Sequential(
            nn.Conv2d(channels, _HEAD_WIDTH, 3, padding=1, bias=False), _head_norm(cfg.norm, _HEAD_WIDTH), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(_HEAD_WIDTH, _HEAD_WIDTH, 3, padding=1, bias=False), _head_norm(cfg.norm, _HEAD_WIDTH), nn.ReLU(),
        )
        self.head = nn.Linear(_HEAD_WIDTH, cfg.num_classes)
        self._front_ends = _FrontEnds()  # a plain attribute: no parameters, no buffers, no state_dict entries

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C*81, ceil(H/4), ceil(W/4))`` scattering coefficients (differentiable in ``x``)."""
        n, c, h, w = x.shape
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        front = self._front_ends.get(h, w, x.device, dtype)
        # kymatio wants a contiguous NCHW tensor (the server may pass channels_last) and runs its FFTs
        # in full precision: under the server's bf16 autocast only the head runs in bf16.
        with torch.autocast(device_type=x.device.type, enabled=False):
            coefficients = front(x.to(dtype).contiguous())   # (N, C, 81, H/4, W/4)
        return coefficients.reshape(n, c * SCATTERING_CHANNELS, *coefficients.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scattering_norm(self.scatter(x))
        x = self.features(x)                      # (N, 64, H/8, W/8)
        return self.head(x.mean(dim=(2, 3)))      # (N, 64) -> (N, classes)
