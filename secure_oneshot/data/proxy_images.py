"""A public, unlabelled image set held by the server: the distillation's proxy images.

Distillation needs images to show the student; the method makes them by model inversion, and inversion from
DP (GroupNorm) sites keeps less than the sites know (measured in ``benchmarks/RESULTS.md``).  A server that
holds public images of a related kind can add them: the site models label them (their logits are the KD
targets, post-processing of what the sites released), so no site record is involved and no privacy budget
is spent.  The labels of the public set, if it has any, are never read.

Two kinds of source, both resized to the sites' image size and channel count:

* ``FLAG`` or ``FLAG:SPLIT`` -- a MedMNIST set under the data root (``pneumoniamnist:val``; default split
  ``train``).  In a study, the *other* MedMNIST set is a public set that no simulated hospital holds.
* a directory -- every PNG, JPEG and TIFF file below it (links, devices and hidden files skipped, files read
  through the same guarded reader as a hospital's own images: size caps, decompression-bomb guard);
* a ``.npz`` file with one uint8 array ``images`` of shape ``(N, H, W)`` or ``(N, H, W, 3)`` at the sites' size
  (what ``demo --public-fraction`` writes: records set aside from the hospitals' pool, a simulation of public
  images of the same modality).

What this module does not do: choose whether proxy images are used (``distill --synthesis``), or import torch
(the caller turns the uint8 array into tensors).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["ProxyImages", "load_proxy_images", "MAX_PROXY_IMAGES"]

MAX_PROXY_IMAGES = 200_000
"""More than any MedMNIST 2D set; bounds the server's memory (200k x 28 x 28 bytes = 157 MB; at 224 px and RGB
a directory of that many images would be 30 GB, so such a set should be subsampled first)."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class ProxyImages:
    """uint8 images ``(N, size, size)`` or ``(N, size, size, 3)``, where they came from, and their digest."""

    images: np.ndarray
    source: str        # "breastmnist:train" or "directory NAME" (the folder's own name only: no server paths in reports)
    sha256: str        # over the decoded images, so a report names exactly the set that was used

    def record(self) -> dict[str, object]:
        return {"source": self.source, "images": int(len(self.images)), "sha256": self.sha256}


def load_proxy_images(spec: str, *, size: int, channels: int, data_root: str | os.PathLike[str] | None = None) -> ProxyImages:
    """The proxy set named by ``spec`` (module docstring), fitted to ``size`` x ``size`` x ``channels``.

    Raises:
        DataError: an unknown set or split, an empty or unreadable directory, too many images.
    """
    path = Path(spec)
    if path.is_dir():
        images, source = _directory(path, size, channels), f"directory {path.name}"
    elif path.suffix == ".npz" and path.is_file():
        images, source = _npz(path, size, channels), f"file {path.name}"
    else:
        images, source = _medmnist(spec, size, channels, data_root)
    if len(images) == 0:
        raise DataError(f"the proxy image set {spec!r} holds no images", hint="name a MedMNIST set (FLAG:SPLIT) or a folder of PNG/JPEG/TIFF files")
    images = np.ascontiguousarray(images)
    return ProxyImages(images, source, hashlib.sha256(images.tobytes()).hexdigest())


def _medmnist(spec: str, size: int, channels: int, data_root: str | os.PathLike[str] | None) -> tuple[np.ndarray, str]:
    from .medmnist_data import load_medmnist

    flag, _, split = spec.partition(":")
    split = split or "train"
    if split not in ("train", "val", "test"):
        raise DataError(f"proxy split {split!r} is not one of train, val, test", hint="write FLAG:SPLIT, e.g. breastmnist:train")
    if not flag.isidentifier():
        raise DataError(f"proxy image set {spec!r} is neither a folder nor a MedMNIST set name",
                        hint="write FLAG:SPLIT (e.g. breastmnist:train) or the path of an existing folder")
    data = load_medmnist(flag, split, size=size, root=data_root)
    images = data.images
    if len(images) > MAX_PROXY_IMAGES:
        raise DataError(f"the proxy set {spec} has {len(images)} images, over {MAX_PROXY_IMAGES}", hint="use a smaller split")
    return _fit_channels(images, channels), f"{flag}:{split}"


def _npz(path: Path, size: int, channels: int) -> np.ndarray:
    from .image_files import read_regular_file

    import io

    limit = MAX_PROXY_IMAGES * size * size * 3 + (1 << 20)
    blob = read_regular_file(path, path.name, limit=limit)
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            if npz.zip.getinfo("images.npy").file_size > limit:   # a compressed member is bounded before it is inflated
                raise DataError(f"{path.name}: the images array is over {limit} bytes", hint="subsample it first")
            images = npz["images"]
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"{path.name} is not a proxy image file ({e})", hint="it needs one uint8 array named images") from e
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[1:3] != (size, size) \
            or (images.ndim == 4 and images.shape[3] != 3) or len(images) > MAX_PROXY_IMAGES:
        raise DataError(f"{path.name}: images are {images.dtype} {images.shape}; expected uint8 (N, {size}, {size}[, 3]), "
                        f"N <= {MAX_PROXY_IMAGES}", hint="write the images at the sites' size")
    return _fit_channels(images, channels)


def _fit_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Grey <-> RGB as the sites expect (ITU-R 601 luma for RGB -> grey, as Pillow's "L" conversion)."""
    if channels == 1 and images.ndim == 4:
        luma = images[..., 0] * 0.299 + images[..., 1] * 0.587 + images[..., 2] * 0.114
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    if channels == 3 and images.ndim == 3:
        return np.repeat(images[..., None], 3, axis=3)
    return images


def _directory(root: Path, size: int, channels: int) -> np.ndarray:
    from .image_files import _pil_image, fit_image, read_regular_file

    files: list[Path] = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            candidate = Path(folder) / name
            if name.startswith(".") or candidate.suffix.lower() not in IMAGE_SUFFIXES or candidate.is_symlink():
                continue
            files.append(candidate)
            if len(files) > MAX_PROXY_IMAGES:
                raise DataError(f"the proxy folder {root.name} has more than {MAX_PROXY_IMAGES} images", hint="subsample it first")
    shape = (size, size) if channels == 1 else (size, size, 3)
    images = np.empty((len(files), *shape), dtype=np.uint8)
    for i, file in enumerate(files):
        shown = str(file.relative_to(root))
        images[i] = fit_image(_pil_image(read_regular_file(file, shown), shown), size, channels)
    return images
