"""Train a site's class-conditional diffusion generator (optionally with DP-SGD) and sample from it.

The training loop and the sampling loop are written out (diffusers' philosophy:
samplers stay separate from models, loops stay visible):

* training: epsilon-prediction MSE on ``DDPMScheduler.add_noise`` at uniformly
  drawn timesteps, AdamW; with ``dp_epsilon`` set, Opacus's
  ``make_private_with_epsilon`` (Poisson sampling, per-sample clipping, noise
  derived from the stated budget) and a :class:`~secure_oneshot.policy.dp.DpRecord`
  the policy layer can verify;
* sampling: deterministic DDIM (``eta = 0``) built from the DDPM training config.

Images go in as ``C x H x W`` in ``[-1, 1]`` and are padded up to the size the
UNet runs at (:func:`~secure_oneshot.models.generator.padded_size`); samples are
cropped back.  Only :func:`save_sample_grid` touches disk.

Opacus and this UNet (Opacus 1.6, diffusers 0.42): ``ModuleValidator`` finds
nothing to fix (GroupNorm only, attention blocks included), and every parameter
sits in a Conv2d, Linear, GroupNorm or Embedding that Opacus has a grad sampler
for.  ``grad_sample_mode="hooks"`` (the default) is correct only with
:func:`contiguous_conv_inputs`, which DP training installs: Opacus's conv grad
sampler reads activations as if they were NCHW-contiguous, and the convs after
a diffusers attention block receive channels-last-strided views, so their
per-sample gradients (hence the clipping, hence the DP guarantee) were silently
wrong.  ``"functorch"`` is correct without it; ``"ew"`` (expanded weights) fails
inside diffusers ("Expanded Weights encountered but cannot handle function
is_floating_point").  ``tests/test_generator.py`` checks both modes' per-sample
gradients against one-image-at-a-time gradients.

Reproducibility: everything random (weights, shuffling or Poisson sampling,
timesteps, noise, DP noise) draws from torch's global RNG, seeded with
``GeneratorTraining.seed`` inside ``torch.random.fork_rng`` so the caller's RNG
state is left as it was.  Opacus runs without its secure RNG (it warns): fine
for research; a deployment that needs cryptographically secure noise must use
Opacus's ``secure_mode``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.hooks import RemovableHandle

from .._internal.atomic import atomic_writer
from ..errors import ConfigError, PrivacyError, TensorPayloadError
from ..models.generator import GeneratorConfig, build_generator, padded_size, scheduler_config
from ..policy.dp import ACCOUNTANTS, DpRecord, dp_record_from_opacus

__all__ = ["GeneratorTraining", "GeneratorResult", "GRAD_SAMPLE_MODES", "contiguous_conv_inputs", "train_generator",
           "denoising_loss", "sample_images", "generator_state", "load_generator", "save_sample_grid"]

GRAD_SAMPLE_MODES = ("hooks", "functorch")
"""Opacus per-sample-gradient modes that work with the diffusers UNet ("ew" does not; see the module docstring)."""


def contiguous_conv_inputs(model: nn.Module) -> list[RemovableHandle]:
    """Make every ``Conv2d`` in ``model`` see NCHW-contiguous input (a forward pre-hook per conv).

    Why: Opacus 1.6's conv grad sampler (``opacus.utils.tensor_utils.unfold2d``)
    reads the captured activations with ``as_strided`` strides computed for
    contiguous NCHW memory.  A channels-last-strided activation (diffusers'
    attention returns ``transpose(-1, -2).reshape(...)`` views, and GroupNorm,
    SiLU and interpolation keep that layout) then yields wrong per-sample
    gradients, measured relative error about 1, with no error raised.  Pre-hooks
    run before Opacus's capturing forward hook, which therefore stores the copy.
    ``contiguous()`` is free for inputs that already are.

    Args:
        model: the module to patch (before or after Opacus wraps it).

    Returns:
        The hook handles; ``handle.remove()`` each to undo.
    """
    def make_contiguous(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)

    return [m.register_forward_pre_hook(make_contiguous) for m in model.modules() if isinstance(m, nn.Conv2d)]


@dataclass(frozen=True)
class GeneratorTraining:
    """How to train a generator (the architecture is a separate :class:`GeneratorConfig`).

    Raises:
        ConfigError: a field is out of range, or DP is requested without a dataset fingerprint.
    """

    epochs: int = 5
    batch_size: int = 64              # under DP: the *expected* batch size of Poisson sampling
    lr: float = 1e-3
    weight_decay: float = 1e-2        # AdamW's default
    seed: int = 0
    dp_epsilon: float | None = None   # None: no DP; else the budget Opacus derives the noise from
    dp_delta: float = 1e-5
    max_grad_norm: float = 1.0        # per-sample clipping norm
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"
    dataset_fingerprint: str = ""     # identifies the site's records; goes into the DpRecord

    def __post_init__(self) -> None:
        problems = _training_problems(self)
        if problems:
            raise ConfigError("invalid generator training config: " + "; ".join(problems))


def _training_problems(t: GeneratorTraining) -> list[str]:
    checks = [
        (isinstance(t.epochs, int) and t.epochs >= 1, f"epochs must be an integer >= 1, got {t.epochs!r}"),
        (isinstance(t.batch_size, int) and t.batch_size >= 1,
         f"batch_size must be an integer >= 1, got {t.batch_size!r}"),
        (t.lr > 0 and math.isfinite(t.lr), f"lr must be > 0, got {t.lr!r}"),
        (t.weight_decay >= 0, f"weight_decay must be >= 0, got {t.weight_decay!r}"),
        (t.dp_epsilon is None or 0 < t.dp_epsilon < math.inf, f"dp_epsilon must be None or > 0, got {t.dp_epsilon!r}"),
        (0 < t.dp_delta < 1, f"dp_delta must be in (0, 1), got {t.dp_delta!r}"),
        (t.max_grad_norm > 0, f"max_grad_norm must be > 0, got {t.max_grad_norm!r}"),
        (t.accountant in ACCOUNTANTS, f"accountant must be one of {list(ACCOUNTANTS)}, got {t.accountant!r}"),
        (t.grad_sample_mode in GRAD_SAMPLE_MODES,
         f"grad_sample_mode must be one of {list(GRAD_SAMPLE_MODES)}, got {t.grad_sample_mode!r}"),
        # Checked here, not after minutes of training: a DpRecord needs to say which records it is about.
        (t.dp_epsilon is None or bool(t.dataset_fingerprint), "dataset_fingerprint is required when dp_epsilon is set"),
    ]
    return [message for ok, message in checks if not ok]


@dataclass
class GeneratorResult:
    """A trained generator and what the exporter needs to describe it."""

    model: UNet2DModel                # plain module (no Opacus wrapper), eval mode
    config: GeneratorConfig
    scheduler: dict[str, Any]         # DDPM training schedule, plain data (see scheduler_config)
    losses: list[float]               # mean denoising loss per epoch
    dp: DpRecord | None               # None without DP


# --- padding -------------------------------------------------------------------------------------


def _pad(x: torch.Tensor, cfg: GeneratorConfig) -> torch.Tensor:
    """(N, C, S, S) -> (N, C, P, P), P = padded_size(cfg); centred, extra pixel at the bottom/right."""
    total = padded_size(cfg) - cfg.image_size
    if total == 0:
        return x
    before, after = total // 2, total - total // 2
    value = -1.0 if cfg.pad_mode == "constant" else None  # constant pads with black in [-1, 1]
    return F.pad(x, (before, after, before, after), mode=cfg.pad_mode, value=value)


def _crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, P, P) -> (N, C, size, size), the inverse of :func:`_pad`."""
    before = (x.shape[-1] - size) // 2
    return x[..., before:before + size, before:before + size]


# --- training ------------------------------------------------------------------------------------


def denoising_loss(model: nn.Module, noise_scheduler: DDPMScheduler, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Epsilon-prediction MSE at one uniformly drawn timestep per image.

    Args:
        model: the UNet (possibly wrapped by Opacus).
        noise_scheduler: the DDPM training schedule.
        x: clean images (N, C, P, P) in [-1, 1], already padded.
        y: class labels (N,), int64.

    Returns:
        The mean over images and pixels (Opacus's ``loss_reduction="mean"``).
    """
    noise = torch.randn_like(x)
    steps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x.shape[0],), device=x.device)
    noisy = noise_scheduler.add_noise(x, noise, steps)
    return F.mse_loss(model(noisy, steps, class_labels=y).sample, noise)


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, noise_scheduler: DDPMScheduler,
                 cfg: GeneratorConfig, device: torch.device) -> float:
    """One pass over ``loader``; returns the mean loss per image."""
    model.train()
    loss_sum, count = 0.0, 0
    for x, y in loader:
        # An empty Poisson batch still takes its (noise-only) DP step: skipping it would reveal that the batch was empty.
        x, y = _pad(x.to(device), cfg), y.to(device)
        loss = denoising_loss(model, noise_scheduler, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if len(x):  # the mean over an empty batch is NaN
            loss_sum += float(loss.detach()) * len(x)
            count += len(x)
    return loss_sum / max(count, 1)


def _make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,  # type: ignore[no-untyped-def]
                  train: GeneratorTraining):
    """Validate (nothing to fix for this UNet), then wrap for DP-SGD with Poisson sampling at the stated budget."""
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:  # a config change introduced a layer Opacus cannot clip per sample
        raise PrivacyError(f"Opacus cannot train this generator with DP: {errors}", hint="use a preset without such layers")
    with warnings.catch_warnings():  # "Secure RNG turned off": the README's DP paragraph says it once
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant=train.accountant)
    try:
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=train.dp_epsilon,
            target_delta=train.dp_delta, epochs=train.epochs, max_grad_norm=train.max_grad_norm,
            poisson_sampling=True, grad_sample_mode=train.grad_sample_mode)
    except ValueError as e:
        raise PrivacyError(f"Opacus cannot train the generator to epsilon {train.dp_epsilon}: {e}") from e
    return engine, model, optimizer, loader


@contextlib.contextmanager
def _epoch_bar(enabled: bool, epochs: int) -> Iterator[Callable[[float], None]]:
    """Yield ``advance(loss)``; with ``enabled``, a rich progress bar on stderr (results own stdout)."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("generator epoch"), MofNCompleteColumn(), BarColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("train", total=epochs, loss="-")
        yield lambda loss: bar.update(task, advance=1, loss=f"{loss:.4f}")


def _rng_devices(device: torch.device) -> list[int]:
    """CUDA devices whose RNG :func:`torch.random.fork_rng` must save and restore."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def train_generator(cfg: GeneratorConfig, train: GeneratorTraining, dataset: Dataset, *, device: str | torch.device = "cpu",
                    progress: bool = False) -> GeneratorResult:
    """Train a class-conditional DDPM on one site's images.

    Args:
        cfg: the architecture and noise schedule.
        train: epochs, optimiser, seed and DP settings.
        dataset: yields ``(x, y)``: ``x`` float (C, image_size, image_size) in [-1, 1], ``y`` an int64 label.
        device: where to train.
        progress: show a progress bar (epoch, loss) on stderr.

    Returns:
        The trained model (plain ``UNet2DModel``, eval mode), its schedule, the
        per-epoch losses and, with DP, the verified-format DP record.

    Raises:
        PrivacyError: Opacus cannot reach the budget or the model has layers it cannot clip.

    >>> from secure_oneshot.models.generator import PRESETS
    >>> result = train_generator(PRESETS["cpu-small"], GeneratorTraining(epochs=1), dataset)  # doctest: +SKIP
    >>> sample_images(result.model, result.scheduler, torch.tensor([0, 1])).shape  # doctest: +SKIP
    torch.Size([2, 1, 28, 28])
    """
    dev = torch.device(device)
    with torch.random.fork_rng(devices=_rng_devices(dev)):
        torch.manual_seed(train.seed)
        model, engine, losses = _fit(cfg, train, dataset, dev, progress)
    dp = None
    if engine is not None:
        dp = dp_record_from_opacus(engine.accountant, delta=train.dp_delta, max_grad_norm=train.max_grad_norm,
                                   sampling="poisson", dataset_fingerprint=train.dataset_fingerprint)
    return GeneratorResult(model.eval(), cfg, scheduler_config(cfg), losses, dp)


def _fit(cfg: GeneratorConfig, train: GeneratorTraining, dataset: Dataset, device: torch.device,
         progress: bool) -> tuple[UNet2DModel, Any, list[float]]:
    """Build, (optionally) privatise and train; returns the unwrapped model, the Opacus engine or None, losses."""
    model: nn.Module = build_generator(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    loader = DataLoader(dataset, batch_size=train.batch_size, shuffle=True)
    engine, handles = None, []
    if train.dp_epsilon is not None:
        handles = contiguous_conv_inputs(model)  # without it, wrong per-sample gradients after attention blocks
        engine, model, optimizer, loader = _make_private(model, optimizer, loader, train)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config(cfg))
    losses: list[float] = []
    with _epoch_bar(progress, train.epochs) as advance:
        for _ in range(train.epochs):
            losses.append(_train_epoch(model, optimizer, loader, noise_scheduler, cfg, device))
            advance(losses[-1])
    for handle in handles:
        handle.remove()
    if engine is not None:
        model = model.to_standard_module()  # drops Opacus's hooks and .grad_sample buffers
    return model, engine, losses  # type: ignore[return-value]


# --- sampling ------------------------------------------------------------------------------------


def _check_labels(model: UNet2DModel, labels: torch.Tensor) -> None:
    classes = model.config.num_class_embeds
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be a 1-D int64 tensor, got {labels.dim()}-D {labels.dtype}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < classes:
        raise ValueError(f"labels must be in 0..{classes - 1}")


@torch.no_grad()
def _ddim_batch(model: UNet2DModel, ddim: DDIMScheduler, labels: torch.Tensor, noise: torch.Tensor,
                on_step: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Denoise ``noise`` (N, C, P, P) along ``ddim.timesteps``; returns x0 (N, C, P, P)."""
    x = noise
    for t in ddim.timesteps:
        eps = model(x, t, class_labels=labels).sample
        x = ddim.step(eps, t, x, eta=0.0).prev_sample
        if on_step is not None:
            on_step(x)
    return x


def sample_images(model: UNet2DModel, scheduler: dict[str, Any], labels: torch.Tensor, *, steps: int = 50, seed: int = 0,
                  device: str | torch.device = "cpu", batch_size: int = 256,
                  on_step: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Draw one image per label with deterministic DDIM from the DDPM training schedule.

    The starting noise is drawn on the CPU from ``seed``, so the same seed gives
    the same noise on every device, and image ``i`` does not depend on ``batch_size``.

    Args:
        model: a trained generator (moved to ``device``, run in eval mode, mode restored after).
        scheduler: the training schedule (``GeneratorResult.scheduler``).
        labels: (N,) int64 class labels.
        steps: DDIM steps.
        seed: seed of the starting noise.
        device: where to run the UNet.
        batch_size: images per UNet call (memory bound only).
        on_step: called after every DDIM step with the batch's current images (N, C, image_size, image_size) on
            the CPU, noise first: the noise -> image trajectory (per UNet batch).

    Returns:
        (N, C, image_size, image_size) float32 on the CPU, in [-1, 1].

    Raises:
        ValueError: labels of the wrong shape, dtype or range, or ``steps < 1`` (caller bugs).
    """
    _check_labels(model, labels)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    size, channels = model.config.sample_size, model.config.in_channels
    noise = torch.randn(len(labels), channels, size, size, generator=torch.Generator().manual_seed(seed))
    ddim = DDIMScheduler.from_config(scheduler)
    ddim.set_timesteps(steps)
    was_training = model.training
    model.to(device).eval()
    try:
        crop = model.config.get("image_size", size)
        step_hook = (lambda x: on_step(_crop(x, crop).detach().cpu())) if on_step is not None else None
        chunks = [_ddim_batch(model, ddim, labels[i:i + batch_size].to(device), noise[i:i + batch_size].to(device), step_hook).cpu()
                  for i in range(0, len(labels), batch_size)]
    finally:
        model.train(was_training)
    images = torch.cat(chunks) if chunks else noise
    return _crop(images, model.config.get("image_size", size)).clamp(-1.0, 1.0)


# --- weights and files ---------------------------------------------------------------------------


def generator_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights by state_dict name, ready for ``safetensors.torch.save``.

    Opacus's ``_module.`` wrapper prefixes are removed (however deeply nested) so
    the names match a plain ``UNet2DModel``; tensors are detached, contiguous, on the CPU.
    """
    state = {}
    for name, tensor in model.state_dict().items():
        while name.startswith("_module."):
            name = name[len("_module."):]
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def load_generator(cfg: GeneratorConfig, tensors: dict[str, torch.Tensor]) -> UNet2DModel:
    """Rebuild a generator from its config and :func:`generator_state` tensors (eval mode).

    Raises:
        TensorPayloadError: the tensors' names or shapes do not match ``cfg`` exactly.
    """
    model = build_generator(cfg)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:3]
        raise TensorPayloadError(
            f"generator weights do not match the generator config: {' '.join(first)}",
            hint="the site's generator config and weights disagree; ask for both from the same training run") from e
    return model.eval()


def save_sample_grid(images: torch.Tensor, path: str | os.PathLike[str], nrow: int = 8) -> None:
    """Write images in [-1, 1] as one PNG grid, atomically (no partial file on failure).

    Args:
        images: (N, C, H, W) with C 1 or 3.
        path: destination ``.png`` file.
        nrow: images per row.

    Raises:
        ValueError: ``images`` is not (N, 1|3, H, W) (a caller bug).
        ResourceError: the folder is missing or not writable.
    """
    from torchvision.utils import save_image

    if images.dim() != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images must be (N, 1 or 3, H, W) with N >= 1, got {tuple(images.shape)}")
    grid_input = ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)  # [-1, 1] -> [0, 1]
    with atomic_writer(path) as f:
        save_image(grid_input, f, nrow=nrow, format="png")
