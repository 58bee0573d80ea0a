"""Choose precision and memory layout by measuring them on the device at hand, once per device and job shape.

Which of {float32, bf16 autocast} x {NCHW, channels_last} is fastest depends on the
device, not on a CPU flag: measured with 5 GroupNorm small-cnn sites, 64 images,
forward + input gradient, one thread of an AMD EPYC under load: NCHW fp32 548 ms,
NCHW bf16 4,286 ms, channels_last fp32 638 ms, channels_last bf16 4,561 ms -- while
on an Intel CPU bf16 was the fastest, and on an Intel CPU without AMX bf16 GEMM ran at
half the float32 rate although the AVX-512 BF16 flag was set.

:func:`calibrate` therefore times a few steps of the real work -- forward + input
gradient of the site ensemble with the BatchNorm-statistics hooks, and a forward +
backward of the student -- at the real batch shape for each candidate (bf16 only
where the device has bf16 at all; NCHW only when channels_last is switched off),
takes the minimum of a few repeats within a bounded time, and picks the fastest.
On CPU a step is timed in process CPU time, not wall time: on a shared, loaded
machine the wall time of the same step varies several-fold with the neighbours'
load (measured: 2.4 s wall for a step of about 0.5 CPU-s), CPU time far less.
The choice is cached per (device model name, torch version, threads, architecture
set, batch shape) in ``calibration.json`` under ``$SECURE_ONESHOT_CACHE`` (default
``~/.cache/secure-oneshot``), written atomically; an unreadable cache is ignored
and rewritten.  The choice and its timings go into the distillation report.

Only speed and rounding change with the choice: float32 NCHW and float32
channels_last compute the same numbers up to float reordering.

What this module does not do: choose device, batching or compilation.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._internal.atomic import atomic_write_bytes
from .ensemble import Ensemble, _signature, batching_for
from .execution import Execution, _device_has_bf16
from .synthesis import BNStatHooks

__all__ = ["BUDGET_S", "CACHE_FILE", "CALIBRATE_ENV", "calibrate", "calibrate_for_synthesis", "cache_dir", "cache_key", "candidates", "device_name", "measure"]

CACHE_FILE = "calibration.json"
CALIBRATE_ENV = "SECURE_ONESHOT_CALIBRATE"
"""``off``: :func:`calibrate_for_synthesis` measures nothing and keeps the unmeasured rule (reproducible reruns)."""
BUDGET_S = {"cpu": 2.0, "cuda": 2.0}
"""Time for measuring all candidates (each gets a warm-up step and then repeats while its share lasts)."""
REPEATS = 2
PROBE_DIVISOR = 8
"""Options after the first are screened on 1/8 of the batch first (:func:`measure`)."""

Timer = Callable[[Execution], float]
"""Seconds of one step under these settings (injectable for tests)."""


def cache_dir() -> Path:
    """``$SECURE_ONESHOT_CACHE``, else ``~/.cache/secure-oneshot``."""
    configured = os.environ.get("SECURE_ONESHOT_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "secure-oneshot"


def device_name(device: torch.device) -> str:
    """The device's model name: the GPU's, or the CPU's from ``/proc/cpuinfo`` (else the platform's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cache_key(device: str, models: Sequence[nn.Module], batch_shape: Sequence[int], channels_last_allowed: bool,
              precisions: Sequence[str]) -> str:
    """One line naming what the timings depend on (architectures by a digest of their module trees and shapes)."""
    architectures = sorted({hashlib.sha256(repr(_signature(m)).encode()).hexdigest()[:16] for m in models})
    return json.dumps({"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "architectures": architectures, "batch": list(batch_shape),
                       "channels_last_allowed": channels_last_allowed, "precisions": list(precisions)}, sort_keys=True)


def candidates(execution: Execution) -> list[Execution]:
    """The settings to try: {fp32, bf16 where the device has it} x {NCHW, channels_last unless switched off}."""
    device = execution.torch_device
    if execution.precision == "auto":
        precisions = ["fp32", "bf16"] if device.type != "cpu" or _cpu_has_any_bf16() else ["fp32"]
        if device.type == "cuda" and not _device_has_bf16(device):
            precisions = ["fp32"]
    else:
        precisions = [execution.precision]
    layouts = [False, True] if execution.channels_last else [False]
    return [dataclasses.replace(execution, precision=p, channels_last=cl) for p in precisions for cl in layouts]


def _cpu_has_any_bf16() -> bool:
    """Whether bf16 runs on this CPU at all (natively or emulated: PyTorch emulates it on any x86-64/ARM CPU)."""
    try:
        torch.ones(2, dtype=torch.bfloat16) @ torch.ones(2, dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def _name(execution: Execution) -> str:
    return f"{execution.precision} {'channels_last' if execution.channels_last else 'NCHW'}"


def measure(options: Sequence[Execution], timer: Timer, budget_s: float, repeats: int = REPEATS,
            probe: Timer | None = None, probe_scale: float = 1.0) -> dict[str, float]:
    """Seconds per step of each option: the minimum of up to ``repeats`` timed steps after one warm-up step,
    fewer when the option's share of ``budget_s`` runs out.

    An option that is clearly not the fastest is not run at full size: after the first option, each is
    first timed by ``probe`` (a step on a fraction of the batch, ``probe_scale`` = full / probe cost);
    if that, scaled, exceeds 3x the best time so far, the scaled probe time is recorded and the option is
    skipped.  (On a CPU where bf16 is emulated one step is 8x slower: running it at full size would cost
    seconds to learn nothing.)
    """
    share = budget_s / max(1, len(options))
    timings: dict[str, float] = {}
    for option in options:
        started = time.perf_counter()
        if timings and probe is not None:
            probe(option)   # warm-up at the small size
            estimate = probe(option) * probe_scale
            if estimate > 3 * min(timings.values()):
                timings[_name(option)] = estimate
                continue
        warm_up = timer(option)   # first-call allocation and kernel selection
        if timings and warm_up > 3 * min(timings.values()):
            timings[_name(option)] = warm_up
            continue
        best = float("inf")
        for _ in range(repeats):
            best = min(best, timer(option))
            if time.perf_counter() - started > share:
                break
        timings[_name(option)] = best
    return timings


def _step_timer(models: Sequence[nn.Module], student: nn.Module | None, batch_shape: Sequence[int]) -> Timer:
    """A timer of one step of the real work: the ensemble's forward + input gradient with the BN-statistics
    hooks, and the student's forward + backward, on copies (the caller's modules are never touched)."""
    def step(execution: Execution) -> float:
        device = execution.torch_device
        ensemble = execution.prepare(Ensemble(models, batched=batching_for(execution.use_batched, models)))
        pupil = execution.prepare(copy.deepcopy(student)).train() if student is not None else None
        x = torch.randn(*batch_shape, device=device, requires_grad=True)
        _sync(device)
        clock = time.perf_counter if device.type == "cuda" else time.process_time
        started = clock()
        with BNStatHooks(ensemble) as hooks, execution.autocast():
            logits, bn = hooks.per_site(execution.layout(x))
            loss = logits.float().mean() + bn
            if pupil is not None:
                loss = loss + pupil(execution.layout(x.detach())).float().mean()
        loss.backward()
        _sync(device)
        return clock() - started

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}   # missing or corrupt: measured again and rewritten
    return cache if isinstance(cache, dict) else {}


def _valid_entry(entry: Any, names: set[str]) -> bool:
    return (isinstance(entry, dict) and entry.get("choice") in names and isinstance(entry.get("timings_ms"), dict)
            and all(isinstance(v, (int, float)) for v in entry["timings_ms"].values()))


def calibrate(execution: Execution, models: Sequence[nn.Module], student: nn.Module | None, batch_shape: Sequence[int], *,
              timer: Timer | None = None, device: str | None = None, cache: Path | None = None) -> Execution:
    """``execution`` with its precision and layout chosen by measurement (or from the cache).

    Nothing to choose (fixed precision, NCHW forced, or a single candidate) returns ``execution`` as is.

    Args:
        execution: ``precision="auto"`` and/or ``channels_last=True`` are the choices left open.
        models: the site models; ``student``: the student (timed too), or ``None``.
        batch_shape: ``(N, C, H, W)`` of the synthetic batch.
        timer: seconds of one step under given settings (default: the real step on copies of the models).
        device: the device model name for the cache key (default :func:`device_name`).
        cache: the cache file (default :func:`cache_dir` / :data:`CACHE_FILE`).

    Returns:
        An :class:`Execution` with explicit ``precision`` and ``channels_last`` and ``calibration`` set to
        ``{"choice", "timings_ms", "cached"}``.
    """
    options = candidates(execution)
    if len(options) == 1 and execution.precision != "auto":
        return execution
    names = {_name(o): o for o in options}
    path = cache or cache_dir() / CACHE_FILE
    key = cache_key(device or device_name(execution.torch_device), models, batch_shape, execution.channels_last,
                    sorted({o.precision for o in options}))
    stored = _read_cache(path)
    entry = stored.get(key)
    cached = _valid_entry(entry, set(names))
    if not cached:
        budget = BUDGET_S.get(execution.torch_device.type, BUDGET_S["cpu"])
        if timer is None:
            small = (max(1, batch_shape[0] // PROBE_DIVISOR), *batch_shape[1:])
            timings = measure(options, _step_timer(models, student, batch_shape), budget,
                              probe=_step_timer(models, student, small), probe_scale=batch_shape[0] / small[0])
        else:
            timings = measure(options, timer, budget)
        entry = {"choice": min(timings, key=timings.__getitem__),
                 "timings_ms": {name: round(seconds * 1e3, 3) for name, seconds in timings.items()}}
        stored[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, (json.dumps(stored, indent=1, sort_keys=True) + "\n").encode("utf-8"))
        except OSError:
            pass   # a read-only home: measured again next time, nothing else changes
    assert isinstance(entry, dict)
    chosen = names[entry["choice"]]
    return dataclasses.replace(chosen, calibration={"choice": entry["choice"], "timings_ms": dict(entry["timings_ms"]),
                                                    "cached": cached})


def calibrate_for_synthesis(execution: Execution, models: Sequence[nn.Module], student: nn.Module | None,
                            synth: Any) -> Execution:
    """:func:`calibrate` at the batch shape of an :class:`~secure_oneshot.server.synthesis.InversionConfig`,
    unless ``execution`` is calibrated already, leaves nothing open, or ``$SECURE_ONESHOT_CALIBRATE`` is ``off``.

    ``off`` keeps the unmeasured rule (bf16 where the device reports bf16 arithmetic, channels_last except for
    GroupNorm models on CPU): a run then computes the same numbers on every rerun, whereas a measured choice
    may flip between layouts of near-equal speed with the machine's load (the numbers then differ by float
    reordering, which a short distillation can amplify).  The test suite runs with ``off``.
    """
    if os.environ.get(CALIBRATE_ENV, "").strip().lower() == "off":
        return execution
    if execution.calibration is not None or (execution.precision != "auto" and not execution.channels_last):
        return execution
    return calibrate(execution, models, student, (synth.batch_size, synth.channels, synth.image_size, synth.image_size))
