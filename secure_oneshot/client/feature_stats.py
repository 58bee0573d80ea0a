"""DP feature statistics: release the per-channel mean and variance of every normalisation layer's input.

Under DP-SGD Opacus replaces BatchNorm by GroupNorm, so a DP classifier has no
running statistics and the server's FedISCA BN loss has nothing to match.  This
module lets a site release, with its own accounted Gaussian noise, the
per-layer, per-channel mean and variance of each selected normalisation
layer's *input* over the site's data.  The training code saves them as
``feature_stats.safetensors`` (artifact ``dp_feature_statistics``), tensors
``"<layer name>.mean"`` and ``"<layer name>.var"`` (float32, ``C_L`` entries).

Mechanism (one Gaussian mechanism, add/remove-one neighbouring datasets)
------------------------------------------------------------------------
Let ``C = clip_norm``, ``w = count_weight`` (0 < w < 1), ``c = w*C`` and
``r = C*sqrt(1 - w**2)``.  With the model in eval mode and without gradients,
forward hooks read the input ``x`` of every selected layer ``L`` (shape
``(B, C_L, *spatial)``).  For each sample ``i``:

1. ``f_i`` = the concatenation over layers, in ``named_modules`` order, of the
   per-channel spatial mean ``m_i[L]`` and the per-channel spatial mean of
   squares ``s_i[L]`` (``2 * C_L`` values per layer).
2. ``f_i`` is clipped to L2 norm ``r`` (scaled by ``min(1, r/||f_i||)``); a
   non-finite ``f_i`` is replaced by zeros, so the bound holds for every input.
3. The contribution is ``v_i = [c, clip(f_i)]``, hence ``||v_i||**2 <= c**2 +
   r**2 = C**2``: every ``v_i`` lies in the ball of radius ``C``.

The release is ``S~ = sum_i v_i + N(0, (sigma*C)**2 I)``, one draw.  Adding or
removing one person's record changes the sum by exactly that record's ``v_i``,
of norm at most ``C``, so the L2 sensitivity is ``C`` and this is a Gaussian
mechanism with noise multiplier ``sigma`` -- exactly one DP-SGD step with
sample rate 1.  ``sigma`` is calibrated for ``(epsilon, delta)`` with Opacus's
``get_noise_multiplier(sample_rate=1, steps=1)`` and checked with
:func:`~secure_oneshot.policy.dp.compute_epsilon`; the record's history is
``((sigma, 1.0, 1),)`` and its ``max_grad_norm`` is the sensitivity ``C``.

Why the count rides in the vector: under add/remove-one DP (what Opacus's
accountants analyse) the record count ``n`` is itself private, so it may not be
used as if public.  (A DP-SGD record's sample rate, about batch/n, hints at it,
but that is not a DP release and this module does not lean on it.)  The
constant component ``c`` makes
``S~[0] = c*n + N(0, (sigma*C)**2)`` a noisy count inside the *same* Gaussian
release, at no extra epsilon; the price is that the features get radius ``r``
instead of ``C``.  The constant is prepended *after* clipping the features, so
every record's count component is exactly ``c`` (clipping the whole vector
instead would shrink the count of clipped records and bias ``n``).

Post-processing (free under DP): ``n~ = max(S~[0]/c, 1)``, ``mean = S~_m / n~``
and ``var = max(S~_s / n~ - mean**2, var_floor)`` per channel.  For records
that are not clipped, ``S_m / n`` is exactly the pooled mean of the layer's
input over all samples and positions (every image has the same number of
positions), and ``S_s/n - mean**2`` the pooled (biased) variance.  To first
order, the error of a channel's mean is normal with standard deviation
``sigma*C/n * sqrt(1 + (mu/c)**2)`` (``mu`` the channel's clipped mean: the
second term is the count noise), and that of its variance
``sigma*C/n * sqrt(1 + 4*mu**2 + ((2*mu**2 - q)/c)**2)`` (``q`` the mean of
squares).  Clipping biases the statistics towards zero for records whose
``||f_i|| > r``: choose ``clip_norm`` from public knowledge (e.g. the
architecture on public or synthetic data), never from the site's own norms.

Sampling label: no record is sampled -- every record is used once, in one
deterministic pass -- so the record says ``sampling = "fixed"`` (one fixed
batch, the whole dataset).  With sample rate 1 the accountants' Poisson
analysis is the plain Gaussian mechanism, claims no amplification, and the
recomputed epsilon is exact; policies should set ``require_poisson = false``
for this artifact (as ``policies/hospital-strict.toml`` does).  The release
composes with the training budget through the policy layer
(``composed_epsilon`` over records with the same ``dataset_fingerprint``).

What this module does not do: write files, decide whether the release is
allowed (the export policy does), or account for the model itself.  The
guarantee treats the model as fixed; a model trained on the same records
spends its own budget, and the two compose.  Eval mode matters for the
sensitivity bound: a BatchNorm layer in train mode would mix the samples of a
batch, so one record could move every ``v_i``.  The Gaussian noise comes from
``torch``'s generator with 64 bits of OS entropy: adequate, but not hardened
against floating-point attacks on noise sampling (Opacus's ``secure_mode``).

>>> cfg = FeatureStatsConfig(epsilon=1.0, dataset_fingerprint="sha256:ab")   # doctest: +SKIP
>>> stats, record = dp_feature_statistics(model, dataset, cfg)               # doctest: +SKIP
>>> sorted(stats)[:2]                                                         # doctest: +SKIP
['layer1.0.bn1.mean', 'layer1.0.bn1.var']
"""

from __future__ import annotations

import math
import numbers
import secrets
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, PrivacyError
from ..policy.dp import ACCOUNTANTS, DpRecord, compute_epsilon, dp_record_from_opacus, quiet_accountant

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "SAMPLING",
    "FeatureStatsConfig",
    "UnsafeFixedSeedWarning",
    "norm_layer_names",
    "calibrate_noise_multiplier",
    "contribution_vectors",
    "true_feature_statistics",
    "dp_feature_statistics",
]

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.BatchNorm2d)
"""Layers whose inputs are summarised by default (Opacus turns BatchNorm2d into GroupNorm)."""

SAMPLING = "fixed"
"""The record's sampling mode: one deterministic pass over every record (see the module docstring)."""

_SIGMA_BUMPS = 50  # at most +64% over Opacus's search before giving up (never reached in practice)
_Layout = list[tuple[str, int]]  # (layer name, channels) in vector order


class UnsafeFixedSeedWarning(UserWarning):
    """A fixed noise seed: whoever knows it can regenerate the noise and subtract it (tests only)."""


# --- config --------------------------------------------------------------------------------------


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class FeatureStatsConfig:
    """How to summarise and noise one site's feature statistics.

    Raises:
        ConfigError: listing every invalid field at once.
    """

    epsilon: float                      # budget of this release alone (composition is the policy's job)
    delta: float = 1e-5
    clip_norm: float = 1.0              # L2 bound of one record's whole contribution = the sensitivity
    # "prv" | "rdp".  PRV, as the classifier's DP-SGD: RDP's conversion cannot certify one Gaussian release below
    # epsilon ~0.2 at delta 1e-5 (a composed budget of 1 leaves the statistics 0.1), and costs more noise above it.
    accountant: str = "prv"
    batch_size: int = 256               # forward-pass batch; does not change the result
    seed: int | None = None             # None: fresh OS entropy; an int is reproducible and UNSAFE (warns)
    dataset_fingerprint: str = ""       # required by dp_feature_statistics: composition keys on it
    layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES
    count_weight: float = 0.5           # count component c = count_weight * clip_norm, 0 < w < 1
    var_floor: float = 1e-6             # released variances are at least this (noise can make them negative)

    def __post_init__(self) -> None:
        problems = [message for ok, message in self._checks() if not ok]
        if problems:
            raise ConfigError("invalid feature-statistics config: " + "; ".join(problems))

    def _checks(self) -> list[tuple[bool, str]]:
        types = self.layer_types
        return [
            (_is_real(self.epsilon) and self.epsilon > 0, f"epsilon must be a finite number > 0, got {self.epsilon!r}"),
            (_is_real(self.delta) and 0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta!r}"),
            (_is_real(self.clip_norm) and self.clip_norm > 0, f"clip_norm must be a finite number > 0, got {self.clip_norm!r}"),
            (self.accountant in ACCOUNTANTS, f"accountant must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}"),
            (_is_int(self.batch_size) and self.batch_size >= 1, f"batch_size must be an integer >= 1, got {self.batch_size!r}"),
            (self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64), f"seed must be None or in 0..2^64-1, got {self.seed!r}"),
            (isinstance(self.dataset_fingerprint, str), "dataset_fingerprint must be a string"),
            (isinstance(types, tuple) and len(types) > 0 and all(isinstance(t, type) and issubclass(t, nn.Module) for t in types),
             "layer_types must be a non-empty tuple of torch.nn.Module classes"),
            (_is_real(self.count_weight) and 0 < self.count_weight < 1, f"count_weight must be in (0, 1), got {self.count_weight!r}"),
            (_is_real(self.var_floor) and self.var_floor >= 0, f"var_floor must be a finite number >= 0, got {self.var_floor!r}"),
        ]


# --- calibration and the record ------------------------------------------------------------------


def _epsilon_of(sigma: float, cfg: FeatureStatsConfig) -> float:
    with quiet_accountant():
        return compute_epsilon(cfg.accountant, ((sigma, 1.0, 1),), cfg.delta)


def calibrate_noise_multiplier(cfg: FeatureStatsConfig) -> float:
    """Noise multiplier of one Gaussian release (sample rate 1, one step) that spends at most ``cfg.epsilon``.

    Opacus searches with its own defaults; the result is then checked with the
    pinned settings the verifier uses and raised slightly if they disagree.

    Args:
        cfg: the budget (``epsilon``, ``delta``) and ``accountant``.

    Returns:
        ``sigma``; the noise standard deviation is ``sigma * cfg.clip_norm``.

    Raises:
        PrivacyError: the accountant cannot certify this budget (e.g. epsilon far below 1
            with "rdp", or a huge epsilon needing ``sigma`` below the verifier's range).
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with quiet_accountant():
            sigma = float(get_noise_multiplier(target_epsilon=cfg.epsilon, target_delta=cfg.delta,
                                               sample_rate=1.0, steps=1, accountant=cfg.accountant))
    except (ValueError, RuntimeError, ArithmeticError) as e:
        raise PrivacyError(f"cannot calibrate noise for epsilon {cfg.epsilon:g} at delta {cfg.delta:g} "
                           f"with the {cfg.accountant} accountant: {e}",
                           hint=_calibration_hint(cfg)) from e
    for _ in range(_SIGMA_BUMPS):
        if _epsilon_of(sigma, cfg) <= cfg.epsilon:
            return sigma
        sigma *= 1.01
    raise PrivacyError(f"the pinned {cfg.accountant} accountant does not confirm epsilon {cfg.epsilon:g} near sigma {sigma:g}",
                       hint="try the other accountant")


def _calibration_hint(cfg: FeatureStatsConfig) -> str:
    if cfg.epsilon < 1:  # RDP's conversion cannot certify a small epsilon for one Gaussian release
        return "choose a larger epsilon, or the 'prv' accountant"
    return "choose a smaller epsilon (the noise would be negligible anyway), or the 'rdp' accountant"


def _dp_record(sigma: float, cfg: FeatureStatsConfig) -> DpRecord:
    from opacus.accountants import create_accountant

    if not cfg.dataset_fingerprint:
        raise ConfigError("dataset_fingerprint is required for DP feature statistics",
                          hint="use the fingerprint of the training records, so the policy composes both budgets")
    accountant = create_accountant(cfg.accountant)
    accountant.history = [(sigma, 1.0, 1)]  # one Gaussian release over every record
    with quiet_accountant():
        return dp_record_from_opacus(accountant, delta=cfg.delta, max_grad_norm=cfg.clip_norm, sampling=SAMPLING,
                                     dataset_fingerprint=cfg.dataset_fingerprint)


# --- per-sample contributions --------------------------------------------------------------------


def norm_layer_names(model: nn.Module, layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES) -> list[str]:
    """Names (``model.named_modules()`` order) of the layers whose inputs are summarised.

    Pass the plain model, not an Opacus ``GradSampleModule`` (its names gain ``_module.``).
    """
    return [name for name, module in model.named_modules() if isinstance(module, layer_types)]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no batch mixing: each sample's contribution is its own), then every module's mode restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def _captured_inputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())

    def recorder(store: list[torch.Tensor]) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        return lambda module, args: store.append(args[0].detach())

    handles = [modules[name].register_forward_pre_hook(recorder(captured[name])) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _layer_inputs(model: nn.Module, images: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    with _captured_inputs(model, names) as captured, torch.no_grad():
        model(images)
    for name, calls in captured.items():
        if len(calls) != 1:
            raise ValueError(f"layer {name!r} ran {len(calls)} times in one forward pass; its input statistics are ambiguous")
    return {name: captured[name][0] for name in names}


def _per_sample_moments(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, _Layout]:
    """Per-sample, per-channel spatial mean and mean of squares: ``(B, 2 * sum C_L)`` float64 on the CPU."""
    parts: list[torch.Tensor] = []
    layout: _Layout = []
    for name, x in inputs.items():
        x = x.float().reshape(x.shape[0], x.shape[1], -1)  # (B, C_L, *spatial) -> (B, C_L, P)
        # float32 on the model's device (a float64 copy of a 224 px activation would not fit); the
        # per-sample means are accurate to ~1e-7 relative, and all sums over samples are float64.
        parts += [x.mean(dim=2), x.square().mean(dim=2)]  # 2 x (B, C_L)
        layout.append((name, x.shape[1]))
    return torch.cat(parts, dim=1).to("cpu", torch.float64), layout


def _clip_with_count(features: torch.Tensor, cfg: FeatureStatsConfig) -> torch.Tensor:
    """``(B, D)`` -> ``(B, 1 + D)``: ``[c, features clipped to r]``, so every row has norm <= clip_norm."""
    radius = cfg.clip_norm * math.sqrt(1.0 - cfg.count_weight**2)
    # A non-finite row would escape the bound; zeros are data-independent (an error would not be).
    features = torch.where(torch.isfinite(features).all(dim=1, keepdim=True), features, torch.zeros_like(features))
    norms = features.norm(dim=1, keepdim=True)  # (B, 1)
    scale = (radius / norms).clamp(max=1.0)  # norm 0 -> inf -> 1
    count = torch.full_like(norms, cfg.count_weight * cfg.clip_norm)  # (B, 1)
    return torch.cat([count, features * scale], dim=1)


def _selected_layers(model: nn.Module, layer_types: tuple[type[nn.Module], ...]) -> list[str]:
    names = norm_layer_names(model, layer_types)
    if not names:
        raise ValueError(f"the model has no layers of types {[t.__name__ for t in layer_types]}")
    return names


def contribution_vectors(model: nn.Module, images: torch.Tensor, cfg: FeatureStatsConfig) -> torch.Tensor:
    """The clipped contributions ``v_i = [c, clip(f_i)]`` of a batch (see the module docstring).

    Args:
        model: the classifier (run in eval mode here; its modes are restored).
        images: ``(B, channels, H, W)`` on the model's device.
        cfg: clipping and layer selection.

    Returns:
        ``(B, 1 + 2 * sum C_L)`` float64 on the CPU, every row of L2 norm <= ``cfg.clip_norm``.

    Raises:
        ValueError: no selected layer, or a selected layer runs other than once per forward pass.
    """
    names = _selected_layers(model, cfg.layer_types)
    with _eval_mode(model):
        moments, _ = _per_sample_moments(_layer_inputs(model, images, names))
    return _clip_with_count(moments, cfg)


# --- sums over the dataset -----------------------------------------------------------------------


def _batches(dataset: Dataset[Any] | torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    """Image batches from an image tensor, or a dataset of images or ``(image, label, ...)`` items."""
    if isinstance(dataset, torch.Tensor):
        return dataset.split(batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return (batch[0] if isinstance(batch, (list, tuple)) else batch for batch in loader)


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _summed(model: nn.Module, dataset: Dataset[Any] | torch.Tensor, names: Sequence[str], batch_size: int,
            per_sample: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, int, _Layout]:
    """``sum_i per_sample(moments_i)`` in float64, the number of samples, and the layout of the moments."""
    total: torch.Tensor | None = None
    count, layout = 0, []
    device = _device_of(model)
    with _eval_mode(model):
        for images in _batches(dataset, batch_size):
            moments, layout = _per_sample_moments(_layer_inputs(model, images.to(device), names))
            rows = per_sample(moments)  # (B, D')
            total = rows.sum(dim=0) if total is None else total + rows.sum(dim=0)
            count += rows.shape[0]
    if total is None or count == 0:
        raise ValueError("the dataset is empty")
    return total, count, layout


def _statistics(sums: torch.Tensor, count: float, layout: _Layout, var_floor: float) -> dict[str, torch.Tensor]:
    """Per-layer ``.mean`` and ``.var`` (float32) from summed ``[m_L, s_L]`` blocks and a record count."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, channels in layout:
        mean = sums[offset:offset + channels] / count
        mean_square = sums[offset + channels:offset + 2 * channels] / count
        out[f"{name}.mean"] = mean.to(torch.float32)
        out[f"{name}.var"] = (mean_square - mean.square()).clamp(min=var_floor).to(torch.float32)
        offset += 2 * channels
    return out


def true_feature_statistics(model: nn.Module, dataset: Dataset[Any] | torch.Tensor,
                            layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
                            batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Exact per-channel mean and (biased) variance of each selected layer's input, with no noise.

    For tests and the site's own diagnostics only: these are not private and must never leave the site.

    Args:
        model: the classifier (run in eval mode here; its modes are restored).
        dataset: an image tensor ``(N, channels, H, W)`` or a dataset of images or ``(image, label)``.
        layer_types: which layers' inputs to summarise.
        batch_size: forward-pass batch size.

    Returns:
        ``{"<layer>.mean": (C_L,), "<layer>.var": (C_L,)}``, float32, pooled over samples and positions.

    Raises:
        ValueError: empty dataset, no selected layer, or a layer that runs other than once per forward.
    """
    names = _selected_layers(model, layer_types)
    sums, count, layout = _summed(model, dataset, names, batch_size, lambda moments: moments)
    return _statistics(sums, float(count), layout, 0.0)


def _gaussian_noise(size: int, std: float, seed: int | None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(64))
    return torch.randn(size, generator=generator, dtype=torch.float64) * std


def dp_feature_statistics(model: nn.Module, dataset: Dataset[Any] | torch.Tensor,
                          cfg: FeatureStatsConfig) -> tuple[dict[str, torch.Tensor], DpRecord]:
    """Release the selected layers' input mean and variance with ``(cfg.epsilon, cfg.delta)``-DP.

    Args:
        model: the classifier, fixed before this release (run in eval mode here; modes restored).
        dataset: an image tensor ``(N, channels, H, W)`` or a dataset of images or ``(image, label)``.
        cfg: budget, clipping norm, layer selection, noise seed.

    Returns:
        ``({"<layer>.mean": (C_L,), "<layer>.var": (C_L,)}`` float32, the record ``verify_claim`` accepts).

    Raises:
        ConfigError: ``cfg.dataset_fingerprint`` is empty (checked before any data is read).
        PrivacyError: the budget cannot be certified, or the fingerprint is malformed.
        ValueError: empty dataset, no selected layer, or a layer that runs other than once per forward.
    """
    if cfg.seed is not None:
        warnings.warn("a fixed seed makes the DP noise reproducible: whoever knows it can remove the noise; "
                      "use seed=None outside tests", UnsafeFixedSeedWarning, stacklevel=2)
    sigma = calibrate_noise_multiplier(cfg)
    record = _dp_record(sigma, cfg)
    names = _selected_layers(model, cfg.layer_types)
    sums, _, layout = _summed(model, dataset, names, cfg.batch_size, lambda moments: _clip_with_count(moments, cfg))
    noisy = sums + _gaussian_noise(sums.shape[0], sigma * cfg.clip_norm, cfg.seed)  # (1 + D,)
    count = max(float(noisy[0]) / (cfg.count_weight * cfg.clip_norm), 1.0)  # post-processing: n~ >= 1
    return _statistics(noisy[1:], count, layout, cfg.var_floor), record
