"""The ``[data]`` keys of a site config that choose a site's own images (``source = "folder" | "manifest" | "dicom"``).

Shared by the site config (``train``) and ``data check``, which reads only the ``[data]`` table and so runs
without the training stack.  Strict like every config here: a key that does not apply to the chosen source is a
problem, not silently ignored.
"""

from __future__ import annotations

from typing import Any, Callable

from .._internal.strict_toml import Problems, Table, one_of
from .image_files import SOURCES, SourceConfig

__all__ = ["SIZES", "MEDMNIST_ONLY", "OWN_DATA_ONLY", "int_in", "own_source"]

SIZES = (28, 64, 128, 224)
MEDMNIST_ONLY = ("flag", "file", "n_sites", "partition", "alpha", "partition_seed", "min_size")
OWN_DATA_ONLY = ("manifest", "classes", "path_column", "label_column", "label_columns", "channels")


def int_in(options: tuple[int, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(map(str, options))}; got {v!r}"


def _label_map(classes: list[str]) -> str | None:
    if len(classes) < 2:
        return "must name at least two classes"
    if len(set(classes)) != len(classes) or any(not c or c != c.strip() for c in classes):
        return "class names must be distinct, non-empty and without leading or trailing spaces"
    return None


def _label_columns(columns: list[str]) -> str | None:
    if len(columns) < 2:
        return "must name at least two label columns (one 0/1 column per label)"
    if len(set(columns)) != len(columns) or any(not c or c != c.strip() for c in columns):
        return "column names must be distinct, non-empty and without leading or trailing spaces"
    return None


def _multi_label(t: Table, problems: Problems, kind: str) -> tuple[str, ...]:
    """``label_columns`` (multi-label manifests): the label names, in order; () when the source has one label per record."""
    if "label_columns" not in t.data:
        return ()
    columns = tuple(t.get("label_columns", "list of strings", [], check=_label_columns))
    if kind == "folder":
        problems.add("data.label_columns", "applies to sources manifest and dicom only (a folder holds one class per record)")
    for key in ("classes", "label_column"):
        if key in t.data:
            t.read.add(key)
            problems.add(f"data.{key}", "does not apply with label_columns (the label names are the columns' names)")
    return columns


def own_source(t: Table, problems: Problems, root_override: str | None = None) -> SourceConfig | None:
    """The source named by ``[data] source``; None for MedMNIST (whose keys the caller reads).  Reads every key
    of an own-data source except ``site``; problems are added to ``problems``."""
    kind = t.get("source", "string", "medmnist", check=one_of(SOURCES))
    if kind == "medmnist":
        for key in OWN_DATA_ONLY:
            if key in t.data:
                t.read.add(key)
                problems.add(f"data.{key}", "applies to sources folder, manifest and dicom only")
        return None
    for key in MEDMNIST_ONLY:
        if key in t.data:
            t.read.add(key)
            problems.add(f"data.{key}", f"applies to source medmnist only, not {kind}")
    root = root_override or t.get("root", "string", None)
    manifest = t.get("manifest", "string", None)
    if kind == "folder" and not root:
        problems.add("data.root", "source folder needs root (the folder holding one sub-folder per class)")
    if kind in ("manifest", "dicom") and not manifest:
        problems.add("data.manifest", f"source {kind} needs manifest (the CSV of path,label rows)")
    label_columns = _multi_label(t, problems, kind)
    if "classes" not in t.data and not label_columns:
        problems.add("data.classes", 'missing: the label map, e.g. classes = ["normal", "pneumonia"]')
    return SourceConfig(
        kind=kind,
        classes=label_columns or tuple(t.get("classes", "list of strings", [], check=_label_map)),
        label_columns=label_columns,
        root=root,
        manifest=manifest,
        path_column=t.get("path_column", "string", "path"),
        label_column=t.get("label_column", "string", "label"),
        size=t.get("size", "integer", 28, check=int_in(SIZES)),
        channels=t.get("channels", "integer", 1, check=int_in((1, 3))),
    )
