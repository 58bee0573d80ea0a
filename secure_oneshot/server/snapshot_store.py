"""An epoch's distillation batches, held in memory up to a budget and spilled to a private file beyond it.

One epoch of distillation replays every kept inversion snapshot several times (teacher replay, the
noise-adapted teacher, the student's steps, BatchNorm recalibration), so the snapshots must outlive
the inversion that produced them.  At 28 px they are small (the paper preset, RGB: 256 images x 500
steps x 3 x 28 x 28 float32 = 1.2 GB) and stay on the device exactly as they were handed over.  At
224 px they are not (50 images x 1,000 steps x 3 x 224 x 224 float32 = 30 GB), so once the images of
an epoch would exceed ``budget_bytes`` every image held so far, and every later one, goes to one
temporary file instead and is read back one snapshot (or one replay chunk of consecutive snapshots)
at a time, moved to the device only when it is used.

Exactness: the file holds each tensor's raw bytes in its dtype (no conversion, no quantisation), and
a read restores the dtype, shape and strides (channels-last or not), so every consumer sees
bit-for-bit the tensor it would have seen in memory.  The per-image weights ``a`` (one number per
image) always stay in memory.

The file: ``0600`` in a fresh ``0700`` directory from :func:`tempfile.mkdtemp` (under ``spill_dir`` when
given), never reopened by name; both are removed by :meth:`SnapshotStore.close`, which ``with`` calls
on any exit (KeyboardInterrupt included), with a finaliser as the last resort.

What this module does not do: decide which images are kept or in which order.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_SNAPSHOT_MEMORY_MIB", "SnapshotStore"]

DEFAULT_SNAPSHOT_MEMORY_MIB = 2048
"""Images held in memory per epoch before spilling: above every 28 px preset (at most 1.2 GB, paper preset, RGB)."""

Snapshot = tuple[Tensor, Tensor]


def _remove(directory: str, fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    shutil.rmtree(directory, ignore_errors=True)


class SnapshotStore(Sequence[Snapshot]):
    """An ordered sequence of ``(images (N, C, H, W), a (N,))`` on ``device``; ``store[i]`` reads one back.

    ``budget_bytes = None``: never spill (everything in memory, as a plain list).
    """

    def __init__(self, device: torch.device | str, budget_bytes: int | None = DEFAULT_SNAPSHOT_MEMORY_MIB << 20,
                 spill_dir: str | Path | None = None) -> None:
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.spill_dir = spill_dir
        self._held: list[Tensor | None] = []        # images in memory (None: in the file)
        self._weights: list[Tensor] = []
        self._teacher_only: list[bool] = []         # a == 1 for every image: the noise-adapted teacher has no say
        self._layout: list[tuple[torch.Size, tuple[int, ...], torch.dtype]] = []  # shape, strides, dtype
        self._offsets: list[int] = []               # byte offset in the file (spilled images only)
        self._held_bytes = 0
        self._fd: int | None = None
        self._end = 0
        self._directory: str | None = None
        self._finalizer: weakref.finalize | None = None

    # --- writing ----------------------------------------------------------------------------------

    def append(self, images: Tensor, a: Tensor, *, teacher_only: bool = False) -> None:
        """Keep one batch; ``images`` is kept as is while it fits the budget (no copy).

        ``teacher_only``: the caller knows that ``a`` is 1 for every image (realistic images, which only the
        teacher labels), so the distillation can skip the noise-adapted teacher for this batch; the flag is
        the caller's, since reading ``a`` back would wait for the device.
        """
        size = images.numel() * images.element_size()
        strides = images.stride() if _dense(images) else images.contiguous().stride()
        self._layout.append((images.shape, strides, images.dtype))
        self._weights.append(a)
        self._teacher_only.append(teacher_only)
        if self._fd is None and (self.budget_bytes is None or self._held_bytes + size <= self.budget_bytes):
            self._held.append(images)
            self._offsets.append(-1)
            self._held_bytes += size
            return
        if self._fd is None:
            self._open()
            for i, held in enumerate(self._held):   # keep the file in snapshot order: spill what is held first
                assert held is not None
                self._offsets[i] = self._write(held)
                self._held[i] = None
            self._held_bytes = 0
        self._held.append(None)
        self._offsets.append(self._write(images))

    def _open(self) -> None:
        directory = tempfile.mkdtemp(prefix="secure-oneshot-snapshots-", dir=None if self.spill_dir is None else str(self.spill_dir))
        try:
            fd = os.open(os.path.join(directory, "snapshots.bin"), os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o600)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._directory, self._fd = directory, fd
        self._finalizer = weakref.finalize(self, _remove, directory, fd)

    def _write(self, images: Tensor) -> int:
        """Append the bytes of ``images``'s memory, in memory order; returns their offset."""
        assert self._fd is not None
        x = images.detach().to("cpu")
        x = x if _dense(x) else x.contiguous()
        data = torch.as_strided(x, (x.numel(),), (1,), x.storage_offset()).view(torch.uint8).numpy()
        offset, view = self._end, memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view, offset + (len(data) - len(view)))
            view = view[written:]
        self._end += len(data)
        return offset

    # --- reading ----------------------------------------------------------------------------------

    @property
    def spilled(self) -> bool:
        """Whether the images are in the file (the budget was exceeded)."""
        return self._fd is not None

    @property
    def sizes(self) -> list[int]:
        """Images per snapshot."""
        return [shape[0] for shape, _, _ in self._layout]

    def teacher_only(self, i: int) -> bool:
        """Whether batch ``i`` was appended with ``teacher_only`` (``a`` is 1 for every image)."""
        return self._teacher_only[i]

    def image_numel(self, i: int = 0) -> int:
        """Elements of one image of snapshot ``i``."""
        shape = self._layout[i][0]
        return shape[1:].numel()

    def __len__(self) -> int:
        return len(self._layout)

    def __getitem__(self, i: int | slice) -> Any:
        """Snapshot ``i`` (its images read back when spilled); a slice gives a list (every one read back)."""
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        i = range(len(self))[i]
        return self.images(i, i + 1), self._weights[i]

    def __iter__(self) -> Iterator[Snapshot]:
        for i in range(len(self)):
            yield self[i]

    def images(self, start: int, stop: int) -> Tensor:
        """The images of snapshots ``start .. stop - 1`` on the device, concatenated (``torch.cat``) when more than one."""
        if stop - start == 1:
            return self._image(start)
        return torch.cat([self._image(i) for i in range(start, stop)])

    def _image(self, i: int) -> Tensor:
        held = self._held[i]
        if held is not None:
            return held
        assert self._fd is not None
        shape, strides, dtype = self._layout[i]
        out = torch.empty_strided(shape, strides, dtype=dtype)   # the same strides: the same kernels downstream
        raw = torch.as_strided(out, (out.numel(),), (1,), 0).view(torch.uint8).numpy()
        offset, view = self._offsets[i], memoryview(raw).cast("B")
        while view:
            got = os.preadv(self._fd, [view], offset + (len(raw) - len(view)))
            if got <= 0:
                raise OSError("the snapshot file ended early")
            view = view[got:]
        return out.to(self.device)

    # --- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop every snapshot and remove the file (idempotent)."""
        self._held.clear()
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._fd, self._directory = None, None

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _dense(x: Tensor) -> bool:
    """Whether ``x`` covers exactly ``numel`` consecutive elements of its storage (any dimension order)."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(x.shape, x.stride()) if s != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True
