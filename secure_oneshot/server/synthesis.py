"""FedISCA model inversion: synthesize a batch of images from the site models alone.

One call of :func:`synthesize_batch` is one epoch's synthesis in the authors'
code: ``x ~ N(0, I)``, balanced target labels, a fresh Adam on the pixels, and
``steps`` steps of

    loss = CE(teacher(jitter(x)), y) + bn_weight * BN loss + tv_weight * TV(jitter(x))
           [ - adv_weight * KD(student, teacher) on jitter(x), only with a student ]

with ``jitter`` a random roll of +/- ``jitter`` pixels and TV the sum of the L2
norms of the four neighbour differences (as the authors compute it).  Every
``snapshot_every`` steps the caller gets a copy of the batch (noise ->
realistic), on the device.

BN loss (:class:`BNStatHooks`).  For each site and each matched layer, the
distance ``||mu_batch - mean||_2 + ||var_batch - var||_2`` between the
per-channel statistics of the layer's *input* on the jittered batch and a
target: the layer's running statistics for a BatchNorm layer, or the site's
released feature statistics (:mod:`secure_oneshot.client.feature_stats`) for
a layer named there (they take precedence, so they also serve BatchNorm
models whose running statistics were not released).  Each site's distances are
averaged over its layers, so a deeper site does not dominate, and the sum over
sites is multiplied by the mean layer count ``L``: for sites of one
architecture this is exactly the authors' plain sum over every layer of every
site, so ``bn_weight = 10`` keeps its meaning.

BN-free sites (GroupNorm, e.g. DP-trained) without feature statistics give
an empty BN loss, and CE + TV alone is a much weaker prior.  Then a *student*
may be passed: the batch is also pushed towards images on which the student
and the teacher disagree (data-free adversarial distillation, as in DFAD and
DENSE): ``- adv_weight * KL(p_teacher^T || p_student^T)`` -- the same
divergence the student minimises in :func:`~secure_oneshot.server.distill.kd_loss`
(T = 1 here), averaged over the images on which both still predict the same
class (DENSE's mask, which keeps the images on their target class).  With
neither statistics nor a student, :func:`synthesize_batch` refuses unless
``allow_ce_only=True``.

Multi-label sites (``InversionConfig.multi_label``): the targets are label
vectors, each label 0 for one half of the batch and 1 for the other (a random
half per label, seeded: :func:`balanced_label_vectors`), CE becomes binary
cross-entropy on the teacher's pooled per-label probabilities
(:meth:`~secure_oneshot.server.ensemble.Ensemble.pool`), and the adversarial
term is the per-label binary KL, masked per label where student and teacher
agree on the side of 0.5.

What this module does not do: keep snapshots (the caller decides), train the
student, or touch disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError
from .bn_moments import batch_moments
from .ensemble import Ensemble, batching_for
from .execution import Execution

__all__ = [
    "BNStatHooks",
    "FeatureStats",
    "InversionConfig",
    "balanced_label_vectors",
    "balanced_labels",
    "jitter",
    "normalize_feature_stats",
    "synthesize_batch",
    "binary_kl",
    "total_variation",
]

FeatureStats = Mapping[str, Any]
"""One site's released statistics: ``{"<layer>.mean": t, "<layer>.var": t}`` (as saved in
``feature_stats.safetensors``) or ``{"<layer>": {"mean": t, "var": t}}``."""


@dataclass(frozen=True)
class InversionConfig:
    """One epoch's model inversion (the authors' defaults at 28 px).

    ``snapshot_every = k`` hands every k-th intermediate batch to the caller
    (``steps // k`` snapshots): at 28 px, 256 images x 500 steps in float32 is
    about 400 MB on the device; at 224 px x 3 channels x 1000 steps it would be
    about 150 GB, so raise ``k`` there.

    Raises:
        ConfigError: listing every invalid field.
    """

    batch_size: int = 256
    steps: int = 500
    lr: float = 0.05
    bn_weight: float = 10.0
    tv_weight: float = 2.5e-5
    jitter: int = 2
    snapshot_every: int = 1
    seed: int = 0
    image_size: int = 28
    channels: int = 1
    num_classes: int = 2
    adv_weight: float = 1.0          # only used when a student is passed (BN-free sites)
    multi_label: bool = False        # targets are 0/1 vectors over num_classes labels (module docstring)

    def __post_init__(self) -> None:
        positive = ("batch_size", "steps", "snapshot_every", "image_size", "channels", "num_classes")
        problems = [f"{name} must be an integer >= 1, got {getattr(self, name)!r}" for name in positive
                    if not _is_int(getattr(self, name)) or getattr(self, name) < 1]
        problems += [f"{name} must be a finite number >= 0, got {getattr(self, name)!r}"
                     for name in ("lr", "bn_weight", "tv_weight", "adv_weight") if not _non_negative(getattr(self, name))]
        if not _is_int(self.jitter) or not 0 <= self.jitter < self.image_size:
            problems.append(f"jitter must be an integer in [0, image_size), got {self.jitter!r}")
        if not _is_int(self.seed):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.multi_label, bool):
            problems.append(f"multi_label must be true or false, got {self.multi_label!r}")
        if problems:
            raise ConfigError("invalid inversion config: " + "; ".join(problems))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _non_negative(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


# --- the prior: statistics of normalisation-layer inputs ------------------------------------------


def normalize_feature_stats(stats: FeatureStats) -> dict[str, dict[str, Tensor]]:
    """Either released layout -> ``{layer: {"mean": (C,), "var": (C,)}}``.

    Raises:
        ValueError: a layer lacks its mean or its variance.
    """
    nested: dict[str, dict[str, Tensor]] = {}
    for key, value in stats.items():
        if isinstance(value, Mapping):
            nested.setdefault(key, {}).update({k: value[k] for k in ("mean", "var") if k in value})
        else:
            layer, _, stat = key.rpartition(".")
            nested.setdefault(layer, {})[stat] = value
    for layer, pair in nested.items():
        if set(pair) != {"mean", "var"}:
            raise ValueError(f"feature statistics of layer {layer!r} need exactly 'mean' and 'var', got {sorted(pair)}")
    return nested


class BNStatHooks:
    """Forward pre-hooks on the normalisation layers of every site: the per-site statistics loss.

    Matched layers per site: every BatchNorm layer that tracks running statistics, plus every
    layer named in that site's ``feature_stats`` (whose targets then replace the running
    statistics).  See the module docstring for the normalisation.  Use as a context manager,
    or call :meth:`remove`.

    Args:
        ensemble: the teacher; hooks go on :meth:`Ensemble.hook_groups` (mixed architectures: each group's own).
        feature_stats: ``None``, or one entry per site (``None`` for a site without any).

    Raises:
        ValueError: wrong number of entries, a named layer the model lacks, or statistics that do
            not name the same layers for every site of a batched group.
    """

    def __init__(self, ensemble: Ensemble, feature_stats: Sequence[FeatureStats | None] | None = None) -> None:
        if feature_stats is not None and len(feature_stats) != ensemble.num_sites:
            raise ValueError(f"{len(feature_stats)} feature-statistics entries for {ensemble.num_sites} sites")
        stats = [normalize_feature_stats(s) if s else {} for s in (feature_stats or [None] * ensemble.num_sites)]
        self.ensemble = ensemble
        self.targets: list[dict[str, dict[str, Tensor]]] = stats
        self._records: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None, str]] = []
        self._handles: list[RemovableHandle] = []
        self._device = torch.device("cpu")
        self._cached: list[dict[str, dict[str, Tensor]]] = []
        self._cached_device: torch.device | None = None
        self.layer_counts = self._register(stats)

    def _register(self, stats: list[dict[str, dict[str, Tensor]]]) -> list[int]:
        """Hooks on each module that runs (a batched group's skeleton serves all its sites); layer count per site."""
        counts = [0] * self.ensemble.num_sites
        for module, sites in self.ensemble.hook_groups():
            if any(set(stats[s]) != set(stats[sites[0]]) for s in sites):
                raise ValueError("feature statistics must name the same layers for every site of a batched group "
                                 "(or build the Ensemble with batched=False)")
            layers = self._hook_module(module, stats[sites[0]])
            for s in sites:
                counts[s] = layers
        return counts

    def _hook_module(self, model: nn.Module, stats: dict[str, dict[str, Tensor]]) -> int:
        named = dict(model.named_modules())
        unknown = sorted(set(stats) - set(named))
        if unknown:
            raise ValueError(f"feature statistics name layers the model lacks: {unknown[:5]}")
        layers = [name for name, m in named.items() if name in stats or tracks_running_stats(m)]
        for name in layers:
            self._handles.append(named[name].register_forward_pre_hook(self._recorder(name)))
        return len(layers)

    def _recorder(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            mean, var = batch_moments(args[0])
            running = (module.running_mean, module.running_var) if tracks_running_stats(module) else (None, None)
            self._records.append((mean, var, *running, name))
        return record

    @property
    def active(self) -> bool:
        """Whether any site has a layer to match (False for BN-free sites without statistics)."""
        return sum(self.layer_counts) > 0

    def site_loss(self, targets: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
        """The probe: mean over the layers just recorded (one site's pass) of the two distances."""
        records, self._records = self._records, []
        if not records:
            return torch.zeros((), device=self._device)
        terms = []
        for mean, var, running_mean, running_var, name in records:
            t_mean, t_var = (targets[name]["mean"], targets[name]["var"]) if name in targets else (running_mean, running_var)
            terms.append(torch.linalg.vector_norm(mean - t_mean) + torch.linalg.vector_norm(var - t_var))
        return torch.stack(terms).mean()

    def site_losses(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-site logits ``(S, N, K)`` and per-site losses ``(S,)`` (each the mean over its layers; 0 without any)."""
        self._records.clear()
        self._device = x.device
        logits, losses = self.ensemble.per_site(x, self.site_loss, self._device_targets(x.device))
        return logits, losses  # type: ignore[return-value]

    def weighted(self, site_losses: Tensor) -> Tensor:
        """``L * sum(site_losses)``, ``L`` the mean layer count over sites with layers (the authors' sum when homogeneous)."""
        counts = [c for c in self.layer_counts if c > 0]
        return site_losses.sum() * (sum(counts) / len(counts) if counts else 0.0)

    def per_site(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-site logits ``(S, N, K)`` and the weighted BN loss (a scalar; 0 when inactive)."""
        logits, losses = self.site_losses(x)
        return logits, self.weighted(losses)

    def _device_targets(self, device: torch.device) -> list[dict[str, dict[str, Tensor]]]:
        """The targets on ``device`` (copied once per device, not every step)."""
        if self._cached_device != device:
            self._cached = [{layer: {k: v.to(device, torch.float32) for k, v in pair.items()} for layer, pair in site.items()}
                            for site in self.targets]
            self._cached_device = device
        return self._cached

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> BNStatHooks:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()


def tracks_running_stats(module: nn.Module) -> bool:
    """A BatchNorm layer with running statistics to match (not one whose statistics were withheld)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None


# --- the other loss terms ------------------------------------------------------------------------


def balanced_labels(batch_size: int, num_classes: int, device: str | torch.device = "cpu") -> Tensor:
    """``arange(batch) % classes``: every class equally often (up to one)."""
    return torch.arange(batch_size, device=device) % num_classes


def balanced_label_vectors(batch_size: int, num_labels: int, generator: torch.Generator,
                           device: str | torch.device = "cpu") -> Tensor:
    """``(batch, L)`` float 0/1 targets: for each label, 1 on a random half of the batch (``batch // 2`` images)."""
    halves = (torch.arange(batch_size) < batch_size // 2).float()
    columns = [halves[torch.randperm(batch_size, generator=generator)] for _ in range(num_labels)]
    return torch.stack(columns, dim=1).to(device)


def total_variation(x: Tensor) -> Tensor:
    """Sum of the L2 norms of the horizontal, vertical and both diagonal neighbour differences."""
    diffs = (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
             x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:])
    return sum(torch.linalg.vector_norm(d) for d in diffs)  # type: ignore[return-value]


def jitter(x: Tensor, limit: int, generator: torch.Generator) -> Tensor:
    """Roll the images by a random offset in ``[-limit, limit]`` along each spatial axis (one offset per batch)."""
    if limit == 0:
        return x
    dy, dx = (torch.randint(-limit, limit + 1, (2,), generator=generator)).tolist()  # CPU generator: no device sync
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def _adversarial(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Masked ``KL(p_teacher || p_student)`` (T = 1) on the images where both predict the same class."""
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()  # (N,)
    kl = F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1), reduction="none", log_target=True)
    return (kl.sum(dim=1) * agree).mean()


def _adversarial_multi_label(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-label binary ``KL(p_teacher || p_student)`` (T = 1), masked per label where both are on the same side of 0.5."""
    agree = ((student_logits > 0) == (teacher_logits > 0)).float()  # (N, L)
    kl = binary_kl(student_logits, teacher_logits, 1.0)
    return (kl * agree).sum(dim=1).mean()


def binary_kl(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """``(N, L)``: each label's ``KL(Bernoulli(sigmoid(t/T)) || Bernoulli(sigmoid(s/T)))``."""
    log_ps, log_qs = F.logsigmoid(student_logits / T), F.logsigmoid(-student_logits / T)   # log p, log (1 - p)
    log_pt, log_qt = F.logsigmoid(teacher_logits / T), F.logsigmoid(-teacher_logits / T)
    return log_pt.exp() * (log_pt - log_ps) + log_qt.exp() * (log_qt - log_qs)


def _inversion_losses(hooks: BNStatHooks, x: Tensor, y: Tensor, cfg: InversionConfig,
                      student: nn.Module | None) -> dict[str, Tensor]:
    logits, bn = hooks.per_site(x)
    teacher = hooks.ensemble.pool(logits.float())  # (S, N, K) -> (N, K), float32 whatever the autocast
    ce = F.binary_cross_entropy_with_logits(teacher, y) if cfg.multi_label else F.cross_entropy(teacher, y)
    losses = {"ce": ce, "bn": bn, "tv": total_variation(x)}
    total = losses["ce"] + cfg.bn_weight * bn + cfg.tv_weight * losses["tv"]
    if student is not None:
        adversarial = _adversarial_multi_label if cfg.multi_label else _adversarial
        losses["adv"] = adversarial(student(x).float(), teacher)
        total = total - cfg.adv_weight * losses["adv"]
    losses["total"] = total
    return losses


# --- the loop ------------------------------------------------------------------------------------


class _Frozen:
    """Eval mode and no parameter gradients for the duration; both restored after."""

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module
        self.state: list[tuple[Any, bool]] = []

    def __enter__(self) -> None:
        if self.module is None:
            return
        self.state = [(m, m.training) for m in self.module.modules()] + [(p, p.requires_grad) for p in self.module.parameters()]
        self.module.eval().requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for obj, flag in self.state:
            if isinstance(obj, nn.Module):
                obj.training = flag
            else:
                obj.requires_grad_(flag)


def _check_prior(hooks: BNStatHooks, student: nn.Module | None, allow_ce_only: bool) -> None:
    if not hooks.active and student is None and not allow_ce_only:
        raise ValueError("the site models have no BatchNorm running statistics and no feature statistics were given: "
                         "BN-free models need feature statistics or a student for the adversarial term "
                         "(or pass allow_ce_only=True to synthesize with CE + TV alone)")


def synthesize_batch(models: Sequence[nn.Module], ensemble: Ensemble | None, cfg: InversionConfig, *,
                     execution: Execution | None = None,
                     on_snapshot: Callable[[int, Tensor], None] | None = None,
                     on_loss: Callable[[int, dict[str, Tensor]], None] | None = None,
                     feature_stats: Sequence[FeatureStats | None] | None = None,
                     student: nn.Module | None = None,
                     allow_ce_only: bool = False) -> tuple[Tensor, Tensor]:
    """Invert the site models into one batch of images (one epoch of FedISCA synthesis).

    Args:
        models: the site classifiers.
        ensemble: their :class:`Ensemble` (built from ``models`` when ``None``); moved to the device.
        cfg: the inversion settings.
        execution: device, precision and layout (:class:`Execution`; ``auto`` everything by default).
        on_snapshot: called every ``cfg.snapshot_every`` steps with (steps done, a *copy* of the
            batch on the device: Adam updates ``x`` in place, so a view would change afterwards).
        on_loss: called every step with (steps done, the detached loss terms on the device: no sync).
        feature_stats: per-site released feature statistics (see :class:`BNStatHooks`).
        student: enables the adversarial term (see the module docstring); left unchanged.
        allow_ce_only: accept BN-free sites with neither statistics nor a student.

    Returns:
        ``(x, y)``: the final images ``(batch, C, H, W)`` and balanced labels ``(batch,)`` (multi-label:
        ``(batch, L)`` 0/1 float vectors), on ``device``.

    Raises:
        ValueError: BN-free sites with neither statistics nor a student (unless ``allow_ce_only``).
    """
    execution = (execution or Execution()).for_models(models)
    if ensemble is None:
        ensemble = Ensemble(models, batched=batching_for(execution.use_batched, models), multi_label=cfg.multi_label)
    if ensemble.multi_label != cfg.multi_label:
        raise ValueError("the ensemble and the inversion config disagree on whether the task is multi-label")
    ensemble = execution.prepare(ensemble)
    if ensemble.num_sites != len(models):
        raise ValueError(f"the ensemble has {ensemble.num_sites} sites but {len(models)} models were given")
    x, y, shifts = _initial_batch(cfg, execution.torch_device)
    optimizer = torch.optim.Adam([x], lr=cfg.lr)  # fresh state every call, as the authors reset it per epoch
    with BNStatHooks(ensemble, feature_stats) as hooks, _Frozen(student):
        _check_prior(hooks, student, allow_ce_only)
        for step in range(1, cfg.steps + 1):
            with execution.autocast():
                losses = _inversion_losses(hooks, execution.layout(jitter(x, cfg.jitter, shifts)), y, cfg, student)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            if on_loss is not None:
                on_loss(step, {k: v.detach() for k, v in losses.items()})
            if on_snapshot is not None and step % cfg.snapshot_every == 0:
                on_snapshot(step, x.detach().clone())
    return x.detach(), y


def _initial_batch(cfg: InversionConfig, device: str | torch.device) -> tuple[Tensor, Tensor, torch.Generator]:
    """``x ~ N(0, I)`` (seeded on the device), balanced labels, and the CPU generator of jitter offsets."""
    noise = torch.Generator(device=device).manual_seed(cfg.seed)
    shape = (cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    x = torch.randn(shape, generator=noise, device=device).requires_grad_(True)
    shifts = torch.Generator().manual_seed(cfg.seed)
    if cfg.multi_label:
        targets = balanced_label_vectors(cfg.batch_size, cfg.num_classes, torch.Generator().manual_seed(cfg.seed + 1), device)
        return x, targets, shifts
    return x, balanced_labels(cfg.batch_size, cfg.num_classes, device), shifts
