"""Server speed: synthesis + distillation images/s, this implementation vs a plain per-site loop, in one run.

Both run the same computation on the same models and settings: one epoch of
FedISCA inversion (``--steps`` steps of ``--batch-size`` images through every
site model, forward + input gradient) followed by one student step per kept
snapshot.  "plain" is a Python loop over the sites in float32, NCHW
(``Execution(precision="fp32", channels_last=False, batched="off")``);
"implementation" is ``Execution()`` with its ``auto`` choices on this device
(see ``secure_oneshot/server/execution.py``).  Timed: best of ``--repeat``
epochs after one warm-up epoch.

Also printed: the FLOPs of one epoch (``torch.utils.flop_counter``), the
achieved FLOP rate, and that rate as a fraction of this machine's measured
matmul peak (2048 x 2048 ``torch.mm``, float32 and bf16), and peak GPU memory
on CUDA.  The last line is the speed-up ratio.  Goals: >= 1.3x on CPU, >= 5x on a GPU.

    python benchmarks/distill.py [--sites 5] [--architecture small-cnn] [--batch-size 64] [--steps 20]
                                 [--image-size 28] [--device auto] [--repeat 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.server.distill import DistillConfig, distill
from secure_oneshot.server.execution import Execution
from secure_oneshot.server.synthesis import InversionConfig


def sites(cfg: ClassifierConfig, n: int) -> list[torch.nn.Module]:
    """Random site models with non-trivial BatchNorm statistics (speed does not depend on training)."""
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


def one_epoch(models, cfg: ClassifierConfig, synth: InversionConfig, execution: Execution) -> None:
    torch.manual_seed(0)
    distill(build_classifier(cfg), models, synth, DistillConfig(epochs=1), execution=execution)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def epoch_seconds(models, cfg, synth, execution: Execution, repeat: int) -> float:
    times = []
    for _ in range(repeat + 1):
        sync(execution.torch_device)
        start = time.perf_counter()
        one_epoch(models, cfg, synth, execution)
        sync(execution.torch_device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeat: int = 10) -> float:
    """FLOP/s of a square matmul (best of ``repeat``)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeat + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def epoch_flops(models, cfg, synth) -> int:
    """FLOPs of one epoch, counted once on the plain float32 path (the same arithmetic either way)."""
    counter = FlopCounterMode(display=False)
    with counter:
        one_epoch(models, cfg, synth, Execution(device="cpu", precision="fp32", channels_last=False, batched="off"))
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--architecture", default="small-cnn")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    fast = Execution(device=args.device)
    plain = Execution(device=args.device, precision="fp32", channels_last=False, batched="off")
    device = fast.torch_device
    cfg = ClassifierConfig(args.architecture, 1, 2)
    models = sites(cfg, args.sites)
    synth = InversionConfig(batch_size=args.batch_size, steps=args.steps, image_size=args.image_size, jitter=min(2, args.image_size - 1))
    images = args.batch_size * args.steps  # inversion images per epoch (each also feeds one student step)
    flops = epoch_flops(models, cfg, synth)
    peak32, peak16 = matmul_peak(device, torch.float32), matmul_peak(device, torch.bfloat16)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch threads {torch.get_num_threads()}")
    print(f"{args.sites} x {args.architecture} at {args.image_size} px, {args.batch_size} images x {args.steps} steps; "
          f"{flops / 1e9:.1f} GFLOP per epoch")
    print(f"matmul peak: float32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s")
    results = {}
    for name, execution in (("plain loop", plain), ("implementation", fast)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = epoch_seconds(models, cfg, synth, execution, args.repeat)
        results[name] = seconds
        rate = flops / seconds
        peak = peak16 if execution.use_bf16 else peak32
        memory = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else ""
        print(f"{name:15s} {execution.describe()}: {seconds:.2f} s/epoch, {images / seconds:.0f} images/s, "
              f"{rate / 1e9:.0f} GFLOP/s = {rate / peak:.2f} of the {'bf16' if execution.use_bf16 else 'float32'} matmul peak{memory}")
    print(f"speed-up (implementation / plain loop): {results['plain loop'] / results['implementation']:.2f}x")


if __name__ == "__main__":
    main()
