"""Hospitals trained side by side: site configs as plain-value jobs for worker processes, and the workers' functions.

A job is a dict of plain values (paths, numbers, strings; ``_internal.process_pool``): the worker rebuilds the
:class:`SiteConfig` from it, trains with :func:`run_site` (which writes the model directory atomically, as in one
process) and returns a small summary for the progress line.  Rebuilding is exact (same dataclasses, same fields), so
with one torch thread a worker writes the same model files, bit for bit, as :func:`run_site` in the calling process.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .._internal.process_pool import Plain
from ..data import Partition, SiteData, to_dataset
from ..metrics import evaluate_model
from ..models.classifier import ClassifierConfig
from .site import SiteRun, run_site
from .site_config import SiteConfig
from .train import DataConfig, TrainConfig, site_data, train_classifier

__all__ = ["site_job", "site_from_job", "site_summary", "run_site_job", "pooled_reference", "pooled_reference_job",
           "run_pooled_reference_job"]


def _plain(value: Any) -> Plain:
    """A dataclass field's value as plain data: tuples become lists (rebuilt by :func:`_rebuild`)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value   # type: ignore[no-any-return]   # run_jobs checks every value before it leaves


def _fields(obj: Any) -> dict[str, Plain]:
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _rebuild(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)`` with the lists of tuple-valued fields turned back into tuples."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) and isinstance(defaults.get(k), tuple) else v for k, v in values.items()})


def _data_fields(data: DataConfig) -> dict[str, Plain]:
    return {**_fields(data), "partition": _fields(data.partition)}


def _data_from(values: dict[str, Any]) -> DataConfig:
    return _rebuild(DataConfig, {**values, "partition": _rebuild(Partition, values["partition"])})  # type: ignore[no-any-return]


def site_job(cfg: SiteConfig) -> dict[str, Plain]:
    """``cfg`` as a plain-value job for :func:`run_site_job` (MedMNIST sites; a site's own image folder is not a job)."""
    if cfg.source is not None:
        raise ValueError("only MedMNIST site configs become jobs (a source config stays in its own process)")
    return {"data": _data_fields(cfg.data), "model": _fields(cfg.model), "train": _fields(cfg.train),
            "generator": _plain(cfg.generator), "feature_stats": _plain(cfg.feature_stats), "out": str(cfg.out),
            "train_preset": cfg.train_preset, "train_overrides": _plain(cfg.train_overrides)}


def site_from_job(job: dict[str, Any]) -> SiteConfig:
    """The :class:`SiteConfig` that :func:`site_job` encoded."""
    return SiteConfig(_data_from(job["data"]), _rebuild(ClassifierConfig, job["model"]), _rebuild(TrainConfig, job["train"]),
                      job["generator"], job["feature_stats"], Path(job["out"]), job["train_preset"], job["train_overrides"])


def _once_per_worker() -> None:
    # Opacus and torch repeat the same warning for every site and step; a worker shows each once, as the demo does.
    warnings.simplefilter("once")


def site_summary(site: SiteRun, seconds: float) -> dict[str, Plain]:
    """What the progress line shows: records, label counts, test ACC/AUC (NaN: no test split), seconds."""
    result = site.classifier
    test = result.metrics.get("test", {})
    counts = torch.bincount(torch.as_tensor(result.data.train.labels)).tolist()
    return {"out": str(site.out), "records": len(result.data.train), "labels": counts,
            "acc": float(test.get("acc", float("nan"))), "auc": float(test.get("auc", float("nan"))), "seconds": seconds}


def run_site_job(job: dict[str, Any]) -> dict[str, Plain]:
    """Worker side: train the site ``job`` describes, write its model directory, return :func:`site_summary`."""
    _once_per_worker()
    started = time.perf_counter()
    site = run_site(site_from_job(job))
    return site_summary(site, time.perf_counter() - started)


def pooled_reference(data: SiteData, architecture: str, train: TrainConfig) -> dict[str, float]:
    """One model trained on ``data`` (every site's records pooled), evaluated on its test split ({} without one)."""
    model_cfg = ClassifierConfig(architecture, data.train.n_channels, data.train.n_classes)
    result = train_classifier(model_cfg, train, data)
    return evaluate_model(result.model, to_dataset(data.test)) if data.test is not None else {}


def pooled_reference_job(data: DataConfig, val_fraction: float, architecture: str, train: TrainConfig) -> dict[str, Plain]:
    """:func:`pooled_reference` on ``site_data(data, val_fraction, train.seed)`` as a plain-value job."""
    return {"data": _data_fields(data), "val_fraction": val_fraction, "architecture": architecture, "train": _fields(train)}


def run_pooled_reference_job(job: dict[str, Any]) -> dict[str, Plain]:
    """Worker side of :func:`pooled_reference_job`: the test metrics."""
    _once_per_worker()
    train: TrainConfig = _rebuild(TrainConfig, job["train"])
    data = site_data(_data_from(job["data"]), job["val_fraction"], train.seed)
    return {name: float(value) for name, value in pooled_reference(data, job["architecture"], train).items()}
