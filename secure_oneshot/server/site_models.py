"""The sites' models as the server holds them: from ``ingest``'s accepted bundles (re-opened and verified with
the server key: they are stored encrypted) or, for research, from model directories; and the baselines every
distillation is reported beside (each site alone, the ensemble teacher, one-shot FedAvg).

What this module does not do: distil (:mod:`~secure_oneshot.server.study`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._internal.termsafe import printable
from ..bundle.arrays import to_torch
from ..errors import ConfigError
from ..keys import Identity, TrustStore
from ..metrics import evaluate_model
from ..models.classifier import ARCHITECTURES, ClassifierConfig, build_classifier
from ..policy.artifacts import load_model_dir
from ..policy.model import IngestPolicy
from ..policy.privacy_statement import parse_statement
from .accepted import open_accepted
from .ensemble import Ensemble, same_architecture
from .ingest import IngestFolders
from .sources import SiteGenerator
from .synthesis import tracks_running_stats

__all__ = ["SiteModel", "load_accepted", "load_model_dirs", "distinct_names", "label_count_noise", "fedavg", "baselines", "is_multi_label", "bn_statistics_released",
           "use_batch_statistics"]


@dataclass
class SiteModel:
    name: str
    model: nn.Module
    config: ClassifierConfig
    feature_stats: dict[str, torch.Tensor] | None = None
    generator: SiteGenerator | None = None
    bundle_id: str = ""
    label_counts: torch.Tensor | None = None  # (classes,) DP-noised class counts the site released, if any
    label_counts_noise: float = 0.0          # their Gaussian noise's standard deviation in records (0: released exact)
    multi_label: bool = False                 # one sigmoid output per label (the record's classifier "task")
    privacy_statement: dict[str, Any] | None = None  # the bundle's signed statement (policy.privacy_statement), if any
    dp_classifier: bool = False               # the classifier came with a DP record (trained with DP-SGD)


def _classifier_config(meta: dict[str, Any], name: str = "") -> ClassifierConfig:
    """Each site's classifier is built from its own record: sites may train different architectures."""
    try:
        cfg = ClassifierConfig(str(meta["architecture"]), int(meta["in_channels"]), int(meta["num_classes"]), str(meta.get("norm", "batch")))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"the classifier's metadata does not say how to build it ({e})") from e
    if cfg.architecture not in ARCHITECTURES:
        raise ConfigError(f"{printable(name, 80) + ': ' if name else ''}the classifier's metadata names an unknown architecture "
                          f"'{printable(cfg.architecture, 60)}'",
                          hint=f"known architectures: {', '.join(sorted(ARCHITECTURES))}")
    return cfg


def _coerce(value: Any, default: Any) -> Any:
    """A field of signed JSON metadata (reals are decimal strings there) back to its config type."""
    if isinstance(default, tuple):
        return tuple(value)
    return type(default)(value) if isinstance(default, (bool, int, float, str)) else value


def _site_generator(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> SiteGenerator | None:
    """The site's released generator, rebuilt from its config (the DDPM schedule follows from the config)."""
    weights = {k.removeprefix("generator/"): v for k, v in tensors.items() if k.startswith("generator/")}
    if not weights:
        return None
    from ..client.generator import load_generator
    from ..models.generator import GeneratorConfig, scheduler_config

    defaults = GeneratorConfig()
    try:
        fields = {k: _coerce(v, getattr(defaults, k)) for k, v in dict(meta.get("config", {})).items() if hasattr(defaults, k)}
        cfg = GeneratorConfig(**fields)
    except (TypeError, ValueError, ConfigError) as e:
        raise ConfigError(f"{name}: the generator's metadata does not say how to build it ({e})") from e
    return SiteGenerator(load_generator(cfg, weights), scheduler_config(cfg), cfg)


BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def use_batch_statistics(model: nn.Module, missing: list[str]) -> None:
    """BatchNorm layers whose running statistics a policy kept at the site normalise with each batch's own statistics.

    Left alone they would normalise with the defaults (mean 0, variance 1) and the model would be wrong without a
    word.  Batch statistics are what such a model can honestly do: the synthesis gets no BatchNorm prior from them
    (:func:`~secure_oneshot.server.synthesis.tracks_running_stats` is false), and evaluation is transductive over
    each evaluation batch (stated in the report).
    """
    withheld = {k.rsplit(".", 1)[0] for k in missing if k.endswith(("running_mean", "running_var"))}
    for layer_name, module in model.named_modules():
        if layer_name in withheld and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None


def bn_statistics_released(model: nn.Module) -> bool | None:
    """True / False: the model's BatchNorm running statistics came with it / were withheld; None: no BatchNorm."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return all(tracks_running_stats(m) for m in layers) if layers else None


def _label_counts(name: str, tensors: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor | None:
    counts = tensors.get("label_counts/counts")
    if counts is None:
        return None
    if counts.shape != (num_classes,) or not counts.is_floating_point() or not torch.isfinite(counts).all():
        raise ConfigError(f"{name}: label_counts/counts must be {num_classes} finite floats, got {counts.dtype} {tuple(counts.shape)}")
    return counts.float()


def label_count_noise(record: Any) -> float:
    """The standard deviation, in records, of the noise on released label counts, from their DP record (JSON).

    The release is one Gaussian draw of sensitivity 1 (:mod:`~secure_oneshot.client.label_counts`), so its record
    has one history step ``(sigma, 1.0, 1)`` and ``max_grad_norm`` 1: the noise is ``sigma * max_grad_norm``.  A
    record of any other shape is not read as a smaller noise: it gives infinity (nothing shown beyond the noise).
    No record: counts released without DP, 0.
    """
    if record is None:
        return 0.0
    try:
        history = record["history"]
        if len(history) != 1 or float(history[0]["sample_rate"]) != 1.0 or int(history[0]["steps"]) != 1:
            return math.inf
        noise = float(history[0]["noise_multiplier"]) * float(record["max_grad_norm"])
    except (KeyError, TypeError, ValueError, IndexError):
        return math.inf
    return noise if math.isfinite(noise) and noise >= 0 else math.inf


def _site_model(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], generator_meta: dict[str, Any] | None = None,
                bundle_id: str = "") -> SiteModel:
    tensors = {key: to_torch(tensor) for key, tensor in tensors.items()}  # received as NumPy arrays (bundle.arrays)
    cfg = _classifier_config(meta, name)
    model = build_classifier(cfg)
    weights = {k.removeprefix("classifier/"): v for k, v in tensors.items() if k.startswith("classifier/")}
    # strict=False only for BatchNorm running statistics a policy kept at the site; everything else must match.
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.endswith(BN_STATISTICS) for k in missing):
        raise ConfigError(f"{name}: classifier weights do not fit {cfg.architecture} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    use_batch_statistics(model, missing)
    stats = {k.removeprefix("feature_stats/"): v for k, v in tensors.items() if k.startswith("feature_stats/")} or None
    return SiteModel(name, model.eval(), cfg, stats, _site_generator(name, tensors, generator_meta or {}), bundle_id,
                     _label_counts(name, tensors, cfg.num_classes), multi_label=meta.get("task") == "multi-label")


def load_accepted(accepted: Path | IngestFolders, identity: Identity, trust: TrustStore, policy: IngestPolicy | None = None, *,
                  now: datetime | None = None) -> list[SiteModel]:
    """Build the classifier of every bundle the accepted registry lists, each re-verified and re-checked.

    Args:
        accepted: the server's folders, or the ``accepted/`` folder of the standard layout (ledger and lock in its parent).
        policy: the ingest policy to re-check against (default: the policy file that accepted each bundle, unchanged).
        now: the time the bundles' validity is checked at (default: the clock's).

    Raises:
        ConfigError, BundleAuthError: see :func:`~secure_oneshot.server.accepted.open_accepted`; nothing unlisted,
            changed or unledgered is ever used.
    """
    folders = accepted if isinstance(accepted, IngestFolders) else IngestFolders.under(accepted.parent)
    models = []
    for bundle in open_accepted(folders, identity, trust, policy, now=now):
        opened = bundle.opened
        artifacts = opened.manifest.meta.get("artifacts", {})
        site = _site_model(opened.sender.name, dict(opened.tensors), artifacts.get("classifier", {}),
                           artifacts.get("generator"), opened.header.bundle_id)
        site.label_counts_noise = label_count_noise(opened.manifest.dp.get("label_counts"))
        site.dp_classifier = "classifier" in opened.manifest.dp
        statement = opened.manifest.meta.get("privacy_statement")
        site.privacy_statement = parse_statement(statement) if statement is not None else None  # checked at ingest
        models.append(site)
    if not models:
        raise ConfigError(f"no accepted bundles in {folders.accepted}", hint="run `secure-oneshot ingest` first")
    return sorted(models, key=lambda s: (s.name, s.bundle_id))  # bundle ids are random: order by site


def distinct_names(directories: list[Path]) -> list[str]:
    """A short name per directory that no other directory shares: its last path part, with as many parent parts as it
    takes to tell it apart from the other paths (``train`` writes every site's model to ``<out>/model``, so the last
    part alone collapses every site into one row of the reports).  A directory given twice keeps one name: it is
    the same model."""
    paths = [Path(d).absolute() for d in directories]
    unique = list(dict.fromkeys(paths))
    parts = [p.relative_to(p.anchor).parts or (str(p),) for p in unique]
    names = [q[-1] for q in parts]
    for depth in range(2, max(len(q) for q in parts) + 1 if parts else 1):
        clashing = {n for n in names if names.count(n) > 1}
        if not clashing:
            break
        names = ["/".join(q[-depth:]) if n in clashing else n for n, q in zip(names, parts)]
    short = dict(zip(unique, names))
    return [short[path] for path in paths]


def load_model_dirs(directories: list[Path]) -> list[SiteModel]:
    """Research mode: site models straight from model directories, each named by :func:`distinct_names`."""
    sites = []
    for directory, name in zip(directories, distinct_names(directories)):
        candidate = load_model_dir(directory)
        meta = candidate.artifacts_meta
        site = _site_model(name, candidate.tensors, meta.get("classifier", {}), meta.get("generator"))
        record = candidate.dp.get("label_counts")
        site.label_counts_noise = label_count_noise(record.to_json() if record is not None else None)
        site.dp_classifier = "classifier" in candidate.dp
        sites.append(site)
    return sites


def fedavg(models: list[nn.Module]) -> nn.Module:
    """One-shot FedAvg: the plain average of every floating-point weight and buffer (equal site weights)."""
    average = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged = {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
              for k, v in states[0].items()}
    average.load_state_dict(merged)
    return average.eval()


def baselines(sites: list[SiteModel], student: nn.Module | None, test_set: Any,
              teacher_weights: torch.Tensor | None = None, teacher: list[SiteModel] | None = None) -> dict[str, dict[str, float]]:
    """Metrics for every site alone, the ensemble teacher, FedAvg (same architectures only) and the global model.

    With ``teacher_weights`` the teacher row is the weighted ensemble and the equal one is reported beside it.
    ``teacher``: the sites the teacher was built from when they differ from ``sites`` (recalibrated copies,
    :mod:`~.site_calibration`); every other row uses ``sites``, the models the hospitals sent.
    """
    rows = {s.name: evaluate_model(s.model, test_set) for s in sites}
    rows["ensemble (teacher)"] = evaluate_model(Ensemble([s.model for s in (teacher or sites)], weights=teacher_weights,
                                                         multi_label=is_multi_label(sites)), test_set)
    if teacher_weights is not None:
        rows["ensemble (equal weights)"] = evaluate_model(Ensemble([s.model for s in sites]), test_set)
    if same_architecture([s.model for s in sites]):
        rows["fedavg (one-shot)"] = evaluate_model(fedavg([s.model for s in sites]), test_set)
    if student is not None:
        rows["global (distilled)"] = evaluate_model(student, test_set)
    return rows


def is_multi_label(sites: list[SiteModel]) -> bool:
    """Whether the sites' task is multi-label (their records say so); sites that disagree cannot form one teacher.

    Raises:
        ConfigError: some sites are multi-label and others are not.
    """
    kinds = {s.multi_label for s in sites}
    if len(kinds) > 1:
        names = ", ".join(s.name for s in sites if s.multi_label)
        raise ConfigError(f"only some sites are multi-label ({printable(names, 200)}): they answer different questions",
                          hint="distil sites of one task together")
    return kinds == {True}
