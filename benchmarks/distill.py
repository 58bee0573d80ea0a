"""Server speed: synthesis + distillation images per CPU-second, against a plain loop or another checkout, in one run.

One timed unit is one epoch of FedISCA (``--steps`` inversion steps of ``--batch-size``
images through every site model, forward + input gradient, then one student step per
kept snapshot) on random site models with non-trivial BatchNorm statistics, after one
warm-up epoch.  Each measurement runs in its own process with ``--threads`` torch threads
(default 1), and the versions alternate run by run (``--repeat`` rounds); the minimum over
rounds is reported, as wall seconds and CPU seconds (``time.process_time``: on a shared,
loaded machine CPU time is the steadier measure of the work done).

Versions compared:

* ``--baseline CHECKOUT``: the same epoch run by another checkout's ``secure_oneshot``
  (e.g. ``git archive <commit> | tar -x -C /tmp/base``) with its own defaults, beside this
  checkout's;
* otherwise the plain loop (``Execution(precision="fp32", channels_last=False, batched="off")``)
  beside this implementation's ``Execution(device=--device)`` (measured precision/layout).

"Fraction of FP32 peak" divides the achieved FLOP rate (FLOPs of the epoch counted once on
the float32 path with ``torch.utils.flop_counter``) by a peak computed from the CPU's
specification, never measured under the same load: threads x clock x FP32 FLOPs per cycle.
Assumptions (printed): the clock is ``/proc/cpuinfo``'s ``cpu MHz`` (or ``--clock-ghz``);
FLOPs per cycle from the flags: AVX-512 64 on Intel (two 512-bit FMA ports), 32 on AMD (Zen 4
runs 512-bit FMAs on 256-bit units); AVX2 + FMA 32 (two 256-bit FMA units: Haswell and later,
Zen 2 and later; Zen 1 has half); AVX 16; else 8.  Override with ``--peak-gflops``.  On CUDA
the GPU's peak is not modelled (pass ``--peak-gflops``).  The last line is the ratio of
images per CPU-second (new / baseline).

Every measurement also reports the peak memory of its timed epoch: on CPU the process's peak
resident set (``VmHWM``, reset before the epoch through ``/proc/self/clear_refs``; where that
is not possible, the process's lifetime peak ``ru_maxrss``), on CUDA
``torch.cuda.max_memory_allocated`` (reset before the epoch).  ``--memory-steps 4,16`` runs
only this implementation, once per step count, and prints the peaks side by side: with the
inversion's snapshots streamed to the student, memory does not grow with the step count.
``--snapshot-memory-mib M`` passes the distillation's snapshot budget (default: the library's, 2048
MiB; ``0`` sends every snapshot to the temporary file, :mod:`secure_oneshot.server.snapshot_store`).

``--size`` (``--image-size``) is the MedMNIST+ size; the site models are the architecture a
site config that names none trains at that size (small-cnn at 28 px, ResNet-18 above, with
the ImageNet stem at 128 and 224 px) unless ``--architecture`` names one.

    python benchmarks/distill.py [--sites 5] [--architecture ARCH] [--batch-size 64] [--steps 20]
                                 [--size 28] [--device cpu] [--repeat 3] [--threads 1] [--baseline CHECKOUT]
                                 [--memory-steps 4,16] [--snapshot-memory-mib M]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


def sites(cfg, n: int):  # type: ignore[no-untyped-def]
    """Random site models with non-trivial BatchNorm statistics (speed does not depend on training)."""
    import torch

    from secure_oneshot.models.classifier import build_classifier

    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = build_classifier(cfg)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        models.append(model.eval())
    return models


def _setup(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from secure_oneshot.models.classifier import ClassifierConfig
    from secure_oneshot.server.synthesis import InversionConfig

    cfg = ClassifierConfig(args.architecture, 1, 2)
    synth = InversionConfig(batch_size=args.batch_size, steps=args.steps, image_size=args.image_size,
                            jitter=min(2, args.image_size - 1))
    return cfg, sites(cfg, args.sites), synth


def one_epoch(models, cfg, synth, execution, snapshot_memory_mib: float | None = None) -> None:  # type: ignore[no-untyped-def]
    import torch

    from secure_oneshot.models.classifier import build_classifier
    from secure_oneshot.server.distill import DistillConfig, distill

    torch.manual_seed(0)
    # only when asked: a --baseline checkout may predate the option
    budget = {} if snapshot_memory_mib is None else {"snapshot_memory_mib": snapshot_memory_mib}
    distill(build_classifier(cfg), models, synth, DistillConfig(epochs=1), execution=execution, **budget)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set of this process (Linux ``clear_refs`` 5); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(was_reset: bool) -> tuple[int, str]:
    if was_reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak RSS of the timed epoch"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process"   # Linux: KiB


def worker(args: argparse.Namespace) -> None:
    """One measurement (in its own process): a warm-up epoch, then one timed epoch; prints JSON."""
    import torch

    import secure_oneshot
    from secure_oneshot.server.execution import Execution

    torch.set_num_threads(args.threads)
    execution = (Execution(device=args.device, precision="fp32", channels_last=False, batched="off") if args.worker == "plain"
                 else Execution(device=args.device))
    cfg, models, synth = _setup(args)
    one_epoch(models, cfg, synth, execution, args.snapshot_memory_mib)   # warm-up (and, where the code calibrates, its measurement: then cached)
    cuda = execution.torch_device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    was_reset = False if cuda else _reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    one_epoch(models, cfg, synth, execution, args.snapshot_memory_mib)
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak, kind = (torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated") if cuda else _peak_rss_bytes(was_reset)
    print(json.dumps({"wall": wall, "cpu": cpu, "peak_bytes": peak, "peak_kind": kind, "code": str(Path(secure_oneshot.__file__).parents[1])}))


def cpu_peak(threads: int, clock_ghz: float | None) -> tuple[float, str]:
    """FP32 FLOP/s of ``threads`` cores from the CPU's specification, and the assumption stated."""
    info = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").exists() else ""
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith(key)), "")  # noqa: E731
    model, flags = field("model name") or "unknown CPU", set(field("flags").split())
    clock = clock_ghz or (float(field("cpu MHz")) / 1e3 if field("cpu MHz") else 0.0)
    amd = "AMD" in model
    if "avx512f" in flags:
        per_cycle, why = (32, "AVX-512 on AMD: 512-bit FMAs on 256-bit units") if amd else (64, "AVX-512: two 512-bit FMA ports")
    elif {"avx2", "fma"} <= flags:
        per_cycle, why = 32, "AVX2 + FMA: two 256-bit FMA units (Haswell+, Zen 2+)"
    elif "avx" in flags:
        per_cycle, why = 16, "AVX without FMA"
    else:
        per_cycle, why = 8, "SSE"
    peak = threads * clock * 1e9 * per_cycle
    return peak, f"{model}: {threads} core(s) x {clock:.3f} GHz x {per_cycle} FP32 FLOP/cycle ({why}) = {peak / 1e9:.1f} GFLOP/s"


def epoch_flops(args: argparse.Namespace) -> float:
    """FLOPs of one epoch: counted on the float32 NCHW path for 2 steps and scaled (each step costs the same)."""
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode

    from secure_oneshot.server.execution import Execution

    cfg, models, synth = _setup(args)
    counter = FlopCounterMode(display=False)
    with counter:
        one_epoch(models, cfg, dataclasses.replace(synth, steps=2),
                  Execution(device="cpu", precision="fp32", channels_last=False, batched="off"))
    return counter.get_total_flops() * args.steps / 2


def measure(args: argparse.Namespace, version: str, pythonpath: str, worker_kind: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, str(HERE), "--worker", worker_kind, *_shared(args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{version}: the worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shared(args: argparse.Namespace) -> list[str]:
    return ["--sites", str(args.sites), "--architecture", args.architecture, "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--image-size", str(args.image_size), "--device", args.device,
            "--threads", str(args.threads),
            *([] if args.snapshot_memory_mib is None else ["--snapshot-memory-mib", str(args.snapshot_memory_mib)])]


def memory_by_steps(args: argparse.Namespace, step_counts: list[int]) -> None:
    """This implementation's peak memory per epoch at each inversion step count (one run each)."""
    print(f"{args.sites} x {args.architecture} at {args.image_size} px, {args.batch_size} images per step on {args.device}, "
          f"{args.threads} thread(s): peak memory of one epoch by inversion steps")
    peaks = []
    for steps in step_counts:
        got = measure(argparse.Namespace(**{**vars(args), "steps": steps}), "implementation", str(ROOT), "implementation")
        images = args.batch_size * steps
        peaks.append(got["peak_bytes"])
        print(f"  steps {steps:4d}: peak {got['peak_bytes'] / 2**20:8.1f} MiB ({got['peak_kind']}); wall {got['wall']:.2f} s, "
              f"{images / got['wall']:.2f} images/s, {images / got['cpu']:.2f} images per CPU-second", flush=True)
    print(f"peak at {step_counts[-1]} steps / peak at {step_counts[0]} steps: {peaks[-1] / peaks[0]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--architecture", help="site and student architecture (default: a site config's default at --size)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--image-size", "--size", dest="image_size", type=int, default=28, help="image size in pixels (28, 64, 128, 224)")
    parser.add_argument("--memory-steps", metavar="A,B,...", help="only: this implementation's peak memory at each inversion step count")
    parser.add_argument("--snapshot-memory-mib", type=float, metavar="M",
                        help="the distillation's in-memory snapshot budget (default: the library's; 0: all to the temporary file)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each version runs once per round (alternating)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", metavar="CHECKOUT", help="another checkout's root (its secure_oneshot package) to compare with")
    parser.add_argument("--clock-ghz", type=float, help="the CPU clock for the peak (default /proc/cpuinfo's cpu MHz)")
    parser.add_argument("--peak-gflops", type=float, help="the FP32 peak to compare with, instead of the CPU model's")
    parser.add_argument("--worker", choices=("plain", "implementation"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.architecture is None:
        sys.path.insert(0, str(ROOT))
        from secure_oneshot.models.specs import config_default_architecture

        args.architecture = config_default_architecture(args.image_size)
    if args.worker:
        worker(args)
        return
    if args.memory_steps:
        memory_by_steps(args, [int(s) for s in args.memory_steps.split(",")])
        return

    versions = ([("baseline", str(Path(args.baseline).resolve()), "implementation"), ("this checkout", str(ROOT), "implementation")]
                if args.baseline else [("plain loop", str(ROOT), "plain"), ("implementation", str(ROOT), "implementation")])
    images = args.batch_size * args.steps   # inversion images per epoch (each also feeds one student step)
    flops = epoch_flops(args)
    if args.peak_gflops:
        peak, assumption = args.peak_gflops * 1e9, f"given: {args.peak_gflops:.1f} GFLOP/s"
    else:
        peak, assumption = cpu_peak(args.threads, args.clock_ghz)
    print(f"{args.sites} x {args.architecture} at {args.image_size} px, {args.batch_size} images x {args.steps} steps on "
          f"{args.device}, {args.threads} thread(s); {flops / 1e9:.1f} GFLOP per epoch")
    print(f"FP32 peak from the specification: {assumption}")
    best: dict[str, dict[str, float]] = {}
    for round_ in range(args.repeat):
        for name, path, kind in versions:
            got = measure(args, name, path, kind)
            print(f"  round {round_ + 1} {name:14s} wall {got['wall']:6.2f} s  cpu {got['cpu']:6.2f} s  ({got['code']})", flush=True)
            previous = best.get(name)
            best[name] = {k: min(got[k], previous[k]) if previous else got[k] for k in ("wall", "cpu")}
            best[name] |= {"peak_bytes": max(got.get("peak_bytes", 0), previous["peak_bytes"] if previous else 0),
                           "peak_kind": got.get("peak_kind", "not measured (baseline)")}
    for name, _, _ in versions:
        wall, cpu = best[name]["wall"], best[name]["cpu"]
        print(f"{name:14s} min wall {wall:.2f} s, min CPU {cpu:.2f} s per epoch: {images / cpu:.1f} images per CPU-second, "
              f"{images / wall:.1f} images/s; {flops / cpu / 1e9:.1f} GFLOP per CPU-second = {flops / cpu / peak:.2f} of the FP32 peak; "
              f"peak memory {best[name]['peak_bytes'] / 2**20:.1f} MiB ({best[name]['peak_kind']}, largest over rounds)")
    (old, _, _), (new, _, _) = versions
    print(f"images per CPU-second, {new} / {old}: {best[old]['cpu'] / best[new]['cpu']:.2f}x "
          f"(wall: {best[old]['wall'] / best[new]['wall']:.2f}x)")


if __name__ == "__main__":
    main()
