"""Checkpoints of a distillation run: written after every epoch, read by ``distill --resume``.

Layout, inside the run folder::

    checkpoint/
      epoch-000002/  state.safetensors  state.json  complete.json
      epoch-000003/  ...

* ``state.safetensors``: every tensor the next epoch depends on: the student's
  state dict (``student/``), the SGD momentum buffers (``optimizer/<param
  index>/<name>``), the random number generators as ``uint8`` tensors
  (``rng/cpu``, ``rng/cuda/<device>``), the noise-adapted teacher's BatchNorm
  running statistics (``adapted/``, they carry over between epochs in its
  ``eval`` mode) and the teacher weights of the run (``teacher_weights``,
  so that a resumed run does not depend on re-measuring them).
* ``state.json``: the rest: epochs done, the history so far, the execution
  choice, and the job's fingerprint with the fields it hashes.
* ``complete.json``: the SHA-256 of the other two files, written last.

A checkpoint is written into a temporary folder and renamed into place, so a
process killed while writing leaves no ``epoch-*`` folder; one whose files do
not match ``complete.json`` (cut short, changed) is ignored and the previous
one used.  The two newest are kept.  Nothing is pickled: tensors are
safetensors, the rest JSON.

The fingerprint is the SHA-256 of the job settings that decide the result
(inversion and distillation configs, synthesis method, teacher weighting,
student architecture and initialisation, distributed layout) and of every
site model (name, bundle id, SHA-256 of its weights).  A checkpoint with
another fingerprint is refused, naming the settings that differ.

What this module does not do: train, or decide when to resume (the caller).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from .._internal.atomic import fsync_dir
from ..errors import ConfigError
from .distill import TrainingState

__all__ = ["CHECKPOINT_DIR", "KEEP", "Checkpoint", "fingerprint", "model_digest", "save_checkpoint", "load_latest",
           "check_fingerprint", "restore", "clear_checkpoints"]

CHECKPOINT_DIR = "checkpoint"
KEEP = 2
FORMAT = "secure-oneshot-checkpoint/v1"
_EPOCH_DIR = re.compile(r"epoch-(\d{6})")
_TEMPORARY = re.compile(r"\.epoch-\d{6}\.(\d{1,10})\.[0-9a-f]{8}\.tmp")
_FILES = ("state.safetensors", "state.json")


@dataclass
class Checkpoint:
    """One complete checkpoint, read back."""

    path: Path
    epochs_done: int
    tensors: dict[str, Tensor]
    meta: dict[str, Any]

    @property
    def teacher_weights(self) -> Tensor | None:
        return self.tensors.get("teacher_weights")


def model_digest(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def fingerprint(fields: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``fields``."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def check_fingerprint(checkpoint: Checkpoint, fields: dict[str, Any]) -> None:
    """Refuse a checkpoint of another job.

    Raises:
        ConfigError: the fingerprints differ; the message names the settings that differ.
    """
    if checkpoint.meta.get("fingerprint") == fingerprint(fields):
        return
    # Compare through JSON so that tuples and lists, or ints and floats, read alike.
    here = _flatten(json.loads(json.dumps(fields, default=str)))
    there = _flatten(checkpoint.meta.get("fingerprint_fields", {}))
    differ = sorted(k for k in here.keys() | there.keys() if here.get(k) != there.get(k))
    shown = ", ".join(f"{k} ({_short(here.get(k))} here, {_short(there.get(k))} in the checkpoint)" for k in differ[:4])
    more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
    raise ConfigError(f"the checkpoint in {checkpoint.path} is of another job: {shown or 'fingerprint differs'}{more}",
                      hint="resume with the same options and the same accepted site models, or remove "
                           f"{checkpoint.path.parent} to start over")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


# --- capture and restore ------------------------------------------------------------------------


def _adapted_buffers(adapted: nn.Module) -> dict[str, Tensor]:
    """The noise-adapted teacher's state that training changes: its BatchNorm statistics (not the site weights)."""
    parameters = {name for name, _ in adapted.named_parameters()}
    stacked_parameters = {f"_stacked{g}_{i}" for g, names in getattr(adapted, "_param_names", {}).items() for i in range(len(names))}
    return {name: t for name, t in adapted.state_dict().items()
            if name not in parameters and name not in stacked_parameters and name != "_site_scale"}


def _capture(state: TrainingState, teacher_weights: Tensor | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {f"student/{k}": v for k, v in state.student.state_dict().items()}
    other_state: dict[str, dict[str, Any]] = {}
    for index, entry in state.optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                other_state.setdefault(str(index), {})[name] = value
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{device}"] = rng
    if state.adapted is not None:
        tensors.update({f"adapted/{k}": v for k, v in _adapted_buffers(state.adapted).items()})
    if teacher_weights is not None:
        tensors["teacher_weights"] = teacher_weights
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, other_state


def restore(checkpoint: Checkpoint, state: TrainingState) -> None:
    """Load ``checkpoint`` into a fresh :class:`TrainingState` (the student, optimiser, generators, adapted teacher).

    Raises:
        ConfigError: the checkpoint's tensors do not fit this run's models.
    """
    tensors = checkpoint.tensors
    try:
        state.student.load_state_dict(_prefixed(tensors, "student/"), strict=True)
        optimizer_state = state.optimizer.state_dict()
        loaded: dict[int, dict[str, Any]] = {}
        for key, value in _prefixed(tensors, "optimizer/").items():
            index, name = key.split("/", 1)
            loaded.setdefault(int(index), {})[name] = value
        for index, entry in checkpoint.meta.get("optimizer_state", {}).items():
            loaded.setdefault(int(index), {}).update(entry)
        optimizer_state["state"] = loaded
        state.optimizer.load_state_dict(optimizer_state)
        if state.adapted is not None:
            adapted = _prefixed(tensors, "adapted/")
            expected = _adapted_buffers(state.adapted)
            if set(adapted) != set(expected):
                raise ValueError("the noise-adapted teacher's statistics do not match")
            state.adapted.load_state_dict({**state.adapted.state_dict(), **adapted}, strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"the checkpoint in {checkpoint.path} does not fit this run's models ({str(e).splitlines()[0][:160]})",
                          hint=f"remove {checkpoint.path.parent} to start over") from e
    torch.set_rng_state(tensors["rng/cpu"])
    cuda = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda][:torch.cuda.device_count()])
    state.epochs_done = checkpoint.epochs_done
    state.history[:] = list(checkpoint.meta.get("history", []))


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


# --- files ------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, state: TrainingState, fields: dict[str, Any], *, teacher_weights: Tensor | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of ``state`` (``state.epochs_done`` epochs) into ``run_dir/checkpoint`` and keep the
    :data:`KEEP` newest.  Returns its folder."""
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    _sweep_temporaries(root)
    tensors, other_state = _capture(state, teacher_weights)
    meta = {"format": FORMAT, "epochs_done": state.epochs_done, "history": state.history, "fingerprint": fingerprint(fields),
            "fingerprint_fields": fields, "optimizer_state": other_state, **(extra or {})}
    contents = {"state.safetensors": safetensors_save(tensors, metadata={"format": FORMAT}),
                "state.json": (json.dumps(meta, indent=1, default=str) + "\n").encode("utf-8")}
    marker = {"format": FORMAT, "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}}
    name = f"epoch-{state.epochs_done:06d}"
    tmp = root / f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    tmp.mkdir()
    try:
        for filename, data in [*contents.items(), ("complete.json", json.dumps(marker, indent=1).encode("utf-8"))]:
            with open(tmp / filename, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)   # an incomplete one of the same epoch (a complete one would have been resumed from)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _epoch_dirs(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _epoch_dirs(root: Path) -> list[Path]:
    """The ``epoch-*`` folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _EPOCH_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()),
                  key=lambda p: p.name)


def _sweep_temporaries(root: Path) -> None:
    """Remove temporary folders of writers that died (named with their process id)."""
    for entry in root.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and _gone(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)


def _gone(pid: int) -> bool:
    if pid <= 0:
        return False   # kill(0, ...) would address our own process group
    try:
        os.kill(pid, 0)   # signal 0: an existence check
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def _read_complete(path: Path) -> Checkpoint | None:
    """The checkpoint in ``path``, or ``None`` when it is incomplete or its files do not match its marker."""
    try:
        marker = json.loads((path / "complete.json").read_bytes())
        contents = {name: (path / name).read_bytes() for name in _FILES}
        if marker.get("format") != FORMAT or any(hashlib.sha256(contents[n]).hexdigest() != marker["sha256"].get(n) for n in _FILES):
            return None
        meta = json.loads(contents["state.json"])
        tensors = safetensors_load(contents["state.safetensors"])
        return Checkpoint(path, int(meta["epochs_done"]), tensors, meta)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError):
        return None


def load_latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``run_dir/checkpoint`` (incomplete ones are skipped), or ``None``."""
    for path in reversed(_epoch_dirs(run_dir / CHECKPOINT_DIR)):
        checkpoint = _read_complete(path)
        if checkpoint is not None:
            return checkpoint
    return None


def clear_checkpoints(run_dir: Path) -> None:
    """Remove ``run_dir/checkpoint`` (a finished run's, before a new run in the same folder)."""
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
