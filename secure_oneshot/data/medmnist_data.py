"""Load 2D MedMNIST datasets through the ``medmnist`` package, from a local root, normalised to [-1, 1].

What it does: finds ``<root>/<flag>[_<size>].npz`` (the official file names),
loads it with ``medmnist``'s own dataset class (so file naming and array layout
are the package's), and returns uint8 arrays plus the task facts.  A site can
also point at its own MedMNIST-format ``.npz`` (:func:`load_npz`).

What it does not do: download silently.  A hospital machine must not reach
out on its own, so downloading is opt-in (``download=True`` / ``--download``);
a missing file is a :class:`DataError` naming the file, the folder and how to
get it.  Ordinal-regression tasks (RetinaMNIST) are trained and evaluated as
multi-class, as the MedMNIST benchmark does (:func:`trained_as`); multi-label
tasks (ChestMNIST) keep their labels as ``(N, L)`` 0/1 vectors (:func:`is_multi_label`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import DataError

__all__ = ["DATA_ENV", "SPLITS", "SIZES", "medmnist_file", "MedMNISTSplit", "SiteData", "load_medmnist", "load_npz", "to_dataset", "default_root", "num_classes",
           "trained_as", "task_note", "is_multi_label", "MULTI_LABEL"]

DATA_ENV = "SECURE_ONESHOT_DATA"
SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
MULTI_LABEL = "multi-label, binary-class"   # medmnist's name of the multi-label task type (ChestMNIST)
SUPPORTED_TASKS = ("binary-class", "multi-class", "ordinal-regression", MULTI_LABEL)
# The MedMNIST benchmark trains and evaluates its ordinal-regression sets as plain multi-class problems.
_TRAINED_AS = {"ordinal-regression": "multi-class"}


@dataclass(frozen=True)
class MedMNISTSplit:
    """One split: ``images`` uint8 (N, H, W) or (N, H, W, 3); ``labels`` int64 (N,), or (N, L) 0/1 for multi-label."""

    flag: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    n_classes: int
    n_channels: int
    task: str

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """SHA-256 over the exact images and labels: identifies these records in DP records and training records."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.ascontiguousarray(self.labels).tobytes())
        return f"sha256:{digest.hexdigest()}"

    def subset(self, indices: np.ndarray) -> MedMNISTSplit:
        return MedMNISTSplit(self.flag, self.split, self.images[indices], self.labels[indices], self.n_classes, self.n_channels, self.task)


@dataclass(frozen=True)
class SiteData:
    """What one site trains on: its records, a held-out slice of them for local validation, and the public test split."""

    train: MedMNISTSplit
    val: MedMNISTSplit
    test: MedMNISTSplit | None = None


def default_root() -> Path:
    """``$SECURE_ONESHOT_DATA``, else medmnist's own default (``~/.medmnist``)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    import medmnist.info

    return Path(medmnist.info.DEFAULT_ROOT)


def _info(flag: str) -> dict:
    from medmnist import INFO

    if flag not in INFO:
        known = ", ".join(sorted(f for f in INFO if not f.endswith("3d")))
        raise DataError(f"unknown MedMNIST flag {flag!r}", hint=f"2D flags: {known}")
    if flag.endswith("3d"):
        raise DataError(f"{flag} is a 3D dataset; only 2D MedMNIST is supported")
    info = INFO[flag]
    if info["task"] not in SUPPORTED_TASKS:
        raise DataError(
            f"{flag} is a {info['task']} task, which this version does not train",
            hint="use a binary-class, multi-class, ordinal-regression or multi-label dataset such as pneumoniamnist, bloodmnist, retinamnist or chestmnist",
        )
    return info


def is_multi_label(task: str) -> bool:
    """Labels are ``(N, L)`` 0/1 vectors (one binary decision per label), not one class per record."""
    return task == MULTI_LABEL


def trained_as(task: str) -> str:
    """The task type a MedMNIST task is trained and evaluated as (ordinal regression: multi-class)."""
    return _TRAINED_AS.get(task, task)


def task_note(task: str) -> str | None:
    """A plain sentence for records and reports when a task is trained as another type, else ``None``."""
    return f"{task} trained as {trained_as(task)} (as the MedMNIST benchmark does)" if trained_as(task) != task else None


def num_classes(flag: str) -> int:
    """How many classes a 2D MedMNIST flag has (from medmnist's INFO: no data read)."""
    return len(_info(flag)["label"])


def _file_name(flag: str, size: int) -> str:
    if size not in SIZES:
        raise DataError(f"size {size} is not a MedMNIST size", hint=f"choose one of {SIZES}")
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _missing(path: Path, flag: str, size: int) -> DataError:
    return DataError(
        f"MedMNIST file {path.name} not found in {path.parent}",
        hint=(f"copy the official {path.name} there (https://zenodo.org/records/10519652), point --data-root or "
              f"{DATA_ENV} at the folder that has it, or pass --download on a machine allowed to reach zenodo.org"),
    )


def _split_from_arrays(flag: str, split: str, images: np.ndarray, labels: np.ndarray, info: dict) -> MedMNISTSplit:
    n_classes = len(info["label"])
    labels = np.asarray(labels)
    if is_multi_label(info["task"]):
        if labels.ndim != 2 or labels.shape[1] != n_classes:
            raise DataError(f"{flag} {split}: multi-label labels must have shape (N, {n_classes}), got {labels.shape}")
        labels = labels.astype(np.int64)
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise DataError(f"{flag} {split}: multi-label labels must be 0 or 1")
    else:
        labels = labels.reshape(-1).astype(np.int64)  # (N, 1) -> (N,)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
        raise DataError(f"{flag} {split}: images must be uint8 (N, H, W[, 3]) matching the labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"{flag} {split}: labels outside 0..{n_classes - 1}")
    return MedMNISTSplit(flag, split, images, labels, n_classes, int(info["n_channels"]), info["task"])


def medmnist_file(flag: str, size: int = 28, root: str | os.PathLike[str] | None = None) -> Path:
    """The path of ``flag``'s file at ``size`` px (``<flag>.npz`` at 28, else ``<flag>_<size>.npz``) in ``root``.

    Raises:
        DataError: unknown flag or size, or no such file (naming it, with how to get it).
    """
    _info(flag)
    path = (Path(root) if root is not None else default_root()) / _file_name(flag, size)
    if not path.is_file():
        raise _missing(path, flag, size)
    return path


def load_medmnist(flag: str, split: str, *, size: int = 28, root: str | os.PathLike[str] | None = None, download: bool = False) -> MedMNISTSplit:
    """One split of a MedMNIST dataset, through the ``medmnist`` package.

    Raises:
        DataError: unknown or unsupported flag, missing file (with how to get it), malformed arrays.
    """
    info = _info(flag)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    folder = Path(root) if root is not None else default_root()
    path = folder / _file_name(flag, size)
    if not path.is_file() and not download:
        raise _missing(path, flag, size)
    import medmnist

    dataset_class = getattr(medmnist, info["python_class"])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        dataset = dataset_class(split=split, root=str(folder), size=size, download=download)
    except Exception as e:  # medmnist raises RuntimeError/URLError/... with no common base
        raise DataError(f"could not load {path}: {e}", hint=_missing(path, flag, size).hint) from e
    return _split_from_arrays(flag, split, dataset.imgs, dataset.labels, info)


def load_npz(path: str | os.PathLike[str], flag: str, split: str) -> MedMNISTSplit:
    """A split from a site's own MedMNIST-format ``.npz`` (``<split>_images``, ``<split>_labels``), described by ``flag``."""
    info = _info(flag)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return _split_from_arrays(flag, split, npz[f"{split}_images"], npz[f"{split}_labels"], info)
    except FileNotFoundError as e:
        raise DataError(f"{path} not found", hint="check the site's data file path") from e
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"{path} is not a MedMNIST-format file ({e})", hint="it needs train/val/test _images and _labels arrays") from e


def to_dataset(data: MedMNISTSplit) -> TensorDataset:
    """Float images in [-1, 1] (mean 0.5, std 0.5 as in the method), NCHW, and int64 labels ((N,) or (N, L))."""
    images = torch.from_numpy(np.ascontiguousarray(data.images)).float().div_(255.0)
    if images.ndim == 3:
        images = images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    else:
        images = images.permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    return TensorDataset(images.sub_(0.5).div_(0.5), torch.from_numpy(data.labels))
