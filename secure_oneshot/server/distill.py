"""FedISCA knowledge distillation: train a global student on the snapshots of model inversion.

Per epoch (:func:`distill`):

1. synthesize a fresh batch (:func:`~secure_oneshot.server.synthesis.synthesize_batch`),
   keeping every ``synth.snapshot_every``-th intermediate batch
   (noise -> realistic; ``snapshot_every = 1`` is the authors' "every snapshot").
   Memory: the kept snapshots go to a
   :class:`~secure_oneshot.server.snapshot_store.SnapshotStore`.  While the
   epoch's images fit ``snapshot_memory_mib`` (default 2,048 MiB: every 28 px
   preset, e.g. 256 x 3 x 28 x 28 float32 x 500 steps = 1.2 GB) they stay on
   the device as they were made; beyond it (224 px: 50 x 3 x 224 x 224 float32
   x 1,000 steps = 30 GB) they go to a private temporary file, removed at the
   end of the epoch, and every pass below reads back one snapshot (or one
   replay chunk) at a time, so memory does not grow with the inversion steps.
   Spilled or not, every pass sees bit for bit the same tensors;
2. for snapshot ``i`` of ``n``: ``loss = a * KD(student, teacher) + (1 - a) *
   KD(student, noise-adapted teacher)``, ``a = i / n``, one SGD step each, with
   ``KD`` = :func:`kd_loss` at temperature ``T``;
3. the learning rate drops x0.1 at each milestone (fractions of ``epochs``), at the milestone epoch itself
   counted from 1, as the published loop does (:func:`learning_rate`).

Noise-adapted teacher (``DistillConfig.noise_adapted``):

* ``"train-mode"`` (faithful): a copy of the site models whose BatchNorm layers
  run in train mode, so they normalise each snapshot with that snapshot's own
  statistics (and update their running statistics, which train mode never
  reads).  The authors also run a no-grad pass over the snapshots (last to
  first) before distilling; in train mode its only effect is on those unread
  running statistics, so it is skipped here.
* ``"eval"``: the same copy, but its running statistics are refreshed by that
  pass (last to first, default BN momentum) and it then runs in eval mode:
  it normalises with statistics adapted to the (mostly noisy) snapshots.
* ``"none"``: plain KD from the teacher (``a = 1`` throughout).

Site models without BatchNorm (GroupNorm, DP-trained) have nothing to adapt:
the noise-adapted teacher would be the teacher itself, so the teacher's logits
are reused and the loss is plain KD.  Batches of realistic images (proxy and
generator batches, ``a = 1`` for every image) give the noise-adapted teacher
weight 0, so it does not run on them: the loss and its gradient are the same.

Student BatchNorm statistics (``DistillConfig.recalibrate_bn``, an addition to
the method, off by default): the student trains in train mode on every
snapshot, so its running statistics (used at evaluation) average over noise
and realistic images alike.  With ``recalibrate_bn = f > 0`` they are
re-estimated after each epoch as the plain average over the last fraction
``f`` of that epoch's snapshots -- the realistic end.  Measured with the cpu
preset on 5 non-IID PneumoniaMNIST sites, epochs 9-13: test ACC 0.832-0.849
with ``f = 0.25`` against 0.803-0.846 without, AUC unchanged (0.96).

Multi-label sites (``synth.multi_label``): the teacher averages the sites'
per-label probabilities, and ``KD`` is the per-label binary KL between
``sigmoid(t/T)`` and ``sigmoid(s/T)``, summed over labels, times ``T**2``
(:func:`per_image_kd` with ``multi_label=True``).

The returned student is the **last** epoch's: no model selection on a test set
(the authors select on the test set).  ``eval_set`` only reports metrics.

Checkpoints (:class:`TrainingState`): ``resume`` may restore the state of an
earlier run before the first epoch (and say from which epoch to go on), and
``on_epoch_end`` sees the state after every epoch, on every process of a
distributed run; :mod:`~secure_oneshot.server.checkpoint` saves and restores it.
Everything else an epoch depends on is recomputed from the seeds: each epoch's
synthesis is seeded by the run seed and the epoch, the teachers never change
(except the noise-adapted teacher's BatchNorm statistics, which are part of the
state).

What this module does not do: load bundles, write files, or choose data.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .._internal.schedule import rate_factor
from ..errors import ConfigError
from ..metrics import evaluate_model
from .calibration import calibrate_for_synthesis
from .ensemble import Ensemble, batching_for
from .execution import Execution
from .snapshot_store import DEFAULT_SNAPSHOT_MEMORY_MIB, SnapshotStore
from .sources import SiteGenerator, Snapshot, SnapshotSource, SynthesisMethod
from .synthesis import FeatureStats, InversionConfig, binary_kl

__all__ = ["NOISE_ADAPTED", "DistillConfig", "DistillResult", "TrainingState", "distill", "kd_loss", "per_image_kd", "learning_rate",
           "recalibrate_bn", "student_norm"]

NOISE_ADAPTED = ("train-mode", "eval", "none")


@dataclass(frozen=True)
class DistillConfig:
    """The student's training (the authors' defaults).

    Raises:
        ConfigError: listing every invalid field.
    """

    epochs: int = 100
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.5, 0.75)   # fractions of epochs: lr x 0.1 from 1-based epoch round(m * epochs) on
    temperature: float = 20.0
    noise_adapted: str = "train-mode"             # "train-mode" | "eval" | "none" (module docstring)
    recalibrate_bn: float = 0.0                   # > 0: re-estimate the student's BN statistics on this last fraction
    seed: int = 0                                 #      of each epoch's snapshots (module docstring; not in the method)

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}"),
            (all(_number(v) and v >= 0 for v in (self.lr, self.momentum, self.weight_decay)),
             "lr, momentum and weight_decay must be numbers >= 0"),
            (isinstance(self.milestones, tuple) and all(_number(m) and 0 <= m <= 1 for m in self.milestones),
             f"milestones must be a tuple of fractions in [0, 1], got {self.milestones!r}"),
            (_number(self.temperature) and self.temperature > 0, f"temperature must be > 0, got {self.temperature!r}"),
            (self.noise_adapted in NOISE_ADAPTED, f"noise_adapted must be one of {list(NOISE_ADAPTED)}, got {self.noise_adapted!r}"),
            (isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (_number(self.recalibrate_bn) and 0 <= self.recalibrate_bn <= 1,
             f"recalibrate_bn must be a fraction in [0, 1], got {self.recalibrate_bn!r}"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ConfigError("invalid distillation config: " + "; ".join(problems))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class DistillResult:
    """The last epoch's student and one record per epoch (``epoch``, ``lr``, ``loss``, and metrics)."""

    student: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainingState:
    """What an epoch boundary leaves behind: with the seeds, enough to continue the run exactly.

    ``epochs_done`` epochs are finished; ``last_images`` is the last epoch's last (most realistic) synthetic batch
    of this process (``None`` before the first epoch).
    """

    epochs_done: int
    history: list[dict[str, float]]
    student: nn.Module
    optimizer: torch.optim.Optimizer
    adapted: Ensemble | None
    last_images: Tensor | None = None


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """``KL(softmax(t/T) || softmax(s/T)) * T**2``, averaged over the batch (the authors' ``KLDiv``)."""
    return per_image_kd(student_logits, teacher_logits, T).mean()


def per_image_kd(student_logits: Tensor, teacher_logits: Tensor, T: float, multi_label: bool = False) -> Tensor:
    """``(N,)``: each image's ``KL(softmax(t/T) || softmax(s/T)) * T**2`` (multi-label: the per-label binary KL of
    the sigmoids at ``T``, summed over labels, times ``T**2``)."""
    if multi_label:
        return binary_kl(student_logits, teacher_logits, T).sum(dim=1) * T * T
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1) * T * T


def learning_rate(cfg: DistillConfig, epoch: int) -> float:
    """The rate of 0-based ``epoch``, as the published loop sets it: ``cfg.lr`` x 0.1 from each 1-based milestone
    epoch ``round(m * cfg.epochs)`` on (epochs 1-49 at ``lr``, 50-74 at ``lr / 10``, 75-100 at ``lr / 100`` of 100;
    :mod:`~secure_oneshot._internal.schedule`)."""
    return cfg.lr * rate_factor(epoch, cfg.epochs, cfg.milestones)


def _has_bn(models: Sequence[nn.Module]) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for model in models for m in model.modules())


def student_norm(site_models: Sequence[nn.Module]) -> str:
    """The default student's normalisation: ``"batch"`` when a site uses BatchNorm, else ``"group"`` (as the sites).

    A GroupNorm site (DP-trained, Opacus's fix) normalises every image by its own statistics from the first layer
    on, so the images synthesized from it are constrained only up to what that normalisation removes, and they
    stay close to noise when no feature statistics are released.  A BatchNorm student trained on them reads
    exactly what the teacher ignores and extrapolates to real images in the wrong direction: measured with one
    DP PneumoniaMNIST site (small-cnn, epsilon 8; site AUC 0.909), KD on pure Gaussian noise gave a BatchNorm
    student test AUC 0.13 and a GroupNorm student 0.58; the cpu preset's distillation (3 epochs) gave
    AUC 0.15-0.61 (BatchNorm) against 0.62-0.71 (GroupNorm).  A student with the sites' normalisation shares
    their invariances, so what it learns on synthetic images transfers.
    """
    return "batch" if _has_bn(site_models) else "group"


def _adapted_teacher(site_models: Sequence[nn.Module], cfg: DistillConfig, execution: Execution,
                     weights: Tensor | None = None, multi_label: bool = False) -> Ensemble | None:
    """The noise-adapted copy, or ``None`` when it would equal the teacher (mode "none", or no BatchNorm)."""
    if cfg.noise_adapted == "none" or not _has_bn(site_models):
        return None
    batched = batching_for(execution.use_batched, site_models)
    return execution.prepare(Ensemble(site_models, adapt_bn=True, batched=batched, weights=weights, multi_label=multi_label))


@torch.no_grad()
def _refresh_running_stats(adapted: Ensemble, snapshots: Sequence[Snapshot], execution: Execution) -> None:
    """The authors' pass, last snapshot to first (real -> noise), then eval mode ("eval" variant)."""
    adapted.set_adapt_bn(True)
    for x, _ in reversed(snapshots):
        with execution.autocast():
            adapted(execution.layout(x))
    adapted.set_adapt_bn(False)


@torch.no_grad()
def recalibrate_bn(student: nn.Module, snapshots: Iterable[Snapshot], execution: Execution) -> None:
    """Replace the student's BatchNorm running statistics by their plain average over ``snapshots``."""
    layers = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes below
    mode = student.training
    student.train()
    for x, _ in snapshots:
        with execution.autocast():
            student(execution.layout(x))
    student.train(mode)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum


REPLAY_IMAGES = {"cpu": 128, "cuda": 1024}
"""Images per no-grad teacher pass over the epoch's snapshots (consecutive snapshots concatenated).

On CUDA, one 28 px snapshot of 64-256 images leaves the GPU idle between small kernels; on CPU a batch
of 64 already fills the caches (measured, 5 small-cnn sites, 1 thread, CPU time per snapshot:
one at a time 241 ms, two at a time 218 ms, eight 319 ms), so the CPU cap is small.
"""
REPLAY_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 24}
"""And at most this many input elements per pass: a pass's activations grow with its pixels, and the
epoch's memory must not grow with the number of snapshots.  On CPU the gain of several snapshots per pass
is in small images, so 1 << 19 keeps the 28 px and 64 px grey passes at 128 images and bounds a 224 px
pass to 10 grey or 3 RGB images (at least one snapshot); on CUDA 1 << 24 is about one 224 px snapshot."""


@torch.no_grad()
def _replay(teacher: Ensemble, snapshots: SnapshotStore, execution: Execution) -> list[Tensor]:
    """The float32 logits of an eval-mode ``teacher`` on each snapshot, several snapshots per pass.

    Eval mode makes every image's logits independent of the others in its batch, so the targets equal
    one pass per snapshot up to the float rounding of a different batch size.
    """
    sizes = snapshots.sizes
    per_image = snapshots.image_numel()
    cap = REPLAY_IMAGES.get(execution.torch_device.type, REPLAY_IMAGES["cpu"])
    elements = REPLAY_ELEMENTS.get(execution.torch_device.type, REPLAY_ELEMENTS["cpu"])
    cap = max(1, min(cap, elements // max(1, per_image)))
    logits: list[Tensor] = []
    start = 0
    while start < len(snapshots):
        stop, images = start + 1, sizes[start]
        while stop < len(snapshots) and images + sizes[stop] <= cap:
            images += sizes[stop]
            stop += 1
        chunk = snapshots.images(start, stop)   # only these snapshots are read back (one tensor)
        with execution.autocast():
            out = teacher(execution.layout(chunk)).float()
        logits += list(out.split(sizes[start:stop]))
        start = stop
    return logits


def _distill_epoch(student: nn.Module, teacher: Ensemble, adapted: Ensemble | None, snapshots: SnapshotStore,
                   optimizer: torch.optim.Optimizer, T: float, execution: Execution, multi_label: bool = False) -> Tensor:
    """One SGD step per snapshot; returns the mean loss (a device tensor: no sync per step).

    ``a`` (per image) weighs the teacher, ``1 - a`` the noise-adapted teacher: ``i / n`` for inversion snapshots
    (0 = noise -> 1 = realistic), 1 for generator samples (:mod:`~secure_oneshot.server.sources`).
    """
    student.train()
    total = torch.zeros((), device=execution.torch_device)
    targets = _replay(teacher, snapshots, execution)
    # Batches of realistic images (a = 1 for every image: proxy, generator) give the adapted teacher weight 0:
    # its pass is skipped, and the loss and its gradient are those of the pass with a 0 weight.
    needs_adapted = [adapted is not None and not snapshots.teacher_only(i) for i in range(len(snapshots))]
    # A train-mode adapted teacher normalises each snapshot by that snapshot's statistics: one pass per snapshot.
    adapted_targets = (_replay(adapted, snapshots, execution)
                       if adapted is not None and not adapted.adapt_bn and any(needs_adapted) else None)
    for i, (snapshot, a) in enumerate(snapshots):
        x = execution.layout(snapshot)
        t_logits = targets[i]
        with execution.autocast():
            n_logits: Tensor | None = None
            if needs_adapted[i]:
                assert adapted is not None
                if adapted_targets is not None:
                    n_logits = adapted_targets[i]
                else:
                    with torch.no_grad():
                        n_logits = adapted(x).float()
            s_logits = student(x).float()
        kd = per_image_kd(s_logits, t_logits, T, multi_label)
        loss = (kd if n_logits is None else a * kd + (1 - a) * per_image_kd(s_logits, n_logits, T, multi_label)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    return total / len(snapshots)


def distill(student: nn.Module, site_models: Sequence[nn.Module], synth: InversionConfig, cfg: DistillConfig, *,
            execution: Execution | None = None, eval_set: Dataset[Any] | None = None, progress: bool = False,
            on_epoch: Callable[[dict[str, float]], None] | None = None,
            feature_stats: Sequence[FeatureStats | None] | None = None, adversarial: bool = False,
            allow_ce_only: bool = False, method: SynthesisMethod | None = None,
            generators: Sequence[SiteGenerator] = (), teacher_weights: Tensor | None = None,
            proxy_images: Tensor | None = None, snapshot_memory_mib: float = DEFAULT_SNAPSHOT_MEMORY_MIB,
            resume: Callable[[TrainingState], None] | None = None, on_epoch_end: Callable[[TrainingState], None] | None = None,
            wrap_student: Callable[[nn.Module], nn.Module] | None = None) -> DistillResult:
    """Train ``student`` (in place) from the site models alone, FedISCA style.

    Args:
        student: the global model to train; moved to the device.
        site_models: the (verified) site classifiers; copied, never changed.
        synth: the per-epoch inversion (``snapshot_every`` thins the kept snapshots).
        cfg: the student's training.
        execution: device, precision, layout, batching (:class:`Execution`; ``auto`` by default).
        eval_set: a server-side dataset to report metrics on each epoch (never used to select).
        progress: print one line per epoch to stderr.
        on_epoch: called with each epoch's record.
        feature_stats, allow_ce_only: passed to :func:`synthesize_batch` (BN-free sites).
        adversarial: pass the student to synthesis for the adversarial term (BN-free sites).
        method: inversion (default), generator or mixed (:mod:`~secure_oneshot.server.sources`).
        generators: the sites' released generators (for ``generator`` and ``mixed``).
        teacher_weights: ``(sites, classes)`` per-class site weights for the teacher, the noise-adapted teacher
            and so the inversion (:class:`Ensemble`); ``None``: the plain mean of logits (the published method).
        proxy_images: public unlabelled images ``(N, C, H, W)`` in [-1, 1] on the CPU (for ``proxy`` and
            ``inversion+proxy``; :mod:`~secure_oneshot.data.proxy_images`).
        resume: called once before the first epoch with the fresh :class:`TrainingState`; it may load an earlier
            run's state into it (``epochs_done`` epochs are then skipped).
        on_epoch_end: called with the :class:`TrainingState` after each epoch (before ``on_epoch``).
        snapshot_memory_mib: an epoch's snapshots stay in memory up to this many MiB, beyond it they go to a
            private temporary file (step 1 of the module docstring); the result does not depend on it.
        wrap_student: wraps the student for its training steps (e.g. ``DistributedDataParallel``); the student
            itself is what synthesis, recalibration, evaluation and the state see.

    Returns:
        :class:`DistillResult` with the last epoch's student and the per-epoch history.

    Raises:
        ValueError: BN-free sites with no prior (see :func:`synthesize_batch`).
        ConfigError: a generator method without generators.

    >>> result = distill(student, sites, InversionConfig(), DistillConfig(), execution=Execution("cuda"))  # doctest: +SKIP
    >>> result.history[-1]["loss"]                                                                       # doctest: +SKIP
    """
    # Precision and layout left open are measured here (cached per device), unless the caller calibrated already.
    execution = calibrate_for_synthesis(execution or Execution(), site_models, student, synth).for_models(site_models)
    multi_label = synth.multi_label
    if multi_label and (teacher_weights is not None or generators or (method is not None and method.method in ("generator", "mixed"))):
        raise ConfigError("multi-label sites distil by model inversion (and proxy images) with the equal teacher",
                          hint="drop the teacher weighting and the generator method (both assume one class per image)")
    torch.manual_seed(cfg.seed)
    execution.prepare(student)
    batched = batching_for(execution.use_batched, site_models)   # mixed architectures: batched per group
    teacher = execution.prepare(Ensemble(site_models, batched=batched, weights=teacher_weights, multi_label=multi_label))
    adapted = _adapted_teacher(site_models, cfg, execution, teacher_weights, multi_label)
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # The wrapped and compiled modules share the student's parameters: only the training step runs through them.
    train_forward = wrap_student(student) if wrap_student is not None else student
    train_forward = torch.compile(train_forward) if execution.compile else train_forward
    source = SnapshotSource(site_models, teacher, synth, method or SynthesisMethod(), execution, generators, proxy_images,
                            feature_stats=feature_stats, student=student if adversarial else None, allow_ce_only=allow_ce_only,
                            snapshot_memory_mib=snapshot_memory_mib)
    state = TrainingState(0, [], student, optimizer, adapted)
    if resume is not None:
        resume(state)   # last: it restores the random number generators too
    history = state.history
    for epoch in range(state.epochs_done, cfg.epochs):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, epoch)
        with source.epoch(epoch) as snapshots:   # closed (memory freed, any spill file removed) on every exit
            if adapted is not None and cfg.noise_adapted == "eval":
                _refresh_running_stats(adapted, snapshots, execution)
            loss = float(_distill_epoch(train_forward, teacher, adapted, snapshots, optimizer, cfg.temperature, execution,
                                        multi_label))  # one sync per epoch
            if cfg.recalibrate_bn > 0:
                n = len(snapshots)
                recalibrate_bn(student, (snapshots[i] for i in range(n - max(1, round(cfg.recalibrate_bn * n)), n)), execution)
            last_images = snapshots[-1][0]
        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "lr": learning_rate(cfg, epoch), "loss": loss, "seconds": seconds,
                  "images_per_s": synth.batch_size * synth.steps / seconds}
        history.append(_with_metrics(record, student, eval_set, execution))
        state.epochs_done, state.last_images = epoch + 1, last_images
        if on_epoch_end is not None:
            on_epoch_end(state)
        state.last_images = None
        _report(history[-1], cfg.epochs, progress, on_epoch)
    return DistillResult(student=student, history=history)


def _with_metrics(record: dict[str, float], student: nn.Module, eval_set: Dataset[Any] | None,
                  execution: Execution) -> dict[str, float]:
    if eval_set is not None:
        record.update(evaluate_model(student, eval_set, device=str(execution.torch_device)))
        student.train()
    return record


def _report(record: dict[str, float], epochs: int, progress: bool, on_epoch: Callable[[dict[str, float]], None] | None) -> None:
    if progress:
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "lr", "seconds"))
        print(f"distill epoch {int(record['epoch'])}/{epochs}  lr {record['lr']:.2g}  {metrics}", file=sys.stderr)
    if on_epoch is not None:
        on_epoch(record)
