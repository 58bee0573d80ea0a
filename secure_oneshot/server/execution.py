"""How the server's synthesis and distillation run: device, precision, memory layout, batching.

The computation is the same whatever is chosen here; only its speed and its
rounding change.  Measured on an earlier 2-core (Intel) CPU VM (5 small-cnn sites,
forward + input-gradient of the ensemble, 64 images at 28 px;
``benchmarks/distill.py`` has the end-to-end numbers):

==================================  =========
plain loop, NCHW, float32           92 ms
``vmap`` over stacked sites         115-130 ms (slower on CPU, as the issue measured)
loop, channels_last                 49 ms
loop, channels_last, bf16 autocast  32 ms
==================================  =========

But the ranking depends on the device: on one AMD EPYC core under load the same
ensemble ran NCHW fp32 548 ms, NCHW bf16 4,286 ms, channels_last fp32 638 ms,
channels_last bf16 4,561 ms.  So for a distillation, ``precision="auto"`` and
``channels_last=True`` (layout left open) are settled by a short measurement of
the real work at the real batch shape, cached per device model
(:mod:`~secure_oneshot.server.calibration`); the measured choice is stored in
:attr:`Execution.calibration` and reported.  ``channels_last=False`` forces NCHW
(``--no-channels-last``), an explicit precision forces that precision.

Without a calibration (direct calls of the synthesis code), ``auto`` falls back
to a guess: bf16 autocast where the device has bf16 arithmetic (CUDA with bf16
support, or a CPU with AVX-512 BF16 / AMX), channels_last except for GroupNorm
models on CPU.  The ``vmap`` batched ensemble runs on CUDA only (where 28 px
images leave the GPU idle between small per-site kernels) -- the Python loop on CPU.

channels_last is safe here: the server computes input gradients of frozen
models and plain gradients of the student, never Opacus per-sample gradients
(whose ``unfold2d`` path is wrong for channels_last inputs in Opacus 1.6).

What this module does not do: choose hyper-parameters, or move models itself
beyond :meth:`Execution.prepare`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["Execution", "PLAIN_LOOP", "resolve_device"]

PRECISIONS = ("auto", "bf16", "fp32")
BATCHING = ("auto", "on", "off")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as given (checked).

    Raises:
        ConfigError: an unknown device string, or ``cuda`` without a visible GPU.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}", hint="use auto, cpu, cuda or cuda:N") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but no GPU is visible", hint="use --device cpu (or auto)")
    return resolved


def _cpu_has_bf16() -> bool:
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _device_has_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_bf16()


@dataclass(frozen=True)
class Execution:
    """Where and how the server's tensors run.

    Raises:
        ConfigError: unknown precision or batching value, or an unavailable device.
    """

    device: str = "auto"            # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"         # "auto" | "bf16" | "fp32": autocast for the forward passes
    channels_last: bool = True
    batched: str = "auto"           # vmap over stacked site models: "auto" (CUDA only) | "on" | "off"
    compile: bool = False           # torch.compile the student's training step (slow to start; pays off on long GPU runs)
    # Set by calibration.calibrate: {"choice", "timings_ms", "cached"}; precision and layout are then the measured ones.
    calibration: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.batched not in BATCHING:
            problems.append(f"batched must be one of {list(BATCHING)}, got {self.batched!r}")
        if problems:
            raise ConfigError("invalid execution settings: " + "; ".join(problems))

    # Resolved once per instance: autocast() runs every inner-loop step, and resolving asks CUDA each time.
    @functools.cached_property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @functools.cached_property
    def use_bf16(self) -> bool:
        if self.precision == "auto":
            return _device_has_bf16(self.torch_device)
        return self.precision == "bf16"

    @property
    def use_batched(self) -> bool | None:
        """``None`` lets :class:`~secure_oneshot.server.ensemble.Ensemble` batch when architectures match."""
        if self.batched == "auto":
            return None if self.torch_device.type == "cuda" else False
        return self.batched == "on"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast for forward passes (losses are computed in float32 by the callers)."""
        if not self.use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.torch_device.type, dtype=torch.bfloat16)

    def layout(self, x: Tensor) -> Tensor:
        """``x`` in the chosen memory layout (a no-op for non-image tensors)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move ``module`` to the device and layout (in place; returned for chaining)."""
        module.to(self.torch_device)
        # A batched ensemble holds 5-D stacked weights, which have no channels_last form: inputs only.
        if self.channels_last and not getattr(module, "batched", False):
            module.to(memory_format=torch.channels_last)
        return module

    def for_models(self, models: Sequence[nn.Module]) -> Execution:
        """These settings, with channels_last dropped for GroupNorm models on CPU (unless calibrated).

        Measured (5 GroupNorm small-cnn sites, 64 images, forward + input gradient): NCHW fp32 90 ms,
        NCHW bf16 64 ms, channels_last fp32 81 ms, channels_last bf16 294 ms -- PyTorch's CPU GroupNorm
        has no fast channels_last bf16 path.  (BatchNorm models are fastest with channels_last + bf16.)
        """
        if self.calibration is not None:
            return self   # measured on these models: the measurement wins over the rule below
        group_norm = any(isinstance(m, nn.GroupNorm) for model in models for m in model.modules())
        if self.channels_last and group_norm and self.torch_device.type == "cpu":
            return dataclasses.replace(self, channels_last=False)
        return self

    def describe(self) -> dict[str, Any]:
        """The resolved choices, for reports."""
        described = {"device": str(self.torch_device), "precision": "bf16" if self.use_bf16 else "fp32",
                     "channels_last": self.channels_last, "batched": self.batched, "compile": self.compile}
        if self.calibration is not None:
            described["calibration"] = self.calibration
        return described


PLAIN_LOOP = Execution(precision="fp32", channels_last=False, batched="off")
"""The reference computation ``benchmarks/distill.py`` compares against."""
