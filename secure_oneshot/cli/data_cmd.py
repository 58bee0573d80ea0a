"""``secure-oneshot data check``: read a site's own images the way ``train`` will, and report, without training.

Runs without torch: it reads only the ``[data]`` table of a site config (or the same settings as flags).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .._internal.compat import tomllib
from .._internal.strict_toml import Problems, Table
from ..data.image_files import SOURCES, SourceConfig
from ..data.source_config import SIZES, own_source
from ..errors import ConfigError, DataError
from .output import Result

__all__ = ["register", "add_source_options", "source_from_options"]


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """Flags that choose or override a site's own image source (over the config's ``[data]`` table)."""
    parser.add_argument("--source", choices=SOURCES, help="where the site's images are (default: the config's [data] source)")
    parser.add_argument("--manifest", metavar="FILE.csv", help="manifest and dicom sources: the CSV of path,label rows")
    parser.add_argument("--classes", metavar="A,B,...", help="the label map, comma-separated (index i is the i-th name)")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="1: grey, 3: RGB")
    parser.add_argument("--path-column", metavar="NAME")
    parser.add_argument("--label-column", metavar="NAME")
    parser.add_argument("--label-columns", metavar="A,B,...", help="multi-label manifests: one 0/1 column per label, comma-separated "
                        "(the label names; instead of --classes and --label-column)")


def source_from_options(source: SourceConfig | None, args: argparse.Namespace, size: int = 28) -> SourceConfig | None:
    """``source`` (from a config; None: MedMNIST) with the flags applied; None when the result is MedMNIST."""
    kind = args.source or (source.kind if source else "medmnist")
    if kind == "medmnist":
        return None
    base = source if source is not None and source.kind == kind else SourceConfig(kind, source.classes if source else (), size=size,
                                                                                  label_columns=source.label_columns if source else ())
    label_columns = tuple(c.strip() for c in args.label_columns.split(",")) if getattr(args, "label_columns", None) else None
    if label_columns is not None and (args.classes or args.label_column):
        raise ConfigError("--label-columns names the labels of a multi-label manifest; it does not go with --classes or --label-column",
                          hint="pass either --label-columns A,B,... (multi-label) or --classes and --label-column (one class per record)")
    changes = {"root": args.data_root, "manifest": args.manifest, "channels": args.channels, "path_column": args.path_column,
               "label_column": args.label_column, "label_columns": label_columns, "classes": label_columns or
               (tuple(c.strip() for c in args.classes.split(",")) if args.classes else None)}
    if args.classes and base.multi_label:
        changes["label_columns"] = ()   # --classes over a multi-label config: one class per record from now on
    out = replace(base, **{k: v for k, v in changes.items() if v is not None})
    if out.multi_label and kind == "folder":
        raise ConfigError("a folder source holds one class per record; multi-label labels come from a manifest's columns",
                          hint="use --source manifest (or dicom) with --label-columns")
    if len(out.classes) < 2 or len(set(out.classes)) != len(out.classes):
        raise ConfigError(f"source {kind} needs a label map of at least two distinct class names",
                          hint='set [data] classes = ["normal", "pneumonia"] in the site config, or pass --classes normal,pneumonia')
    if kind == "folder" and not out.root:
        raise ConfigError("source folder needs the image folder", hint="set [data] root, or pass --data-root DIR")
    if kind in ("manifest", "dicom") and not out.manifest:
        raise ConfigError(f"source {kind} needs a manifest", hint="set [data] manifest, or pass --manifest FILE.csv")
    return out


def _source_from_config(path: str) -> SourceConfig | None:
    try:
        text = Path(path).read_text(encoding="utf-8")
        doc = tomllib.loads(text)
    except OSError as e:
        raise ConfigError(f"cannot read site config {path}: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from e
    problems = Problems(path, text, "see README, Bring your own data")
    table = Table(doc.get("data", {}), "data", problems)
    source = own_source(table, problems)
    problems.raise_if_any()  # other [data] keys and other tables belong to train, which checks them
    return source


def _check(args: argparse.Namespace) -> Result:
    from ..data.sources import check_source

    source = _source_from_config(args.config) if args.config else None
    source = source_from_options(source, args, args.size or 28)
    if source is None:
        raise ConfigError("data check reads a site's own images (source folder, manifest or dicom)",
                          hint="name one in the config's [data] source or with --source; MedMNIST files need no check")
    if args.size:
        source = replace(source, size=args.size)
    report = check_source(source)
    lines = report.lines()
    if report.problems:
        lines.append(f"hint: fix or remove the files named above, then run data check again (exit status {DataError.exit_code})")
    return Result(report.to_json(), lines, exit_code=DataError.exit_code if report.problems else 0)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    data = commands.add_parser("data", help="check a site's own images (folder, CSV manifest, DICOM) before training", parents=[common])
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", parents=[common], help="report counts per class, image sizes, unreadable files, duplicates and "
                           "labels outside the label map; exit 15 when anything needs fixing")
    check.add_argument("--config", metavar="SITE.toml", help="the site config whose [data] table names the source")
    check.add_argument("--data-root", "--root", dest="data_root", metavar="DIR", help="folder source: the image folder")
    check.add_argument("--size", type=int, choices=SIZES, help="the training image size (default: the config's, else 28)")
    add_source_options(check)
    check.set_defaults(handler=_check)
