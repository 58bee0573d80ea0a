"""One site's whole local job: data -> optional DP label histogram -> classifier (optionally DP) -> optional
generator and DP feature statistics -> a model directory that ``export`` checks against the site's policy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..data import SiteData, to_dataset
from ..data.sources import source_record, source_site_data
from ..errors import ConfigError
from .site_config import SiteConfig
from .train import TrainResult, classifier_state, site_data, train_classifier, training_record, write_model_dir

__all__ = ["SiteRun", "run_site"]


@dataclass
class SiteRun:
    out: Path
    classifier: TrainResult
    record: dict[str, Any]
    files: dict[str, int]   # file stem -> tensor count


def _generator(cfg: SiteConfig, result: TrainResult, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """Train the class-conditional diffusion generator on the same records (its own DP budget)."""
    from ..models.generator import PRESETS as GENERATOR_PRESETS
    from .generator import GeneratorTraining, generator_state, sample_images, save_sample_grid, train_generator

    options = dict(cfg.generator or {})
    preset = GENERATOR_PRESETS[options.pop("preset", "cpu-small")]
    train = result.data.train
    gcfg = replace(preset, in_channels=train.n_channels, num_classes=train.n_classes, image_size=int(train.images.shape[1]))
    samples = options.pop("samples", 0)
    training = GeneratorTraining(seed=cfg.train.seed, dataset_fingerprint=train.fingerprint(), **options)
    g = train_generator(gcfg, training, to_dataset(train), progress=progress)
    if samples:  # a grid the site can look at before deciding to release the generator
        cfg.out.mkdir(parents=True, exist_ok=True)
        labels = torch.arange(samples) % train.n_classes
        save_sample_grid(sample_images(g.model, g.scheduler, labels), cfg.out / "generator_samples.png", nrow=train.n_classes * 4)
    meta = {"architecture": "unet2d-small", "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in gcfg.__dict__.items()},
            "scheduler": g.scheduler, "final_loss": g.losses[-1] if g.losses else None,
            # the recipe, so an audit can train shadow generators the same way (the fingerprint is in the DP record)
            "training": {k: v for k, v in asdict(training).items() if k != "dataset_fingerprint"}}
    return generator_state(g.model), meta, g.dp


def _feature_stats(cfg: SiteConfig, result: TrainResult) -> tuple[dict[str, torch.Tensor], Any]:
    if result.dp is None:
        raise ConfigError("[feature_stats] needs a DP classifier (set train.dp_epsilon)",
                          hint="a non-DP classifier keeps BatchNorm statistics; those are a separate artifact")
    from .feature_stats import FeatureStatsConfig, dp_feature_statistics

    options = cfg.feature_stats or {}
    # No seed: the noise must come from the OS, or anyone with the code could regenerate and subtract it.
    stats_cfg = FeatureStatsConfig(epsilon=options["epsilon"], delta=options.get("delta", 1e-5), clip_norm=options.get("clip_norm", 1.0),
                                   dataset_fingerprint=result.data.train.fingerprint())
    return dp_feature_statistics(result.model, to_dataset(result.data.train), stats_cfg)


def _loss_note(result: TrainResult) -> dict[str, Any]:
    """What the training record says about the loss and, for the logit-adjusted loss, where its prior came from."""
    cfg = result.config
    if cfg is None or cfg.loss != "logit-adjusted":
        return {"loss": {"kind": "ce"}}
    if result.label_counts is not None:
        prior = ("the released DP label histogram (label_counts), clamped to >= 1 and normalised: post-processing of that "
                 "release, no privacy cost beyond its own; its step is included in dp.classifier's history")
    else:
        prior = "the exact label counts (the classifier is not DP)"
    return {"loss": {"kind": "logit-adjusted", "tau": cfg.logit_adjust_tau, "prior": prior}}


def _site_data(cfg: SiteConfig) -> SiteData:
    """MedMNIST (a partition or the site's own file), or the site's own images decoded up front: either way the
    same records, validation slice and fingerprint that training consumes."""
    if cfg.source is None:
        return site_data(cfg.data, cfg.train.val_fraction, cfg.train.seed)
    return source_site_data(cfg.source, cfg.train.val_fraction, cfg.train.seed)


def run_site(cfg: SiteConfig, *, progress: bool = False) -> SiteRun:
    """Train everything the config asks for and write the model directory atomically, file by file."""
    data = _site_data(cfg)
    # The data decides channels and classes (RGB, many-class sets), not the config's defaults.
    model_cfg = replace(cfg.model, in_channels=data.train.n_channels, num_classes=data.train.n_classes)
    result = train_classifier(model_cfg, cfg.train, data, progress=progress)
    files = {"classifier": classifier_state(result.model)}
    record = training_record(result, cfg.data, cfg.train, _loss_note(result))
    if cfg.source is not None:  # the MedMNIST fields (flag, partition) do not describe a site's own images
        described = record["training"]["data"]
        for key in ("flag", "partition"):
            described.pop(key, None)
        described.update(source_record(cfg.source))
    if result.label_counts is not None:
        files["label_counts"] = {"counts": result.label_counts.counts.contiguous()}
        record["artifacts"]["label_counts"] = {"num_classes": int(result.label_counts.counts.numel())}
        record["dp"]["label_counts"] = result.label_counts.record.to_json()
    if cfg.generator is not None:
        files["generator"], record["artifacts"]["generator"], gen_dp = _generator(cfg, result, progress)
        if gen_dp is not None:
            record["dp"]["generator"] = gen_dp.to_json()
    if cfg.feature_stats is not None:
        files["feature_stats"], stats_dp = _feature_stats(cfg, result)
        record["artifacts"]["dp_feature_statistics"] = {"layers": sorted({k.rsplit(".", 1)[0] for k in files["feature_stats"]})}
        record["dp"]["dp_feature_statistics"] = stats_dp.to_json()
    out = write_model_dir(cfg.out, files, record)
    return SiteRun(out, result, record, {stem: len(t) for stem, t in files.items()})
