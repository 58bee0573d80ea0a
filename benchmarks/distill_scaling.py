"""Distillation throughput by world size: ``distill`` under ``torch.distributed.run`` with 1, 2, ... ranks.

Each world size runs the real command (``python -m torch.distributed.run --standalone
--nproc-per-node N -m secure_oneshot distill ...``) on small random BatchNorm site models
(``tests/model_helpers.py``'s small-cnn), ``--threads`` torch threads per rank (default 1,
so that N ranks use N cores), and reads rank 0's report: images per second is the images
every rank inverted per epoch (global batch x inversion steps) over the epoch's wall time,
the mean over epochs after the first (the first pays start-up costs).  CPU seconds of all
ranks (``RUSAGE_CHILDREN``) and the load average are printed beside it, because on a shared
machine the wall time says as much about the neighbours as about the code.

Modes (``--ddp-mode``): ``throughput`` (default here) gives every rank the method's batch,
so N ranks invert N times the images per step; ``faithful`` splits the method's batch over
the ranks.  Scaling efficiency = images/s at N ranks / (N x images/s at 1 rank); the last
line prints it for the largest world size.  On CUDA (``--device cuda``) rank r runs on GPU r
with nccl; on CPU, gloo.

    python benchmarks/distill_scaling.py [--world-sizes 1 2] [--preset smoke] [--epochs 3] [--device cpu]
                                         [--ddp-mode throughput] [--threads 1] [--image-size 28]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_sites(root: Path, count: int) -> list[str]:
    from tests.model_helpers import make_real_model_dir

    return [a for i in range(count) for a in ("--model", str(make_real_model_dir(root / f"site-{i}", site=f"site-{i}")))]


def run(world_size: int, args: argparse.Namespace, sites: list[str], work: Path) -> dict[str, float]:
    out = work / f"ws{world_size}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
               "-m", "secure_oneshot", "distill", *sites, "--preset", args.preset, "--epochs", str(args.epochs),
               "--device", args.device, "--threads", str(args.threads), "--ddp-mode", args.ddp_mode,
               "--image-size", str(args.image_size), "--out", str(out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "SECURE_ONESHOT_CALIBRATE": "off"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"world size {world_size} failed:\n{done.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads((out / "report.json").read_text())
    images_per_epoch = report["distributed"].get("global_batch", report["inversion"]["batch_size"]) * report["inversion"]["steps"]
    epochs = report["history"][1:] or report["history"]
    epoch_s = sum(h["seconds"] for h in epochs) / len(epochs)
    return {"world_size": world_size, "images_per_s": images_per_epoch / epoch_s, "epoch_s": epoch_s,
            "images_per_epoch": images_per_epoch, "wall_s": wall,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "load_before": load, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ddp-mode", choices=("faithful", "throughput"), default="throughput")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--sites", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sites = make_sites(work / "sites", args.sites)
        rows = [run(n, args, sites, work) for n in args.world_sizes]
    print(f"preset {args.preset}, {args.epochs} epochs, {args.sites} small-cnn sites, {args.image_size} px, device {args.device}, "
          f"{args.threads} thread(s) per rank, mode {args.ddp_mode}, {os.cpu_count()} CPUs")
    print("| ranks | images/epoch | epoch s | images/s | wall s | CPU s | load before/after |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['world_size']} | {r['images_per_epoch']:,.0f} | {r['epoch_s']:.2f} | {r['images_per_s']:.1f} | "
              f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    base = next((r for r in rows if r["world_size"] == 1), None)
    last = rows[-1]
    if base is None or last is base:
        print("scaling efficiency: n/a (needs world size 1 and another)")
        return
    efficiency = last["images_per_s"] / (last["world_size"] * base["images_per_s"])
    print(f"scaling efficiency at {last['world_size']} ranks ({args.ddp_mode}): {efficiency:.2f}")


if __name__ == "__main__":
    main()
