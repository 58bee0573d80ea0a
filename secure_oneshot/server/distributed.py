"""The distillation on several processes (``torchrun``): one rank per device, the student under DDP.

``torchrun --nproc-per-node N -m secure_oneshot distill ...`` starts ``N``
copies of the command; each reads its place from the environment torchrun
sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, :meth:`Distributed.from_env`).
Every rank loads and verifies the site models itself, inverts **its own**
synthetic batch each epoch and replays its own snapshots, noise -> realistic,
one SGD step each; the student is wrapped in ``DistributedDataParallel``, so
each step's gradients are averaged over the ranks.  Every rank takes the same
number of steps per epoch (``steps // snapshot_every``), so the all-reduces
line up.  The teachers need no synchronised BatchNorm: the inversion's
BatchNorm-statistics loss is per batch.

Seeds: rank 0 inverts exactly the batches of the single-process command (run
seed + epoch); rank ``r`` shifts the run seed by ``r * RANK_SEED_STRIDE``, so
no two (rank, epoch) pairs share a batch.  A world of size 1 is the plain
command: no process group, no DDP wrapper, the same numbers bit for bit.

Modes (``--ddp-mode``), for a method batch of ``B`` images and ``W`` ranks:

* ``faithful``: each rank inverts ``B / W`` images (``B`` must be divisible by
  ``W``), so every step sees ``B`` images in all, its gradient is the mean over
  those ``B`` (DDP averages the ranks' means of equal-sized batches), and the
  learning rate, steps per epoch and epochs are the method's: the global batch
  and the schedule equal the single-process run.  What differs: each rank's
  inversion matches BatchNorm statistics on its ``B / W`` images, and the
  student's BatchNorm normalises each rank's snapshot alone (no SyncBatchNorm),
  as data-parallel training usually does.
* ``throughput``: each rank inverts ``B`` images: ``W * B`` images per step,
  the same learning rate and number of steps, so ``W`` times the images per
  epoch in about the time of one rank's epoch.

Only rank 0 writes (global model, reports, image grid, checkpoints, audit
record); every rank reads the checkpoint on resume.  ``gloo`` on CPU, ``nccl``
on CUDA (rank ``r`` on ``cuda:LOCAL_RANK``).

Failure: a rank that dies (killed, out of memory, a lost machine) breaks the
collectives of the others.  :meth:`Distributed.failures_as_errors` turns what
the survivors then see -- a gloo/nccl error from the dead peer, a collective
that times out (``$SECURE_ONESHOT_DDP_TIMEOUT_S``, default torch's 30 minutes),
or the SIGTERM with which torchrun stops the remaining ranks -- into one
:class:`RankLostError`, so each rank ends with one error line, no traceback.
Nothing is written after training (rank 0 writes the global model only after the
last epoch), so a job that stops leaves the checkpoints and no global model.

What this module does not do: start processes (torchrun does), or restart
them (torchrun's ``--max-restarts`` with ``distill --resume``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ResourceError
from .synthesis import InversionConfig

__all__ = ["DDP_MODES", "DDP_TIMEOUT_ENV", "RANK_SEED_STRIDE", "Distributed", "RankLostError", "image_digest"]

DDP_TIMEOUT_ENV = "SECURE_ONESHOT_DDP_TIMEOUT_S"
"""Seconds a collective waits for the other ranks before the job stops (unset: torch's default, 30 minutes)."""
_PEER_FAILURE_MARKS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out", "operation timeout")


class RankLostError(ResourceError):
    """A rank of a distributed run died or stopped answering, so this rank stops too (the job ends; resume it)."""


class _Terminated(BaseException):
    """SIGTERM, as an exception: torchrun stops the remaining ranks this way when one dies."""

DDP_MODES = ("faithful", "throughput")
RANK_SEED_STRIDE = 1_000_000_007
"""Rank ``r``'s inversion seeds are the run's shifted by ``r`` times this (more than any run's epochs)."""


def image_digest(images: Tensor | None) -> str:
    """SHA-256 of a batch of images (float32 bytes in NCHW order), or ``""`` for none."""
    if images is None:
        return ""
    return hashlib.sha256(images.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name} must be an integer, got {value[:20]!r}", hint="launch with torchrun, which sets it") from None


def collective_timeout() -> timedelta | None:
    """``$SECURE_ONESHOT_DDP_TIMEOUT_S`` as a timedelta (unset or empty: ``None``, torch's default).

    Raises:
        ConfigError: not a positive number.
    """
    value = os.environ.get(DDP_TIMEOUT_ENV, "")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"${DDP_TIMEOUT_ENV} must be a positive number of seconds, got {value[:20]!r}",
                          hint="unset it for torch's default (30 minutes)")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a distributed run (world size 1: the plain command).

    Raises:
        ConfigError: an unknown mode, or a rank outside the world.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    mode: str = "faithful"

    def __post_init__(self) -> None:
        if self.mode not in DDP_MODES:
            raise ConfigError(f"unknown DDP mode {self.mode!r}", hint=f"use one of {', '.join(DDP_MODES)}")
        if not (self.world_size >= 1 and 0 <= self.rank < self.world_size and self.local_rank >= 0):
            raise ConfigError(f"rank {self.rank} / local rank {self.local_rank} does not fit a world of {self.world_size}",
                              hint="launch with torchrun, which sets WORLD_SIZE, RANK and LOCAL_RANK")

    @classmethod
    def from_env(cls, mode: str = "faithful") -> Distributed:
        """From torchrun's ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (absent: a world of one)."""
        return cls(_env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), mode)

    @property
    def active(self) -> bool:
        """More than one process: a process group and DDP are needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes."""
        return self.rank == 0

    def threads(self) -> int:
        """Default torch threads per rank: this process's CPUs shared by the ranks of this machine (``LOCAL_WORLD_SIZE``),
        so that N ranks do not each start a thread per CPU."""
        from .._internal.threads import available_cpus

        return max(1, available_cpus() // max(1, _env_int("LOCAL_WORLD_SIZE", 1)))

    def device(self, requested: str) -> str:
        """This rank's device: ``cuda`` / ``auto`` with a GPU become ``cuda:LOCAL_RANK`` when several ranks run."""
        if self.active and (requested == "cuda" or (requested == "auto" and torch.cuda.is_available())):
            return f"cuda:{self.local_rank}"
        return requested

    def start(self, device: torch.device) -> None:
        """Join the process group (``nccl`` on CUDA, ``gloo`` on CPU); nothing for a world of one."""
        if not self.active or torch.distributed.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = collective_timeout()
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             **({"timeout": timeout} if timeout is not None else {}))

    def stop(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    @contextmanager
    def failures_as_errors(self, run_folder: Any) -> Iterator[None]:
        """Inside: another rank's death, as this rank sees it, raises :class:`RankLostError` (nothing for a world of one).

        Seen as: a gloo/nccl error or a collective's timeout (``RuntimeError``, ``torch.distributed.DistError``),
        or SIGTERM (torchrun's agent stops the surviving ranks with it; the handler is restored on the way out).
        Any other error passes through unchanged.
        """
        if not self.active:
            yield
            return

        def terminated(signum: int, frame: FrameType | None) -> None:
            raise _Terminated

        previous = signal.signal(signal.SIGTERM, terminated)
        try:
            yield
        except _Terminated:
            raise self._lost(run_folder, "stopped by SIGTERM (torchrun stops every rank when one fails)") from None
        except RuntimeError as error:   # torch.distributed.DistError is a RuntimeError
            if not (isinstance(error, torch.distributed.DistError)
                    or any(mark in str(error).lower() for mark in _PEER_FAILURE_MARKS)):
                raise
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise self._lost(run_folder, f"a collective failed: {first[:160]}") from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _lost(self, run_folder: Any, how: str) -> RankLostError:
        return RankLostError(f"rank {self.rank} of {self.world_size}: another rank died or stopped answering; {how}; "
                             "the run did not finish",
                             hint=f"rerun the same torchrun command with --resume: it continues from the last complete "
                                  f"checkpoint in {run_folder}/checkpoint (${DDP_TIMEOUT_ENV} bounds the wait for a silent rank)")

    def inversion(self, synth: InversionConfig) -> InversionConfig:
        """This rank's inversion: its batch size (by mode) and its seeds (rank 0: the plain command's).

        Raises:
            ConfigError: faithful mode with a batch that does not split evenly over the ranks.
        """
        if not self.active:
            return synth
        batch = synth.batch_size
        if self.mode == "faithful":
            if batch % self.world_size:
                raise ConfigError(f"faithful mode splits the batch of {batch} images over {self.world_size} ranks, "
                                  "which does not divide evenly",
                                  hint="use a number of processes that divides the batch, or --ddp-mode throughput")
            batch //= self.world_size
        return dataclasses.replace(synth, batch_size=batch, seed=synth.seed + self.rank * RANK_SEED_STRIDE)

    def wrap(self, student: nn.Module) -> nn.Module:
        """The student under ``DistributedDataParallel`` (identity for a world of one)."""
        if not self.active:
            return student
        from torch.nn.parallel import DistributedDataParallel

        device = next(student.parameters()).device
        return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    def gather_digests(self, images: Tensor | None) -> list[str]:
        """Every rank's :func:`image_digest` of ``images``, in rank order (a collective: every rank calls it)."""
        mine = image_digest(images)
        if not self.active:
            return [mine]
        device = images.device if images is not None else torch.device("cpu")
        local = torch.tensor(list(bytes.fromhex(mine)) if mine else [0] * 32, dtype=torch.uint8, device=device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, local)
        return [bytes(t.cpu().tolist()).hex() for t in gathered]

    def describe(self, synth: InversionConfig) -> dict[str, Any]:
        """For the report and the fingerprint: world size, mode, and the per-rank and global batch."""
        if not self.active:
            return {"world_size": 1}
        per_rank = self.inversion(synth).batch_size
        return {"world_size": self.world_size, "mode": self.mode, "per_rank_batch": per_rank,
                "global_batch": per_rank * self.world_size}
