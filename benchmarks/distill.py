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

    python benchmarks/distill.py [--sites 5] [--architecture small-cnn] [--batch-size 64] [--steps 20]
                                 [--image-size 28] [--device cpu] [--repeat 3] [--threads 1] [--baseline CHECKOUT]
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


def one_epoch(models, cfg, synth, execution) -> None:  # type: ignore[no-untyped-def]
    import torch

    from secure_oneshot.models.classifier import build_classifier
    from secure_oneshot.server.distill import DistillConfig, distill

    torch.manual_seed(0)
    distill(build_classifier(cfg), models, synth, DistillConfig(epochs=1), execution=execution)


def worker(args: argparse.Namespace) -> None:
    """One measurement (in its own process): a warm-up epoch, then one timed epoch; prints JSON."""
    import torch

    import secure_oneshot
    from secure_oneshot.server.execution import Execution

    torch.set_num_threads(args.threads)
    execution = (Execution(device=args.device, precision="fp32", channels_last=False, batched="off") if args.worker == "plain"
                 else Execution(device=args.device))
    cfg, models, synth = _setup(args)
    one_epoch(models, cfg, synth, execution)   # warm-up (and, where the code calibrates, its measurement: then cached)
    sync = torch.cuda.synchronize if execution.torch_device.type == "cuda" else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    one_epoch(models, cfg, synth, execution)
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"wall": wall, "cpu": cpu, "code": str(Path(secure_oneshot.__file__).parents[1])}))


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
            "--threads", str(args.threads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--architecture", default="small-cnn")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each version runs once per round (alternating)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", metavar="CHECKOUT", help="another checkout's root (its secure_oneshot package) to compare with")
    parser.add_argument("--clock-ghz", type=float, help="the CPU clock for the peak (default /proc/cpuinfo's cpu MHz)")
    parser.add_argument("--peak-gflops", type=float, help="the FP32 peak to compare with, instead of the CPU model's")
    parser.add_argument("--worker", choices=("plain", "implementation"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
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
    for name, _, _ in versions:
        wall, cpu = best[name]["wall"], best[name]["cpu"]
        print(f"{name:14s} min wall {wall:.2f} s, min CPU {cpu:.2f} s per epoch: {images / cpu:.1f} images per CPU-second, "
              f"{images / wall:.1f} images/s; {flops / cpu / 1e9:.1f} GFLOP per CPU-second = {flops / cpu / peak:.2f} of the FP32 peak")
    (old, _, _), (new, _, _) = versions
    print(f"images per CPU-second, {new} / {old}: {best[old]['cpu'] / best[new]['cpu']:.2f}x "
          f"(wall: {best[old]['wall'] / best[new]['wall']:.2f}x)")


if __name__ == "__main__":
    main()
