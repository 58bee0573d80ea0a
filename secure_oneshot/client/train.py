"""Local training of a site's classifier: the method's recipe by default, Opacus DP on request.

Each stage is a function of (config, inputs): :func:`site_data` picks the
site's records, :func:`train_classifier` trains (optionally with DP-SGD),
:func:`write_model_dir` saves safetensors + a JSON training record (never a
pickle; Opacus's own checkpoint helper pickles, so it is not used).
"""

from __future__ import annotations

import json
import math
import platform
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import __version__
from .._internal.atomic import atomic_write_bytes
from .._internal.json_values import strict_json_values
from .._internal.schedule import rate_factor
from ..data import MedMNISTSplit, Partition, SiteData, load_medmnist, load_npz, partition_indices, to_dataset
from ..data.medmnist_data import is_multi_label, task_note, trained_as
from .multi_label import MultiLabelBCE, check_multi_label
from .checkpoint_choice import CheckpointChooser
from ..errors import ConfigError, PrivacyError
from ..metrics import evaluate_model
from ..models.classifier import ClassifierConfig, standardise_convolutions
from ..models.imagenet_init import initial_classifier
from ..policy.artifacts import MODEL_RECORD_FORMAT
from ..policy.dp import DpRecord, dp_record_from_opacus, quiet_accountant
from .dp_recipe import WeightAverage, augment_views, average_view_grad_samples
from .threshold import ThresholdRelease, calibrate_threshold, with_threshold_release
from .label_counts import LabelRelease, LogitAdjustedLoss, log_prior, noisy_label_counts, with_label_release

__all__ = ["TrainConfig", "PRESETS", "DataConfig", "TrainResult", "site_data", "train_classifier", "training_step", "classifier_state", "write_model_dir"]


@dataclass(frozen=True)
class TrainConfig:
    """Local training.  Defaults are the method's recipe (FedISCA's public code)."""

    epochs: int = 100
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.5, 0.75)   # lr x gamma from 1-based epochs 50 and 75 of 100 on (as published)
    gamma: float = 0.1
    batch_size: int = 128
    seed: int = 0
    val_fraction: float = 0.1                      # held-out slice of the site's own records
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"                # Opacus: "hooks" | "functorch" | "ew" | "ghost" (fast clipping)
    max_physical_batch_size: int = 128
    min_steps: int = 0                             # raise epochs until at least this many optimizer steps (tiny sites)
    label_counts_epsilon: float | None = None      # release a DP label histogram at this epsilon (None or 0: none)
    loss: str = "auto"                             # "ce" | "logit-adjusted" | "auto" (logit-adjusted under DP with a histogram)
    logit_adjust_tau: float | None = None          # tau of the logit-adjusted loss; None: DP_LOGIT_ADJUST_TAU under DP, else 1
    augment_views: int = 1                         # augmented views per record, averaged before clipping (1: no augmentation)
    ema_decay: float = 0.0                         # exponential moving average of the weights (0: off); post-processing
    weight_standardisation: bool = False           # under DP: GroupNorm + weight-standardised convolutions (norm "group-ws")
    threshold_epsilon: float | None = None         # under DP, binary: move the decision to a DP-measured balanced threshold
    checkpoint: str = "last"                       # "last" | "best-val" (own validation slice; refused under DP): checkpoint_choice
    imagenet_weights: str = ""                     # a local safetensors file of ImageNet weights to start from ("": random init)


MEASURED_DROPS = (0.6, 0.8)   # cpu/dp: drops from epochs 9 and 12 of 15, the schedule these presets were measured with
PRESETS: dict[str, TrainConfig] = {
    "fedisca": TrainConfig(checkpoint="best-val"),   # the published code hands over each site's best.pth
    # About a minute per site on 2 CPU cores with small-cnn at 28 px.  min_steps stays off here: raising the
    # 14-record one-class PneumoniaMNIST demo site from 15 to 150 steps made it a confident class-0 voter and
    # the distilled model's ACC fell from 0.888 to 0.739 (AUC 0.965 -> 0.960); see benchmarks/RESULTS.md.
    # Tiny sites (BreastMNIST) should set it ([train] min_steps = 300).
    "cpu": TrainConfig(epochs=15, lr=0.02, batch_size=64, milestones=MEASURED_DROPS),
    # Chosen on a public proxy, never on a site's records: all of BreastMNIST train+val as one DP site (epsilon 8,
    # its validation slice; benchmarks/dp_recipe.py, benchmarks/RESULTS.md).  Logical batches of 256 (lr 0.2-0.5,
    # 20 epochs) and 2-4 augmented views per record ranked below these settings there at a CPU budget; the
    # weight average helped.  Pair it with threshold_epsilon on binary tasks (client/threshold.py).
    "dp": TrainConfig(epochs=15, lr=0.02, batch_size=64, max_physical_batch_size=64, ema_decay=0.9, milestones=MEASURED_DROPS),
}


@dataclass(frozen=True)
class DataConfig:
    """Which records a site trains on: one part of train+val of a MedMNIST set, or the site's own file."""

    flag: str = "pneumoniamnist"
    size: int = 28
    root: str | None = None
    file: str | None = None          # a site's own MedMNIST-format .npz (then no partitioning)
    site: int = 0
    partition: Partition = field(default_factory=Partition)
    download: bool = False


@dataclass
class TrainResult:
    model: nn.Module
    model_config: ClassifierConfig
    history: list[dict[str, float]]
    metrics: dict[str, dict[str, float]]
    dp: DpRecord | None
    data: SiteData
    config: TrainConfig | None = None   # as run (epochs raised by min_steps, loss resolved)
    label_counts: LabelRelease | None = None   # the DP label histogram, when one was released
    threshold: ThresholdRelease | None = None  # the DP decision threshold, when one was measured
    checkpoint: dict[str, Any] | None = None   # the epoch handed over (CheckpointChooser.record)


def _merged_train_val(cfg: DataConfig) -> MedMNISTSplit:
    if cfg.file:
        splits = [load_npz(cfg.file, cfg.flag, s) for s in ("train", "val")]
    else:
        splits = [load_medmnist(cfg.flag, s, size=cfg.size, root=cfg.root, download=cfg.download) for s in ("train", "val")]
    a, b = splits
    return MedMNISTSplit(a.flag, "train+val", np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]), a.n_classes, a.n_channels, a.task)


def _partition_key(labels: np.ndarray) -> np.ndarray:
    """One class per record for the Dirichlet split: the label itself, or (multi-label) the first positive label
    (``L`` for a record with none), so non-IID sites differ in which findings they hold."""
    if labels.ndim == 1:
        return labels
    return np.where(labels.any(axis=1), labels.argmax(axis=1), labels.shape[1])


def site_data(cfg: DataConfig, val_fraction: float = 0.1, seed: int = 0) -> SiteData:
    """The site's records (its partition of train+val, or its own file), a local validation slice, and the test split."""
    pool = _merged_train_val(cfg)
    if not cfg.file:
        parts = partition_indices(_partition_key(pool.labels), cfg.partition)
        if not 0 <= cfg.site < len(parts):
            raise ConfigError(f"site {cfg.site} does not exist in a {len(parts)}-site partition")
        pool = pool.subset(parts[cfg.site])
    order = np.random.default_rng(seed).permutation(len(pool))
    n_val = max(1, int(round(val_fraction * len(pool))))
    test = load_npz(cfg.file, cfg.flag, "test") if cfg.file else load_medmnist(cfg.flag, "test", size=cfg.size, root=cfg.root, download=cfg.download)
    return SiteData(pool.subset(np.sort(order[n_val:])), pool.subset(np.sort(order[:n_val])), test)


def with_min_steps(cfg: TrainConfig, records: int) -> TrainConfig:
    """``cfg`` with epochs raised so that training takes at least ``cfg.min_steps`` optimizer steps."""
    steps_per_epoch = max(1, math.ceil(records / cfg.batch_size))
    return replace(cfg, epochs=max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch)))


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: rate_factor(e, cfg.epochs, cfg.milestones, cfg.gamma))


def _fix_for_dp(model: nn.Module) -> nn.Module:
    """Validate, then fix, before DP (Opacus): BatchNorm becomes GroupNorm(min(32, C), C), as ``norm="group"`` builds it."""
    from opacus.validators import ModuleValidator

    model = ModuleValidator.fix(model)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyError(f"Opacus cannot train this model with DP after fixing it: {errors}")
    return model


def _make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, cfg: TrainConfig,  # type: ignore[no-untyped-def]
                  criterion: nn.Module | None = None):
    """Opacus: validate and fix (BatchNorm -> GroupNorm) first, then DP-SGD with Poisson sampling at a stated budget."""
    from opacus import PrivacyEngine

    with warnings.catch_warnings():  # "Secure RNG turned off": said once, in the README's DP paragraph, not per site
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant=cfg.accountant)
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    with quiet_accountant():  # the noise search's accountant chatter (the record's epsilon is rechecked in policy.dp)
        wrapped = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=cfg.dp_epsilon, target_delta=cfg.dp_delta,
            epochs=cfg.epochs, max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, grad_sample_mode=cfg.grad_sample_mode,
            criterion=criterion,
        )
    if cfg.grad_sample_mode == "ghost":  # ghost clipping also wraps the loss (two backward passes, no per-sample grads)
        model, optimizer, criterion, loader = wrapped
    else:
        model, optimizer, loader = wrapped
    return engine, model, optimizer, loader, criterion


@contextmanager
def _physical_batches(loader: DataLoader, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Iterator[DataLoader]:
    """Opacus's BatchMemoryManager bounds memory for large logical batches under DP."""
    if cfg.dp_epsilon is None:
        yield loader
        return
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=cfg.max_physical_batch_size, optimizer=optimizer) as memory_safe:
        yield memory_safe


@contextmanager
def _quiet_input_layer_hook() -> Iterator[None]:
    """Silence PyTorch's "Full backward hook is firing ... no inputs require gradients" warning, and only it.

    Opacus (``grad_sample_mode="hooks"``) puts a full backward hook on every trainable layer to capture the
    gradient with respect to the layer's *output*, from which it computes per-sample gradients.  The first
    layer's input is the image batch, which never requires gradients, so PyTorch warns on every backward
    pass that the hook gets no input gradients.  Opacus never reads them: the per-sample gradients are exact.
    Making the images require gradients would silence it too, at the cost of an unused input gradient.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                                "to module outputs since no inputs require gradients", category=UserWarning)
        yield


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  views: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One forward/backward/step on ``views`` augmented views of each record; returns (loss, logits, stepped).

    Under DP the per-sample gradients of a record's views are averaged before the optimizer clips them, so a
    record contributes one clipped gradient whatever ``views`` is.  ``stepped`` is false for a physical batch
    on which Opacus's BatchMemoryManager only accumulated (the logical batch is not complete yet).
    """
    x, y = augment_views(x, views, generator), y.repeat_interleave(max(1, views), dim=0)
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = criterion(logits, y)
    with _quiet_input_layer_hook():
        loss.backward()
    if hasattr(optimizer, "noise_multiplier"):  # an Opacus DPOptimizer: clip per record, not per view
        average_view_grad_samples(optimizer.params, views)  # type: ignore[attr-defined]
    optimizer.step()
    return loss.detach(), logits.detach(), not getattr(optimizer, "_is_last_step_skipped", False)


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, cfg: TrainConfig, criterion: nn.Module,
                 average: WeightAverage, views: torch.Generator) -> dict[str, float]:
    model.train()
    total, correct, loss_sum, steps = 0, 0, 0.0, 0
    with _physical_batches(loader, optimizer, cfg) as batches:
        for x, y in batches:
            # An empty Poisson batch still takes its noise-only DP step: skipping it would reveal that it was empty.
            loss, logits, stepped = training_step(model, optimizer, criterion, x, y, cfg.augment_views, views)
            if stepped:
                steps += 1
                average.update(_inner(model))
            if len(y):  # the mean over an empty batch is NaN
                n = len(logits)
                loss_sum += float(loss) * n
                correct += _correct(logits, y.repeat_interleave(max(1, cfg.augment_views), dim=0))
                total += n
    return {"loss": loss_sum / max(total, 1), "train_acc": correct / max(total, 1), "steps": steps}


def _correct(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Correct predictions in a batch: argmax for one class per record, per-label (logit > 0) averaged for multi-label."""
    if y.dim() == 2:
        return float(((logits > 0) == y.bool()).float().mean(dim=1).sum())
    return float((logits.argmax(1) == y).sum())


def _inner(model: nn.Module) -> nn.Module:
    """The user's module inside Opacus's GradSampleModule (the same parameters), or the model itself."""
    return getattr(model, "_module", model)


def _progress(enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return nullcontext(None)
    from rich.progress import Progress

    return Progress(transient=True)


LOSSES = ("auto", "ce", "logit-adjusted")
DP_LOGIT_ADJUST_TAU = 4.0
"""tau under DP.  Per-sample clipping lets the many low-loss majority records outvote the clipped minority ones,
so a DP model's logits favour the majority by far more than the prior (about 4 logits on PneumoniaMNIST, where
log(prior ratio) is 1.1): Menon's tau = 1 left both measured sites predicting only the majority, tau = 4 gave
balanced accuracy 0.67-0.86 against CE's 0.50, varying with the histogram's noise (benchmarks/RESULTS.md)."""


def resolve_loss(cfg: TrainConfig) -> str:
    """``auto`` is the logit-adjusted loss when DP is on and a label histogram is released (the measured
    remedy for DP site models that predict only the majority class), plain cross-entropy otherwise."""
    if cfg.loss not in LOSSES:
        raise ConfigError(f"unknown loss {cfg.loss!r}; expected one of {list(LOSSES)}")
    releases = bool(cfg.label_counts_epsilon)
    if cfg.loss == "auto":
        return "logit-adjusted" if cfg.dp_epsilon is not None and releases else "ce"
    if cfg.loss == "logit-adjusted" and cfg.dp_epsilon is not None and not releases:
        raise ConfigError("the logit-adjusted loss under DP needs a DP label histogram (set label_counts_epsilon)",
                          hint="the class prior must come from a DP release, not from the private labels")
    return cfg.loss


def resolve_tau(cfg: TrainConfig) -> float:
    """The configured tau, else :data:`DP_LOGIT_ADJUST_TAU` under DP and Menon et al.'s 1 without."""
    if cfg.logit_adjust_tau is not None:
        return cfg.logit_adjust_tau
    return DP_LOGIT_ADJUST_TAU if cfg.dp_epsilon is not None else 1.0


def _label_release(cfg: TrainConfig, data: SiteData, rng: np.random.Generator | None) -> LabelRelease | None:
    """The DP label histogram, released before training so the loss can use it; ``None`` when not asked for."""
    if not cfg.label_counts_epsilon:
        return None
    train = data.train
    if cfg.dp_epsilon is not None and cfg.label_counts_epsilon >= cfg.dp_epsilon:
        raise ConfigError(f"label_counts_epsilon {cfg.label_counts_epsilon:g} must be below dp_epsilon {cfg.dp_epsilon:g}",
                          hint="the histogram's budget is taken out of the classifier's")
    return noisy_label_counts(train.labels, train.n_classes, cfg.label_counts_epsilon, cfg.dp_delta,
                              dataset_fingerprint=train.fingerprint(), rng=rng)


def _training_criterion(loss: str, cfg: TrainConfig, data: SiteData, release: LabelRelease | None) -> nn.Module:
    """Cross-entropy, or cross-entropy on prior-adjusted logits; the prior is the released (noisy) histogram
    when there is one (post-processing of a DP release), else the exact counts of a non-DP site."""
    if is_multi_label(data.train.task):
        return MultiLabelBCE()
    if loss == "ce":
        return nn.CrossEntropyLoss()
    counts = release.counts if release is not None else np.bincount(data.train.labels.reshape(-1), minlength=data.train.n_classes)
    return LogitAdjustedLoss(log_prior(counts), cfg.logit_adjust_tau if cfg.logit_adjust_tau is not None else 1.0)


def _sgd_budget(cfg: TrainConfig, uses_release: bool) -> TrainConfig:
    """DP-SGD's share: a classifier trained with the histogram's prior spends the histogram's budget too, and one
    whose decision threshold is measured spends that release's budget, so DP-SGD is calibrated to what is left
    and the joint history stays within ``dp_epsilon`` (each share is checked again on the joint history)."""
    if cfg.dp_epsilon is None:
        return cfg
    spent = (float(cfg.label_counts_epsilon or 0.0) if uses_release else 0.0) + float(cfg.threshold_epsilon or 0.0)
    return replace(cfg, dp_epsilon=cfg.dp_epsilon - spent)


def _check_threshold(cfg: TrainConfig, num_classes: int) -> None:
    if not cfg.threshold_epsilon:
        return
    if cfg.dp_epsilon is None:
        raise ConfigError("threshold_epsilon applies to DP training only", hint="set dp_epsilon, or remove threshold_epsilon")
    if num_classes != 2:
        raise ConfigError(f"the DP decision threshold is for binary tasks; this one has {num_classes} classes",
                          hint="remove threshold_epsilon (the logit-adjusted loss handles several classes)")
    spent = float(cfg.label_counts_epsilon or 0.0) + cfg.threshold_epsilon
    if spent >= cfg.dp_epsilon:
        raise ConfigError(f"label_counts_epsilon + threshold_epsilon ({spent:g}) must be below dp_epsilon {cfg.dp_epsilon:g}",
                          hint="both releases are taken out of the classifier's budget")


def train_classifier(model_cfg: ClassifierConfig, cfg: TrainConfig, data: SiteData, *, progress: bool = False,
                     noise_rng: np.random.Generator | None = None) -> TrainResult:
    """Train on ``data.train``; validate each epoch on ``data.val``; test on ``data.test`` at the end.

    ``noise_rng`` draws the noise of the DP label histogram and decision threshold; ``None`` (everything but
    tests) draws from OS entropy, since a known seed would let anyone subtract the noise.

    Raises:
        PrivacyError: Opacus cannot reach the requested budget with these settings.
    """
    torch.manual_seed(cfg.seed)
    check_multi_label(cfg, data.train.task)
    cfg = with_min_steps(cfg, len(data.train))
    loss_kind = resolve_loss(cfg)
    cfg = replace(cfg, loss=loss_kind, logit_adjust_tau=resolve_tau(cfg) if loss_kind == "logit-adjusted" else cfg.logit_adjust_tau)
    _check_threshold(cfg, data.train.n_classes)
    release = _label_release(cfg, data, noise_rng)
    uses_release = release is not None and loss_kind == "logit-adjusted"
    dp = cfg.dp_epsilon is not None
    chooser = CheckpointChooser(cfg.checkpoint, dp)
    model = initial_classifier(model_cfg, cfg.imagenet_weights)
    if cfg.weight_standardisation and not dp:
        raise ConfigError("weight_standardisation goes with DP training (GroupNorm, the norm Opacus's fix gives)",
                          hint="set dp_epsilon, or drop weight_standardisation")
    if dp:
        model = _fix_for_dp(model)
        if cfg.weight_standardisation:
            standardise_convolutions(model)
    train_set = to_dataset(data.train)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    optimizer = _optimizer(model, cfg)
    average = WeightAverage(model, cfg.ema_decay)  # before Opacus wraps the model: it copies a plain module
    engine, criterion = None, _training_criterion(loss_kind, cfg, data, release)
    if cfg.augment_views < 1:
        raise ConfigError("augment_views must be at least 1")
    if dp and cfg.augment_views > 1 and cfg.grad_sample_mode == "ghost":
        raise ConfigError("augmentation multiplicity needs per-sample gradients", hint="use grad_sample_mode = \"hooks\"")
    if dp:
        try:
            engine, model, optimizer, loader, criterion = _make_private(model, optimizer, loader, _sgd_budget(cfg, uses_release), criterion)
        except ValueError as e:
            raise PrivacyError(f"Opacus cannot train to epsilon {cfg.dp_epsilon}: {e}") from e
    scheduler = _scheduler(optimizer, cfg)
    history = []
    val_set = to_dataset(data.val)
    views = torch.Generator().manual_seed(cfg.seed + 1)
    with _progress(progress) as bar:
        task = bar.add_task("training", total=cfg.epochs) if bar else None
        for epoch in range(cfg.epochs):
            row = {"epoch": epoch + 1, **_train_epoch(model, loader, optimizer, cfg, criterion, average, views)}
            row.update({f"val_{k}": v for k, v in evaluate_model(average.model(model), val_set).items()})
            chooser.observe(epoch + 1, row["val_acc"], average.model(model))
            scheduler.step()
            history.append(row)
            if bar:
                bar.update(task, advance=1, description=f"epoch {epoch + 1} loss {row['loss']:.3f} val acc {row['val_acc']:.3f}")
    # Opacus's hooks off: left on, the returned model fails on any later backward pass (model inversion).
    plain = model.to_standard_module() if hasattr(model, "to_standard_module") else model
    plain = chooser.choose(average.model(plain))  # only the site's validation slice chooses, never the test split
    threshold = None
    if cfg.threshold_epsilon and dp:  # post-processing of a DP release over the training records (its step is recorded)
        train_images = to_dataset(data.train).tensors[0]
        threshold = calibrate_threshold(plain, train_images, data.train.labels.reshape(-1), cfg.threshold_epsilon, cfg.dp_delta,
                                        rng=noise_rng)
    metrics = {"val": evaluate_model(plain, val_set)}
    if data.test is not None:
        metrics["test"] = evaluate_model(plain, to_dataset(data.test))
    record = None
    if engine is not None:
        record = dp_record_from_opacus(engine.accountant, delta=cfg.dp_delta, max_grad_norm=cfg.max_grad_norm,
                                       sampling="poisson", dataset_fingerprint=data.train.fingerprint())
        if uses_release:
            record = with_label_release(record, release)  # type: ignore[arg-type]
        if threshold is not None:
            record = with_threshold_release(record, threshold)
    trained_norm = ("group-ws" if cfg.weight_standardisation else "group") if dp else model_cfg.norm
    return TrainResult(plain, replace(model_cfg, norm=trained_norm), history, metrics, record, data, cfg, release,
                       threshold, chooser.record)


def classifier_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict as contiguous CPU tensors, without Opacus's ``_module.`` wrapper prefix."""
    return {k.removeprefix("_module."): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _versions() -> dict[str, str]:
    import opacus

    return {"secure-oneshot": __version__, "torch": torch.__version__, "opacus": opacus.__version__, "python": platform.python_version()}


DP_PRESET_SOURCE = ("dp preset: hyperparameters chosen on public BreastMNIST (train+val as one DP site, its validation "
                    "slice), not on this site's records")


def hyperparameter_source(cfg: TrainConfig) -> str:
    """Where a DP run's hyperparameters came from: the ``dp`` preset's public-proxy tuning, or the site's own settings
    (which the site must account for if it chose them by looking at its private data)."""
    ignored = {"seed": 0, "dp_epsilon": None, "dp_delta": 1e-5, "label_counts_epsilon": None, "threshold_epsilon": None,
               "loss": "auto", "logit_adjust_tau": None}
    same = replace(cfg, **ignored) == replace(PRESETS["dp"], **ignored)
    return DP_PRESET_SOURCE if same else "set in the site's configuration"


def training_record(result: TrainResult, data_cfg: DataConfig, cfg: TrainConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The site's JSON record: what was trained on what, how, with which guarantee (no images, no tensors)."""
    train = result.data.train
    multi_label = is_multi_label(train.task)
    # Multi-label: positives per label; otherwise records per class.
    counts = (train.labels.sum(axis=0) if multi_label else np.bincount(train.labels, minlength=train.n_classes)).tolist()
    artifacts = {"classifier": {**asdict(result.model_config), "image_size": int(train.images.shape[1]),
                                **({"task": "multi-label"} if multi_label else {})}}
    dp = {"classifier": result.dp.to_json()} if result.dp else {}
    return {
        "format": MODEL_RECORD_FORMAT,
        "site": f"site-{data_cfg.site}" if not data_cfg.file else Path(data_cfg.file).stem,
        "artifacts": artifacts,
        "dp": dp,
        "training": {
            "config": asdict(result.config or cfg), "data": {"flag": data_cfg.flag, "size": data_cfg.size, "site": data_cfg.site,
                                            "partition": asdict(data_cfg.partition), "fingerprint": result.data.train.fingerprint(),
                                            "train_records": len(result.data.train), "val_records": len(result.data.val),
                                            "label_counts": counts, "task": result.data.train.task,
                                            "trained_as": trained_as(result.data.train.task),
                                            **({"note": task_note(result.data.train.task)} if task_note(result.data.train.task) else {})},
            "history": result.history, "metrics": result.metrics, "versions": _versions(), "checkpoint": result.checkpoint,
            **({"decision_threshold": {"margin": result.threshold.threshold, "epsilon": result.threshold.epsilon}} if result.threshold else {}),
            **({"hyperparameters": hyperparameter_source(result.config or cfg)} if result.dp else {}),
            **(extra or {}),
        },
    }


def write_model_dir(directory: str | Path, tensors_by_file: dict[str, dict[str, torch.Tensor]], record: dict[str, Any]) -> Path:
    """Write ``<stem>.safetensors`` files and ``record.json``, each atomically."""
    from safetensors.torch import save

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, tensors in tensors_by_file.items():
        atomic_write_bytes(folder / f"{stem}.safetensors", save(tensors))
    text = json.dumps(strict_json_values(record), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(folder / "record.json", (text + "\n").encode("utf-8"))
    return folder

