"""A site's own image files: safe listing (image folder, CSV manifest), safe reading, decoding to uint8.

What it does: lists the records of a ``folder`` source (``root/<class name>/...``, classes mapped to indices by
the config's explicit ``classes`` list) or of a ``manifest``/``dicom`` source (a CSV with a path column and a
label column, or one 0/1 column per label for a multi-label task, paths relative to the CSV's folder); reads each
file through one guarded path (no symbolic link, no FIFO or device, no path leaving the manifest's folder, a byte
cap); decodes PNG/JPEG/TIFF with Pillow under a pixel cap (decompression bombs) and DICOM through
:mod:`.dicom_files`; converts to grey or RGB and fits the image to ``size`` x ``size`` (centre crop to a square,
then resize).

What it does not do: import torch (``secure-oneshot data check`` runs without it), follow links, or guess a label
map from directory order: every hospital names its classes in the same order in its config.

Every problem is a one-line :class:`DataError` naming the file (escaped for the terminal) and the problem.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from .._internal.termsafe import printable
from ..errors import DataError

__all__ = ["SOURCES", "IMAGE_SUFFIXES", "SourceConfig", "Entry", "Finding", "list_entries", "read_regular_file", "decode_file"]

SOURCES = ("medmnist", "folder", "manifest", "dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "MPO")   # MPO: a JPEG with extra frames, written by some cameras
MAX_FILE_BYTES = 256 * 1024 * 1024             # one image or DICOM file; a larger one is refused unread
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 50_000_000                        # about 7000 x 7000: above any plain radiograph, below a bomb
CHECK_HINT = "run `secure-oneshot data check` on the same config to list every problem at once"


@dataclass(frozen=True)
class SourceConfig:
    """Where a site's own images are and how they become training records."""

    kind: str                        # folder | manifest | dicom
    classes: tuple[str, ...]         # label map: index i is classes[i]
    root: str | None = None          # folder: root/<class name>/*.png ...
    manifest: str | None = None      # manifest, dicom: the CSV
    path_column: str = "path"
    label_column: str = "label"
    size: int = 28
    channels: int = 1                # 1: grey, 3: RGB
    label_columns: tuple[str, ...] = ()   # multi-label manifests: one 0/1 column per label (then classes = these names)

    @property
    def multi_label(self) -> bool:
        return bool(self.label_columns)


@dataclass(frozen=True)
class Entry:
    """One record to decode: the name shown to people (relative, escaped), the file, its label index (multi-label:
    its 0/1 value per label)."""

    shown: str
    path: Path
    label: int | tuple[int, ...]


@dataclass(frozen=True)
class Finding:
    """A problem found while listing or decoding: ``kind`` is layout, missing (a class without records), unreadable or label."""

    kind: str
    file: str
    problem: str

    def line(self) -> str:
        return f"{self.file}: {self.problem}"


def _shown(relative: str | os.PathLike[str]) -> str:
    return printable(str(relative), 300)


def read_regular_file(path: Path, shown: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a link, FIFO or device) of at most ``limit`` bytes.

    The check is made on the open descriptor (``O_NOFOLLOW``, ``fstat``), so a file swapped for a link or a FIFO
    after the listing is still refused; ``O_NONBLOCK`` keeps a FIFO from blocking the open.
    """
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise DataError(f"{shown}: is a symbolic link; data files must be regular files", hint="copy the file in place of the link")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except DataError:
        raise
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise DataError(f"{shown}: cannot open ({getattr(e, 'strerror', None) or type(e).__name__})", hint=CHECK_HINT) from e
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{shown}: is not a regular file (a FIFO, device or folder)", hint="data files must be plain files")
        if info.st_size > limit:
            raise DataError(f"{shown}: {info.st_size} bytes, over the {limit}-byte limit for one file", hint=CHECK_HINT)
        blob = f.read(limit + 1)
    if len(blob) > limit:
        raise DataError(f"{shown}: over the {limit}-byte limit for one file", hint=CHECK_HINT)
    return blob


# ---- listing ----------------------------------------------------------------------------------------------------


def _folder_entries(cfg: SourceConfig) -> tuple[list[Entry], list[Finding]]:
    root = Path(cfg.root or ".")
    if not root.is_dir():
        raise DataError(f"image folder {_shown(root)} not found", hint="set [data] root (or --data-root) to the folder holding one sub-folder per class")
    findings: list[Finding] = []
    by_class: dict[str, list[Entry]] = {}
    for entry in sorted(os.scandir(root), key=lambda e: os.fsencode(e.name)):
        if entry.name.startswith("."):
            continue  # .DS_Store, .Trashes and the like
        if entry.is_symlink():
            findings.append(Finding("layout", _shown(entry.name), "is a symbolic link; class folders must be real folders"))
        elif not entry.is_dir(follow_symlinks=False):
            findings.append(Finding("layout", _shown(entry.name), "is a file at the top level; images go in one folder per class"))
        elif entry.name not in cfg.classes:
            findings.append(Finding("label", _shown(entry.name), f"folder is not a class in the label map {list(cfg.classes)}"))
        else:
            by_class[entry.name] = []
            _walk(Path(entry.path), PurePosixPath(entry.name), cfg.classes.index(entry.name), by_class[entry.name], findings)
    for name in cfg.classes:
        if name not in by_class:
            findings.append(Finding("missing", _shown(name), "class in the label map has no folder (no records of this class)"))
    return [e for name in cfg.classes for e in by_class.get(name, [])], findings


def _walk(folder: Path, relative: PurePosixPath, label: int, out: list[Entry], findings: list[Finding]) -> None:
    """Image files under ``folder`` (recursively, in byte order of names); links and odd files become findings."""
    for entry in sorted(os.scandir(folder), key=lambda e: os.fsencode(e.name)):
        rel = relative / entry.name
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            _walk(Path(entry.path), rel, label, out, findings)
        elif entry.is_symlink():
            findings.append(Finding("unreadable", _shown(rel), "is a symbolic link; data files must be regular files"))
        elif entry.name.lower().endswith(IMAGE_SUFFIXES):
            out.append(Entry(_shown(rel), Path(entry.path), label))
        # other files (Thumbs.db, notes) are not records and are left alone


def _manifest_path(base: Path, cell: str) -> tuple[Path | None, str | None]:
    """``cell`` as a path under ``base``, or why it is refused (absolute, ``..``, a link on the way, empty)."""
    if not cell:
        return None, "empty path"
    if "\x00" in cell:
        return None, "path contains a NUL byte"
    if cell.startswith(("/", "\\")) or PureWindowsPath(cell).drive or PurePosixPath(cell).is_absolute():
        return None, "absolute path; paths must be relative to the manifest's folder"
    parts = PurePosixPath(cell.replace("\\", "/")).parts
    if ".." in parts:
        return None, "path leaves the manifest's folder (..)"
    path = base
    for part in parts[:-1]:
        path = path / part
        if path.is_symlink():
            return None, f"{_shown(part)} on the way is a symbolic link"
    return base.joinpath(*parts), None


def _manifest_entries(cfg: SourceConfig) -> tuple[list[Entry], list[Finding]]:
    manifest = Path(cfg.manifest or "manifest.csv")
    shown = _shown(manifest)
    blob = read_regular_file(manifest, shown, MAX_MANIFEST_BYTES)
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{shown}: not UTF-8 text (byte {e.start})", hint="save the manifest as UTF-8 CSV") from e
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as e:
        raise DataError(f"{shown}: not a valid CSV file ({printable(str(e), 200)})", hint="one header row, then path,label rows") from e
    if not rows:
        raise DataError(f"{shown}: empty manifest", hint=f"the first row names the columns, e.g. {cfg.path_column},{cfg.label_column}")
    header = [h.strip() for h in rows[0]]
    label_columns = cfg.label_columns or (cfg.label_column,)
    missing = [c for c in (cfg.path_column, *label_columns) if c not in header]
    if missing:
        raise DataError(f"{shown}: no column {printable(missing[0], 100)!r} (columns: {printable(', '.join(header), 200)})",
                        hint="set [data] path_column / label_column (label_columns) to the manifest's column names")
    p, columns = header.index(cfg.path_column), [header.index(c) for c in label_columns]
    l = columns[0]
    base = manifest.parent
    entries: list[Entry] = []
    findings: list[Finding] = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        where = f"{shown} line {number}"
        if len(row) <= max(p, *columns):
            findings.append(Finding("layout", where, f"has {len(row)} cells, fewer than the header's"))
            continue
        cell = row[p].strip()
        path, why = _manifest_path(base, cell)
        if path is None:
            findings.append(Finding("unreadable", f"{where} ({_shown(cell)})", why or "bad path"))
            continue
        if cfg.multi_label:
            values = [row[c].strip() for c in columns]
            bad = next((i for i, v in enumerate(values) if v not in ("0", "1")), None)
            if bad is not None:
                findings.append(Finding("label", f"{where} ({_shown(cell)})", f"column {_shown(label_columns[bad])!r}: value "
                                        f"{_shown(values[bad])!r} is not 0 or 1 (multi-label columns hold 0 or 1)"))
                continue
            entries.append(Entry(_shown(cell), path, tuple(int(v) for v in values)))
            continue
        label = row[l].strip()
        if label not in cfg.classes:
            findings.append(Finding("label", f"{where} ({_shown(cell)})", f"label {_shown(label)!r} is not in the label map {list(cfg.classes)}"))
            continue
        entries.append(Entry(_shown(cell), path, cfg.classes.index(label)))
    return entries, findings


def list_entries(cfg: SourceConfig) -> tuple[list[Entry], list[Finding]]:
    """The records of a source in their canonical order (folder: label-map order, then file name bytes; manifest:
    row order) and the listing problems.  Raises DataError only when nothing can be listed at all."""
    if cfg.kind == "folder":
        return _folder_entries(cfg)
    if cfg.kind in ("manifest", "dicom"):
        return _manifest_entries(cfg)
    raise DataError(f"unknown data source {cfg.kind!r}", hint=f"choose one of {SOURCES}")


# ---- decoding ---------------------------------------------------------------------------------------------------


def _pil_image(blob: bytes, shown: str):  # type: ignore[no-untyped-def]
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(blob))
            if image.format not in PIL_FORMATS:
                raise DataError(f"{shown}: a {image.format} image; accepted are PNG, JPEG and TIFF", hint=CHECK_HINT)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise DataError(f"{shown}: {width} x {height} pixels, over the {MAX_PIXELS}-pixel limit", hint="downscale it first")
            if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":
                raise DataError(f"{shown}: has {image.n_frames} frames; one image per file", hint=CHECK_HINT)
            image.load()
        except DataError:
            raise
        except UnidentifiedImageError as e:
            raise DataError(f"{shown}: not a readable PNG, JPEG or TIFF image", hint=CHECK_HINT) from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(f"{shown}: too many pixels (decompression bomb guard)", hint="downscale it first") from e
        except Exception as e:  # Pillow's decoders raise OSError, ValueError, SyntaxError, struct.error... on bad data
            raise DataError(f"{shown}: corrupt image ({type(e).__name__})", hint=CHECK_HINT) from e
    return image


def _grey_levels(image):  # type: ignore[no-untyped-def]
    """Deep greys (16-bit PNG/TIFF, 32-bit integer or float) as 8-bit "L": 16-bit by the full 16-bit range,
    wider or float by the image's own min..max (their range is not known from the file)."""
    from PIL import Image

    if image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float64) / 257.0
    elif image.mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        low, high = float(values.min()), float(values.max())
        if not (low >= 0 and high <= 255):
            values = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    else:
        return image
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def fit_image(image, size: int, channels: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Grey ("L") or RGB, centre-cropped to a square and resized to ``size`` (no-op for an image of that size)."""
    from PIL import Image, ImageOps

    image = _grey_levels(image).convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    return np.asarray(image, dtype=np.uint8).copy()


def decode_file(entry: Entry, cfg: SourceConfig) -> tuple[np.ndarray, tuple[int, int], bytes]:
    """One record: its uint8 image (size x size [x 3]), its original (width, height), and its file bytes."""
    blob = read_regular_file(entry.path, entry.shown)
    if cfg.kind == "dicom":
        from .dicom_files import decode_dicom

        image = decode_dicom(blob, entry.shown)
    else:
        image = _pil_image(blob, entry.shown)
    return fit_image(image, cfg.size, cfg.channels), image.size, blob
