"""A site's own data (image folder, CSV manifest, DICOM) as the records training consumes, and ``data check``.

What it does: :func:`load_source` decodes every record up front (a corrupt file stops the run before training,
as a one-line :class:`DataError` naming it); :func:`source_site_data` turns them into the same
``SiteData`` a MedMNIST site gets (uint8 images, int64 labels, the site's own validation slice drawn exactly as
for a MedMNIST site, the fingerprint over images and labels); :func:`check_source` reads everything and reports
counts per class, image sizes, unreadable files, exact duplicates and labels outside the label map, without
stopping at the first problem.

What it does not do: import torch at module level (``data check`` runs without it; only
:func:`source_site_data` builds the training types), or hold a test split: a hospital's own records are its
training and validation data.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError
from .image_files import CHECK_HINT, SOURCES, Entry, Finding, SourceConfig, decode_file, list_entries

# medmnist's name of the multi-label task type (medmnist_data.MULTI_LABEL; not imported from there, which loads torch).
MULTI_LABEL = "multi-label, binary-class"

__all__ = ["source_task", "SOURCES", "SourceConfig", "LoadedSource", "CheckReport", "load_source", "check_source", "source_site_data",
           "source_record"]


@dataclass(frozen=True)
class LoadedSource:
    images: np.ndarray        # uint8 (N, size, size) or (N, size, size, 3)
    labels: np.ndarray        # int64 (N,); multi-label: (N, L) 0/1
    config: SourceConfig

    @property
    def task(self) -> str:
        return source_task(self.config)


def source_task(cfg: SourceConfig) -> str:
    """The task type of a source, in MedMNIST's names (multi-label: ChestMNIST's)."""
    if cfg.multi_label:
        return MULTI_LABEL
    return "binary-class" if len(cfg.classes) == 2 else "multi-class"


def load_source(cfg: SourceConfig) -> LoadedSource:
    """Every record of the source, decoded.  Raises DataError at the first listing or decoding problem."""
    entries, findings = list_entries(cfg)
    blocking = [f for f in findings if f.kind != "missing"]  # a class without records can still be trained around
    if blocking:
        first = blocking[0]
        more = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
        raise DataError(f"{first.line()}{more}", hint=CHECK_HINT)
    if not entries:
        raise DataError("the data source holds no image records", hint=CHECK_HINT)
    shape = (cfg.size, cfg.size) if cfg.channels == 1 else (cfg.size, cfg.size, 3)
    images = np.empty((len(entries), *shape), dtype=np.uint8)
    for i, entry in enumerate(entries):
        images[i] = decode_file(entry, cfg)[0]
    labels = np.array([e.label for e in entries], dtype=np.int64).reshape(len(entries), -1 if cfg.multi_label else 1)
    return LoadedSource(images, labels if cfg.multi_label else labels[:, 0], cfg)


def source_site_data(cfg: SourceConfig, val_fraction: float = 0.1, seed: int = 0):  # type: ignore[no-untyped-def]
    """The site's records and its validation slice, split as ``client.train.site_data`` splits a site's own file."""
    from .medmnist_data import MedMNISTSplit, SiteData

    loaded = load_source(cfg)
    pool = MedMNISTSplit(cfg.kind, "train+val", loaded.images, loaded.labels, len(cfg.classes), cfg.channels, loaded.task)
    order = np.random.default_rng(seed).permutation(len(pool))
    n_val = max(1, int(round(val_fraction * len(pool))))
    return SiteData(pool.subset(np.sort(order[n_val:])), pool.subset(np.sort(order[:n_val])), None)


def source_record(cfg: SourceConfig) -> dict[str, Any]:
    """What the training record says about the source: its kind and label map, never a path or a header value."""
    return {"source": cfg.kind, "classes": list(cfg.classes), "size": cfg.size, "channels": cfg.channels}   # task: the training record's


@dataclass
class CheckReport:
    source: str
    classes: list[str]
    counts: dict[str, int]                      # records per class; multi-label: records positive for each label
    sizes: dict[str, int]                       # "W x H" as found in the files -> records
    records: int = 0
    unreadable: list[Finding] = field(default_factory=list)
    labels: list[Finding] = field(default_factory=list)
    layout: list[Finding] = field(default_factory=list)
    duplicates: list[dict[str, list[str]]] = field(default_factory=list)   # same file bytes: files and their labels
    multi_label: bool = False

    @property
    def problems(self) -> int:
        return len(self.unreadable) + len(self.labels) + len(self.layout) + len(self.duplicates)

    def to_json(self) -> dict[str, Any]:
        found = lambda items: [{"file": f.file, "problem": f.problem} for f in items]  # noqa: E731
        return {"source": self.source, "classes": self.classes, "records": self.records, "counts": self.counts, "sizes": self.sizes,
                "task": "multi-label" if self.multi_label else "one class per record",
                "unreadable": found(self.unreadable), "labels_outside_map": found(self.labels), "layout": found(self.layout),
                "duplicates": self.duplicates, "problems": self.problems}

    def lines(self) -> list[str]:
        if self.multi_label:
            out = [f"{self.source} source: {self.records} readable records, {len(self.classes)} labels (multi-label; positives per label)"]
            out += [f"  label {name:20s} {self.counts[name]:7d}" for name in self.classes]
        else:
            out = [f"{self.source} source: {self.records} readable records, {len(self.classes)} classes"]
            out += [f"  class {name:20s} {self.counts[name]:7d}" for name in self.classes]
        out += ["image sizes (width x height, before fitting):"] + [f"  {s:15s} {n:7d}" for s, n in sorted(self.sizes.items())]
        for title, items in (("unreadable files", self.unreadable), ("labels outside the label map", self.labels),
                             ("layout problems", self.layout)):
            out += [f"{title}: {len(items)}"] + [f"  {f.line()}" for f in items]
        out += [f"exact duplicates: {len(self.duplicates)} group(s)"]
        for group in self.duplicates:
            differ = f"  (labels differ: {', '.join(sorted(set(group['labels'])))})" if len(set(group["labels"])) > 1 else ""
            out.append(f"  {' = '.join(group['files'])}{differ}")
        out.append("clean: no problems found" if not self.problems else f"{self.problems} problem(s) found")
        return out


def check_source(cfg: SourceConfig) -> CheckReport:
    """Read every record and report; never raises for a problem in a record (only when nothing can be listed)."""
    entries, findings = list_entries(cfg)
    report = CheckReport(cfg.kind, list(cfg.classes), {name: 0 for name in cfg.classes}, {}, multi_label=cfg.multi_label)
    for f in findings:
        (report.labels if f.kind == "label" else report.unreadable if f.kind == "unreadable" else report.layout).append(f)
    sizes: Counter[str] = Counter()
    by_hash: dict[str, list[Entry]] = {}
    for entry in entries:
        try:
            _, (width, height), blob = decode_file(entry, cfg)
        except DataError as e:
            report.unreadable.append(Finding("unreadable", entry.shown, e.message.removeprefix(f"{entry.shown}: ")))
            continue
        report.records += 1
        for name in _label_names(entry, cfg):
            report.counts[name] += 1
        sizes[f"{width} x {height}"] += 1
        by_hash.setdefault(hashlib.sha256(blob).hexdigest(), []).append(entry)
    report.sizes = dict(sizes)
    for group in by_hash.values():
        if len(group) > 1:
            report.duplicates.append({"files": [e.shown for e in group], "labels": ["+".join(_label_names(e, cfg)) or "(no label)" for e in group]})
    return report


def _label_names(entry: Entry, cfg: SourceConfig) -> list[str]:
    """The class of a record, or (multi-label) the labels it is positive for."""
    if isinstance(entry.label, tuple):
        return [name for name, value in zip(cfg.classes, entry.label) if value]
    return [cfg.classes[entry.label]]
